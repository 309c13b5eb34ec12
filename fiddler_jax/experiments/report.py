"""``fiddler-jax report <folder>``: every ``result.json`` under a folder (a Hydra multirun, or several) as one
table: ``report.csv`` (all runs, every metric's median/min/max), ``report.md`` (the medians, one row per run,
labelled by the run's overrides) and one PNG per metric (``report_<metric>.png``: median with the min–max
spread, one bar per run). Prints the markdown table last (and after it, when a job failed or is missing, one
line saying so).

A ``fiddler-jax bench-jobs`` folder is reported from its ``manifest.json``: only the results of the jobs that run
lists as ``ok`` (never a ``result.json`` left by another run), with a line per job saying which failed (and why)
or never finished, printed and in ``report.md``. In a Hydra multirun folder, the jobs of its ``multirun.yaml``
without a ``result.json`` (failed, or never started: a failed job stops the sweep) are named as missing. A
``result.json`` of the wrong shape is refused naming the file and the field."""
from __future__ import annotations

import argparse
import csv
import glob
import json
import os
from dataclasses import dataclass, field

from fiddler_jax.errors import InvalidInputError

KEY_METRICS = ("tokens_per_s", "decode_tokens_per_s", "ttft_s", "latency_s")
LIMIT_NUMBERS = ("two_lane_decode_tokens_per_s", "two_lanes_together_decode_tokens_per_s", "cpu_lane_read_GBps")


@dataclass
class RunSet:
    """What a report covers: the results it tables, and (bench-jobs manifests, or multiruns with missing runs) a
    line per job with its status and a summary; ``ignored``: result files present but not this run's."""

    results: list[tuple[str, dict]]
    jobs: list[tuple[str, str]] = field(default_factory=list)
    summary: str | None = None
    ignored: list[str] = field(default_factory=list)
    manifest: dict | None = None

    @property
    def complete(self) -> bool:
        return all(status == "ok" for _, status in self.jobs)


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_result(path: str, r) -> dict:
    """``r`` (a loaded ``result.json``) if it has the shape ``fiddler-jax bench`` writes, as far as the report
    reads it; else a clear error naming the file and the field."""
    def bad(what: str) -> InvalidInputError:
        return InvalidInputError(f"{path} is not a bench result: {what}")

    if not isinstance(r, dict):
        kind = {list: "a JSON list", str: "a JSON string", bool: "a JSON boolean", type(None): "null"}
        raise bad(f"expected a JSON object with `metrics`, got {kind.get(type(r), 'a JSON number')}")
    if "metrics" not in r:
        raise bad("it has no `metrics` (the timed runs' numbers `fiddler-jax bench` writes)")
    metrics = r["metrics"]
    if not isinstance(metrics, dict):
        raise bad(f"`metrics` must be a JSON object of metric -> {{median, min, max}}, got {_short(metrics)}")
    for name, stats in metrics.items():
        if not isinstance(stats, dict):
            raise bad(f"metrics[{name!r}] must be {{median, min, max}}, got {_short(stats)}")
        for key in ("median", "min", "max"):
            if key in stats and not _number(stats[key]):
                raise bad(f"metrics[{name!r}][{key!r}] must be a number, got {_short(stats[key])}")
    overrides = r.get("overrides", [])
    if not isinstance(overrides, list) or not all(isinstance(o, str) for o in overrides):
        raise bad(f"`overrides` must be a list of key=value strings, got {_short(overrides)}")
    for key in ("config", "hardware"):
        if key in r and not isinstance(r[key], dict):
            raise bad(f"`{key}` must be a JSON object, got {_short(r[key])}")
    if not isinstance(r.get("config", {}).get("planner", {}), dict):
        raise bad(f"config['planner'] must be a JSON object, got {_short(r['config']['planner'])}")
    limits = r.get("limits")
    if limits is not None:
        if not isinstance(limits, dict):
            raise bad(f"`limits` must be a JSON object or null, got {_short(limits)}")
        for key in LIMIT_NUMBERS:
            if limits.get(key) is not None and not _number(limits[key]):
                raise bad(f"limits[{key!r}] must be a number or null, got {_short(limits[key])}")
        ceilings = limits.get("ceilings_GBps")
        if ceilings is not None and not (isinstance(ceilings, dict) and all(
                v is None or _number(v) for v in ceilings.values())):
            raise bad(f"limits['ceilings_GBps'] must be a JSON object of numbers, got {_short(ceilings)}")
    if r.get("git_sha") is not None and not isinstance(r["git_sha"], str):
        raise bad(f"`git_sha` must be a string, got {_short(r['git_sha'])}")
    return r


