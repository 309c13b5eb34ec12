"""``fiddler-jax report <folder>``: every ``result.json`` under a folder (a Hydra multirun, or several) as one
table: ``report.csv`` (all runs, every metric's median/min/max), ``report.md`` (the medians, one row per run,
labelled by the run's overrides) and one PNG per metric (``report_<metric>.png``: median with the min–max
spread, one bar per run). Prints the markdown table last."""
from __future__ import annotations

import argparse
import csv
import glob
import json
import os

from fiddler_jax.errors import InvalidInputError

KEY_METRICS = ("tokens_per_s", "decode_tokens_per_s", "ttft_s", "latency_s")


def find_results(folder: str) -> list[tuple[str, dict]]:
    """(path, result) of every result.json under ``folder``, in path order (sweep order for Hydra multiruns)."""
    folder = os.path.expanduser(folder)
    if not os.path.isdir(folder):
        raise InvalidInputError(f"{folder} is not a folder; give the multirun folder of a `fiddler-jax bench -m` run")
    paths = glob.glob(os.path.join(folder, "**", "result.json"), recursive=True)
    if not paths:
        raise InvalidInputError(f"no result.json under {folder}: run `fiddler-jax bench` (with -m for a sweep) "
                                "and point report at its output folder")

    def order(path):  # Hydra job folders are numbered: sort 2 before 10
        rel = os.path.relpath(path, folder).split(os.sep)
        return [(0, int(p), "") if p.isdigit() else (1, 0, p) for p in rel]

    results = []
    for path in sorted(paths, key=order):
        try:
            with open(path) as f:
                results.append((path, json.load(f)))
        except (OSError, json.JSONDecodeError) as exc:
            raise InvalidInputError(f"{path} is not a readable result file ({exc})") from None
    return results


def rows_of(results: list[tuple[str, dict]], folder: str) -> tuple[list[dict], list[str], list[str]]:
    """Flat rows; the override keys whose values differ across runs (the sweep's axes; with one run, its first
    override); the metric names."""
    overrides = [dict(o.split("=", 1) for o in r.get("overrides", []) if "=" in o) for _, r in results]
    keys = sorted({k for o in overrides for k in o})
    axes = [k for k in keys if len({o.get(k) for o in overrides}) > 1] or keys[:1]  # what the sweep varied
    metrics: list[str] = []
    for _, r in results:
        metrics += [m for m in r["metrics"] if m not in metrics]
    rows = []
    for (path, r), o in zip(results, overrides):
        cfg = r.get("config", {})
        row = {"run": os.path.relpath(os.path.dirname(path), folder),
               "label": " ".join(f"{k}={o[k]}" for k in axes if k in o) or cfg.get("planner", {}).get("name", "run")}
        row.update({k: o.get(k, "") for k in axes})
        for m in metrics:
            stats = r["metrics"].get(m, {})
            for s in ("median", "min", "max"):
                row[f"{m}_{s}"] = stats.get(s, "")
        limits = r.get("limits") or {}
        row["two_lane_limit_tokens_per_s"] = limits.get("two_lane_decode_tokens_per_s") or ""
        row["together_limit_tokens_per_s"] = limits.get("two_lanes_together_decode_tokens_per_s") or ""
        row["host_read_GBps"] = (limits.get("ceilings_GBps") or {}).get("host_read") or ""
        row["cpu_lane_read_GBps"] = limits.get("cpu_lane_read_GBps") or ""
        row["peak_gpu_bytes"] = r.get("peak_gpu_bytes") or ""
        row["git_sha"] = (r.get("git_sha") or "")[:12] + ("+dirty" if r.get("git_dirty") else "")
        row["gpu"] = r.get("hardware", {}).get("gpu", "")
        rows.append(row)
    return rows, axes, metrics


def markdown(rows: list[dict], axes: list[str], metrics: list[str]) -> str:
    """The medians, one row per run; decode runs with a two-lane limit also get the limits (lanes alone and
    together) and tokens/s over each (steady-state decode tokens/s where measured, else tokens/s), and the host
    read ceiling beside the CPU lane's achieved read rate."""
    shown = [m for m in KEY_METRICS if m in metrics] + [m for m in metrics if m not in KEY_METRICS
                                                        and m != "new_tokens"]
    with_limit = any(row["two_lane_limit_tokens_per_s"] != "" for row in rows)
    cols = (axes or ["label"]) + [f"{m} (median)" for m in shown]
    cols += ["two-lane limit", "/ limit", "lanes-together limit", "/ together", "host read GB/s",
             "CPU lane GB/s"] if with_limit else []
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for row in rows:
        cells = [str(row[a]) for a in axes] if axes else [row["label"]]
        cells += [f"{row[f'{m}_median']:.4g}" if row[f"{m}_median"] != "" else "" for m in shown]
        if with_limit:
            rate = next((row.get(f"{m}_median") for m in ("decode_tokens_per_s", "tokens_per_s")
                         if row.get(f"{m}_median", "") != ""), "")
            for key in ("two_lane_limit_tokens_per_s", "together_limit_tokens_per_s"):
                limit = row[key]
                cells += [f"{limit:.3g}" if limit != "" else "",
                          f"{rate / limit:.2f}" if limit != "" and rate != "" else ""]
            cells += [f"{row[k]:.1f}" if row[k] != "" else "" for k in ("host_read_GBps", "cpu_lane_read_GBps")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(rows: list[dict], metric: str, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = [(r["label"], r[f"{metric}_median"], r[f"{metric}_min"], r[f"{metric}_max"]) for r in rows
            if r[f"{metric}_median"] != ""]
    if not data:
        return
    labels, med, lo, hi = zip(*data)
    fig, ax = plt.subplots(figsize=(max(5.0, 0.6 * len(labels) + 2), 4))
    x = range(len(labels))
    ax.bar(x, med, color="#4c78a8", yerr=[[m - a for m, a in zip(med, lo)], [b - m for m, b in zip(med, hi)]],
           capsize=3)
    ax.set_xticks(list(x), labels, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel(metric)
    ax.set_title(f"{metric} (median; whiskers: min-max)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def report(folder: str, out: str | None = None) -> str:
    """Write report.csv, report.md and the plots into ``out`` (default: ``folder``); returns the markdown."""
    results = find_results(folder)
    rows, axes, metrics = rows_of(results, os.path.expanduser(folder))
    out = os.path.expanduser(out or folder)
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "report.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    table = markdown(rows, axes, metrics)
    with open(os.path.join(out, "report.md"), "w") as f:
        f.write(f"{len(rows)} runs from {folder}\n\n{table}\n")
    for m in metrics:
        if m != "new_tokens":
            plot(rows, m, os.path.join(out, f"report_{m}.png"))
    return table


def main(argv=None) -> None:
    from fiddler_jax.experiments.common import clear_errors

    ap = argparse.ArgumentParser(prog="fiddler-jax report", description=__doc__.splitlines()[0])
    ap.add_argument("folder", help="a `fiddler-jax bench -m` multirun folder (or any folder of result.json files)")
    ap.add_argument("--out", default=None, help="where to write report.* (default: the folder)")
    args = ap.parse_args(argv)

    @clear_errors
    def run():
        table = report(args.folder, args.out)
        print(f"wrote report.csv, report.md and plots to {args.out or args.folder}\n\n{table}")

    run()


if __name__ == "__main__":
    main()
