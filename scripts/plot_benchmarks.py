"""Draw docs/benchmarks_decode.png from docs/results: decode tokens/s per planner at each measured budget, with
the two-lane decode limit drawn in -- from the latency model and the routing of the same runs (decode_summary.json)
and from the ceilings run (host read + pinned H2D, ceilings_h100.json; 24 and 48 GiB)."""
import json
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "docs")
ceil = json.load(open(os.path.join(ROOT, "results", "ceilings_h100.json")))
decode = json.load(open(os.path.join(ROOT, "results", "decode_summary.json")))
run = decode["session5"]
budgets = sorted(int(b) for b in run["latency_model_two_lane_limit"])
fig, ax = plt.subplots(figsize=(7, 4.2))
ax.plot(budgets, [run["latency_model_two_lane_limit"][str(b)] for b in budgets], "k--", marker="o",
        label="two-lane limit (latency model, same runs)")
probe = [l for l in ceil["limits"] if l["budget"] in ("24GiB", "48GiB")]
ax.plot([int(l["budget"].rstrip("GiB")) for l in probe], [l["two_lane_decode_tokens_per_s"] for l in probe], ":",
        color="gray", marker="o", label="two-lane limit (ceilings: host read + pinned H2D)")
colors = {"fiddler_overlap": "C0", "fiddler_overlap_prefetch1": "C3", "fiddler": "C1", "cpu_only": "C2"}
for i, (planner, by_budget) in enumerate(run["tokens_per_s"].items()):
    xs = [int(b) + 0.9 * (i - 1.5) for b in by_budget]
    ax.scatter(xs, list(by_budget.values()), s=40, zorder=3, color=colors[planner],
               label=planner.replace("_prefetch1", " + prefetch=1"))
ax.scatter([24 - 2.5], [run["hf_accelerate_24GiB_other_lease"]], marker="x", color="k", zorder=3,
           label="hf_accelerate (another lease)")
ax.set(xlabel="GPU budget (GiB)", ylabel="decode tokens/s", yscale="log", xticks=budgets,
       title="Mixtral-8x7B (random bf16, uniform routing), H100 + 16-core Xeon")
ax.legend(fontsize=7)
fig.tight_layout()
fig.savefig(os.path.join(ROOT, "benchmarks_decode.png"), dpi=110)
