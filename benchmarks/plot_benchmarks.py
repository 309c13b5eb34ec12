"""Draw docs/benchmarks_decode.png from the streamed-lane decode results (docs/results/2026-11-22_5b4c6fe/
decode_*_streamed): decode tokens/s per planner at each budget, with the two decode limits each fiddler_overlap
result measured in its own process drawn in (two-lane: host read + pinned H2D alone; lanes together: both measured
while the other runs). hf_accelerate is the run at 24 GiB in docs/results/2026-11-22_a4b85c9/hf_accelerate_24g
(another lease).

    python benchmarks/plot_benchmarks.py
"""
import glob
import json
import os
import statistics

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "docs")
RESULTS = os.path.join(ROOT, "results", "2026-11-22_5b4c6fe")
RUNS = {24: "decode_24g_streamed", 48: "decode_48g_streamed", 77: "decode_77g_streamed"}
HF_ACCELERATE_24G = 0.084  # docs/results/2026-11-22_a4b85c9/hf_accelerate_24g (another lease)


def label(result: dict) -> str:
    cfg = result["config"]
    name = cfg["planner"]["name"]
    return name if cfg["kernel"].get("streamed_lane", True) else name + " (synced, no streamed lane)"


points: dict[str, dict[int, list[float]]] = {}
limits: dict[str, dict[int, list[float]]] = {"two-lane limit (alone)": {}, "lanes-together limit": {}}
for budget, folder in RUNS.items():
    for path in sorted(glob.glob(os.path.join(RESULTS, folder, "*", "result.json"))):
        result = json.load(open(path))
        tps = result["metrics"]["decode_tokens_per_s"]["median"]
        points.setdefault(label(result), {}).setdefault(budget, []).append(tps)
        lim = result.get("limits") or {}
        if label(result) == "fiddler_overlap":
            limits["two-lane limit (alone)"].setdefault(budget, []).append(lim["two_lane_decode_tokens_per_s"])
            limits["lanes-together limit"].setdefault(budget, []).append(
                lim["two_lanes_together_decode_tokens_per_s"])

budgets = sorted(RUNS)
fig, ax = plt.subplots(figsize=(7.5, 4.4))
for (name, by_budget), style in zip(limits.items(), ("--", ":")):
    xs = sorted(by_budget)
    ax.plot(xs, [statistics.median(by_budget[b]) for b in xs], style, color="k" if "alone" in name else "gray",
            marker="o", label=name + ", same runs")
colors = {"fiddler_overlap": "C0", "fiddler_overlap (synced, no streamed lane)": "C3", "fiddler": "C1",
          "cpu_only": "C2"}
for i, (name, by_budget) in enumerate(points.items()):
    for b, values in by_budget.items():
        ax.scatter([b + 0.9 * (i - 1.5)] * len(values), values, s=36, zorder=3, color=colors.get(name, "C4"),
                   label=name if b == min(by_budget) else None)
ax.scatter([24 - 2.5], [HF_ACCELERATE_24G], marker="x", color="k", zorder=3, label="hf_accelerate (another lease)")
ax.set(xlabel="GPU budget (GiB)", ylabel="decode tokens/s", yscale="log", xticks=budgets)
ax.set_title("Mixtral-8x7B (random bf16, uniform routing), H100 + 16-core Xeon, commit 5b4c6fe", fontsize=10)
ax.legend(fontsize=7)
fig.tight_layout()
fig.savefig(os.path.join(ROOT, "benchmarks_decode.png"), dpi=110)
print("wrote", os.path.join(ROOT, "benchmarks_decode.png"))
