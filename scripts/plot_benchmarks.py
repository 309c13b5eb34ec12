"""Draw docs/benchmarks_decode.png from docs/results: decode tokens/s per planner at each measured budget, with
the two-lane decode limit and the CPU-lane-only limit of the ceilings run drawn in."""
import json
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "docs")
ceil = json.load(open(os.path.join(ROOT, "results", "ceilings_h100.json")))
decode = json.load(open(os.path.join(ROOT, "results", "decode_24g_summary.json")))
budgets = [int(l["budget"].rstrip("GiB")) for l in ceil["limits"]]
fig, ax = plt.subplots(figsize=(7, 4.2))
ax.plot(budgets, [l["two_lane_decode_tokens_per_s"] for l in ceil["limits"]], "k--", marker="o",
        label="two-lane limit (host read + pinned H2D)")
ax.plot(budgets, [l["cpu_lane_only_decode_tokens_per_s"] for l in ceil["limits"]], ":", color="gray", marker="o",
        label="CPU-lane-only limit (host read)")
for i, (planner, tps) in enumerate(decode["tokens_per_s"].items()):
    ax.scatter([24 + 0.8 * (i - 1)], [tps], s=50, zorder=3, label=f"{planner} (measured)")
ax.set(xlabel="GPU budget (GiB)", ylabel="decode tokens/s", yscale="log", xticks=budgets,
       title="Mixtral-8x7B (random bf16, uniform routing), H100 + 16-core Xeon")
ax.legend(fontsize=8)
fig.tight_layout()
fig.savefig(os.path.join(ROOT, "benchmarks_decode.png"), dpi=110)
