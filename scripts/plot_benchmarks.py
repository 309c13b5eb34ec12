"""Draw docs/benchmarks_decode.png from docs/results: decode tokens/s per planner at each measured budget, with
the two-lane decode limit and the CPU-lane-only limit of the ceilings run drawn in."""
import json
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "docs")
ceil = json.load(open(os.path.join(ROOT, "results", "ceilings_h100.json")))
decode = json.load(open(os.path.join(ROOT, "results", "decode_summary.json")))
budgets = [int(l["budget"].rstrip("GiB")) for l in ceil["limits"]]
fig, ax = plt.subplots(figsize=(7, 4.2))
ax.plot(budgets, [l["two_lane_decode_tokens_per_s"] for l in ceil["limits"]], "k--", marker="o",
        label="two-lane limit (host read + pinned H2D)")
ax.plot(budgets, [l["cpu_lane_only_decode_tokens_per_s"] for l in ceil["limits"]], ":", color="gray", marker="o",
        label="CPU-lane-only limit (host read)")
colors = {"fiddler_overlap": "C0", "fiddler": "C1", "cpu_only": "C2"}
for i, (planner, tps) in enumerate(decode["24GiB"]["tokens_per_s"].items()):
    ax.scatter([24 + 0.8 * (i - 1)], [tps], s=50, zorder=3, color=colors[planner], label=f"{planner}")
for i, (planner, tps) in enumerate(decode["48GiB_over_budget_by_2MiB"]["tokens_per_s"].items()):
    ax.scatter([48 + 0.8 * (i - 0.5)], [tps], s=50, zorder=3, facecolors="none", edgecolors=colors[planner],
               label=f"{planner}, 48 GiB (over budget by 2 MiB)" if i == 0 else None)
old = decode["24GiB_session3_before_the_overhead_work"]["tokens_per_s"]["fiddler_overlap"]
ax.scatter([24 - 0.8], [old], marker="x", color="C0", zorder=3, label="fiddler_overlap before this session's work")
ax.set(xlabel="GPU budget (GiB)", ylabel="decode tokens/s", yscale="log", xticks=budgets,
       title="Mixtral-8x7B (random bf16, uniform routing), H100 + 16-core Xeon")
ax.legend(fontsize=7)
fig.tight_layout()
fig.savefig(os.path.join(ROOT, "benchmarks_decode.png"), dpi=110)