def read_result(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            result = json.load(f)
    except (OSError, ValueError) as exc:  # ValueError: JSONDecodeError, UnicodeDecodeError
        raise InvalidInputError(f"{path} is not a readable result file ({exc})") from None
    return check_result(path, result)


def find_results(folder: str) -> list[tuple[str, dict]]:
    """(path, result) of every result.json under ``folder``, in path order (sweep order for Hydra multiruns)."""
    folder = os.path.expanduser(folder)
    if not os.path.isdir(folder):
        raise InvalidInputError(f"{folder} is not a folder; give the multirun folder of a `fiddler-jax bench -m` run")
    paths = glob.glob(os.path.join(folder, "**", "result.json"), recursive=True)
    if not paths:
        raise InvalidInputError(f"no result.json under {folder}: run `fiddler-jax bench` (with -m for a sweep) "
                                "and point report at its output folder")

    order = _order(folder)
    return [(path, read_result(path)) for path in sorted(paths, key=order)]


def _order(folder: str):
    def order(path):  # Hydra job folders are numbered: sort 2 before 10
        rel = os.path.relpath(path, folder).split(os.sep)
        return [(0, int(p), "") if p.isdigit() else (1, 0, p) for p in rel]

    return order


def _manifest_runs(folder: str, manifest: dict) -> RunSet:
    """The results a bench-jobs manifest lists as ok, and a line per job."""
    from fiddler_jax.experiments.manifest import MANIFEST

    results, jobs = [], []
    for job in manifest["jobs"]:
        name, status = job["folder"], job["status"]
        path = os.path.join(folder, name, "result.json")
        if status == "ok" and os.path.isfile(path):
            results.append((path, read_result(path)))
            jobs.append((name, "ok"))
        elif status == "ok":
            jobs.append((name, "missing: its result.json is gone"))
        elif status == "failed":
            jobs.append((name, f"failed: {job.get('error') or 'see its error.txt'}"))
        elif status == "running":
            jobs.append((name, "missing: the run stopped during this job (no result)"))
        else:
            jobs.append((name, "missing: the run stopped before this job started"))
    ours = {os.path.abspath(os.path.join(folder, job["folder"])) for job in manifest["jobs"]}
    ignored = sorted(os.path.relpath(p, folder) for p in glob.glob(os.path.join(folder, "**", "result.json"),
                                                                    recursive=True)
                     if os.path.dirname(os.path.abspath(p)) not in ours)
    ok = sum(status == "ok" for _, status in jobs)
    failed = sum(status.startswith("failed") for _, status in jobs)
    missing = len(jobs) - ok - failed
    sha = str(manifest.get("git_sha") or "unknown")[:12] + ("+dirty" if manifest.get("git_dirty") else "")
    ended = f"finished {manifest['finished']}" if manifest.get("finished") else "did not finish"
    summary = (f"bench-jobs run started {manifest.get('started', '?')} (git {sha}), {ended}; {ok} of {len(jobs)} "
               f"jobs ok" + (f", {failed} failed" if failed else "") + (f", {missing} missing" if missing else ""))
    if not results:
        raise InvalidInputError(f"none of the {len(jobs)} jobs that {os.path.join(folder, MANIFEST)} lists has a "
                                "result: " + "; ".join(f"{n}: {s}" for n, s in jobs))
    return RunSet(results, jobs, summary, ignored, manifest)


def sweep_jobs(folder: str) -> list[list[str]] | None:
    """The overrides of every job of the Hydra multirun whose sweep folder this is (its ``multirun.yaml``), in
    job order -- job ``n`` writes ``folder/n/`` -- expanded as Hydra's basic sweeper expands them; None when this
    is not such a folder or the sweep cannot be read back."""
    path = os.path.join(folder, "multirun.yaml")
    if not os.path.isfile(path):
        return None
    try:
        from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
        from hydra.core.override_parser.overrides_parser import OverridesParser
        from omegaconf import OmegaConf

        hydra = OmegaConf.load(path).hydra
        if (not str(hydra.sweeper._target_).endswith("BasicSweeper")
                or OmegaConf.to_container(hydra.sweep)["subdir"] != "${hydra.job.num}"):
            return None
        params = hydra.sweeper.params
        params = {} if params is None else OmegaConf.to_container(params)
        args = [f"{k}={v}" for k, v in params.items()] + list(hydra.overrides.task)
        overrides = OverridesParser.create().parse_overrides(args)
        return [job for batch in BasicSweeper.split_arguments(overrides, None) for job in batch]
    except Exception:  # noqa: BLE001  (another sweeper, another Hydra: no list of jobs, no missing runs named)
        return None


def _first_line(path: str) -> str:
    """An error.txt's message: its one line, or a traceback's last line."""
    with open(path, errors="replace") as f:
        lines = [line.strip() for line in f if line.strip()]
    return (lines[-1] if len(lines) > 1 else lines[0] if lines else "see its error.txt")[:300]


def _missing_sweep_runs(folder: str, results: list[tuple[str, dict]]) -> list[tuple[str, str]]:
    """A line per job of a Hydra multirun folder when some job has no result.json (it failed, or the sweep
    stopped before it); empty when none is missing or this is not a sweep folder."""
    jobs = sweep_jobs(folder)
    if not jobs:
        return []
    have = {os.path.dirname(os.path.abspath(p)) for p, _ in results}
    lines = []
    for n, job in enumerate(jobs):
        run = os.path.abspath(os.path.join(folder, str(n)))
        if run in have:
            lines.append((str(n), "ok"))
        elif os.path.isfile(os.path.join(run, "error.txt")):
            lines.append((str(n), f"failed ({' '.join(job)}): {_first_line(os.path.join(run, 'error.txt'))}"))
        elif os.path.isdir(run):
            lines.append((str(n), f"missing: no result.json ({' '.join(job)}): the run was stopped (killed, "
                                  f"pre-empted or out of time: see the launcher's logs)"))
        else:
            lines.append((str(n), f"missing: never started ({' '.join(job)}): the sweep stopped before it"))
    return lines if any(status != "ok" for _, status in lines) else []


def collect(folder: str) -> RunSet:
    """The runs a report of ``folder`` covers: a bench-jobs folder's manifest, or every result.json under it."""
    from fiddler_jax.experiments.manifest import load_manifest

    folder = os.path.expanduser(folder)
    manifest = load_manifest(folder) if os.path.isdir(folder) else None
    if manifest is not None:
        return _manifest_runs(folder, manifest)
    results = find_results(folder)
    jobs = _missing_sweep_runs(folder, results)
    summary = None
    if jobs:
        missing = sum(status != "ok" for _, status in jobs)
        summary = f"{missing} of the sweep's {len(jobs)} runs have no result.json"
    return RunSet(results, jobs, summary)


def rows_of(results: list[tuple[str, dict]], folder: str,
            planned: list[list[str]] | None = None) -> tuple[list[dict], list[str], list[str]]:
    """Flat rows; the override keys whose values differ across runs (the sweep's axes; with one run, its first
    override) -- across ``planned`` (every job's overrides, a failed one's too) when given; the metric names."""
    overrides = [dict(o.split("=", 1) for o in r.get("overrides", []) if "=" in o) for _, r in results]
    swept = overrides if planned is None else [dict(o.split("=", 1) for o in job if "=" in o) for job in planned]
    keys = sorted({k for o in swept for k in o})
    axes = [k for k in keys if len({o.get(k) for o in swept}) > 1] or keys[:1]  # what the sweep varied
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


def write_report(folder: str, out: str | None = None) -> tuple[str, RunSet]:
    """Write report.csv, report.md and the plots into ``out`` (default: ``folder``); returns the markdown table
    and the runs it covers (:func:`collect`)."""
    runs = collect(folder)
    planned = None if runs.manifest is None else [
        list(runs.manifest.get("common") or []) + list(job.get("overrides") or []) for job in runs.manifest["jobs"]]
    rows, axes, metrics = rows_of(runs.results, os.path.expanduser(folder), planned)
    out = os.path.expanduser(out or folder)
    os.makedirs(out, exist_ok=True)
    written = ["report.csv", "report.md"]
    with open(os.path.join(out, "report.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    table = markdown(rows, axes, metrics)
    with open(os.path.join(out, "report.md"), "w") as f:
        f.write(f"{len(rows)} runs from {folder}" + (f": {runs.summary}" if runs.summary else "") + f"\n\n{table}\n")
        if runs.jobs:
            f.write(f"\n{'Jobs (manifest.json)' if runs.manifest else 'Runs'}:\n")
            f.write("".join(f"- {name}: {status}\n" for name, status in runs.jobs))
        if runs.ignored:
            f.write(f"\nNot this run's (not in manifest.json), not reported: {', '.join(runs.ignored)}\n")
    for m in metrics:
        if m != "new_tokens":
            path = os.path.join(out, f"report_{m}.png")
            plot(rows, m, path)
            if os.path.exists(path):
                written.append(os.path.basename(path))
    if runs.manifest is not None and os.path.samefile(out, os.path.expanduser(folder)):
        from fiddler_jax.experiments.manifest import write_manifest

        # recorded as this run's files, so `bench-jobs --replace` removes them with it
        runs.manifest["report_files"] = sorted(set(runs.manifest.get("report_files", [])) | set(written))
        write_manifest(out, runs.manifest)
    return table, runs


def report(folder: str, out: str | None = None) -> str:
    """Write report.csv, report.md and the plots into ``out`` (default: ``folder``); returns the markdown."""
    return write_report(folder, out)[0]


def main(argv=None) -> None:
    from fiddler_jax.experiments.common import clear_errors

    ap = argparse.ArgumentParser(prog="fiddler-jax report", description=__doc__.splitlines()[0])
    ap.add_argument("folder", help="a `fiddler-jax bench -m` multirun folder (or any folder of result.json files)")
    ap.add_argument("--out", default=None, help="where to write report.* (default: the folder)")
    args = ap.parse_args(argv)

    @clear_errors
    def run():
        table, runs = write_report(args.folder, args.out)
        print(f"wrote report.csv, report.md and plots to {args.out or args.folder}\n")
        if runs.jobs:
            print(runs.summary)
            print("".join(f"  {name}: {status}\n" for name, status in runs.jobs))
        if runs.ignored:
            print(f"not this run's (not in manifest.json), not reported: {', '.join(runs.ignored)}\n")
        print(table)
        if not runs.complete:
            print(f"\nincomplete: {runs.summary} (the list above says which)")

    run()


if __name__ == "__main__":
    main()
