"""``fiddler-jax bench-jobs JOBS.yaml --out DIR``: several ``bench`` jobs in one process, so jobs whose engines
agree (model, placement, budget, KV reserve, latency model, slots) build Mixtral-8x7B once instead of once per
command (about 3 minutes each on the H100 machine, most of it pinning 70 GB of experts).

Each job is ``fiddler-jax bench <common overrides> <job overrides>``, composed from ``fiddler_jax/conf``
exactly as the command line would be; its ``result.json`` goes to ``DIR/NN_<label>/`` with its overrides
recorded, and a failed job leaves an ``error.txt`` there instead of stopping the rest. At the end
``fiddler-jax report DIR`` runs over this run's jobs. ``JOBS`` is a jobs file or the name of a table preset:
``fiddler_jax/conf/table/<name>.yaml`` holds the jobs of each table in docs/benchmarks.md (``bench-table`` runs
one as a Hydra job, on a cluster too). The jobs file::

    common: [model=mixtral_8x7b_random, hardware=rtx6000_24g, latency=fiddler_jax/runtime/latency_h100.json]
    jobs:
      - [planner=fiddler_overlap, trace=true]
      - [planner=fiddler]
      - [planner=cpu_only, kernel=xla, scenario.output_tokens=8]

A result set holds one run: ``DIR`` must be empty (or new), or ``--replace`` clears the previous bench-jobs run
there first -- only what its ``manifest.json`` lists (its job folders and report files), never other files. The
run's ``manifest.json`` lists its jobs (folder, overrides, status ``pending``/``running``/``ok``/``failed`` and
the error), the git SHA and the start and end times; ``report`` reads only the results it lists and names the
jobs that failed or never finished.

All jobs must share one ``hardware.gpu_budget``: XLA's allocator is capped at it when JAX starts, once per
process (:mod:`fiddler_jax.runtime.gpu_memory`).
"""
from __future__ import annotations

import argparse
import os
import re
import shutil

from omegaconf import OmegaConf

from fiddler_jax.errors import InvalidInputError
from fiddler_jax.experiments import CONF_DIR
from fiddler_jax.experiments.bench_config import compose, parse_jobs
from fiddler_jax.experiments.manifest import MANIFEST, TOOL, _now, load_manifest, write_manifest
from fiddler_jax.runtime.compiled_programs import release_if_near_mapping_limit



TABLE_DIR = os.path.join(CONF_DIR, "table")


def tables() -> list[str]:
    """The names of the table presets (``conf/table/<name>.yaml``)."""
    return sorted(f[:-5] for f in os.listdir(TABLE_DIR) if f.endswith(".yaml"))


def jobs_path(name_or_path: str) -> str:
    """A jobs file's path: ``name_or_path`` itself when it is a file, else the table preset of that name."""
    if os.path.isfile(name_or_path):
        return name_or_path
    preset = os.path.join(TABLE_DIR, f"{name_or_path}.yaml")
    if os.sep not in name_or_path and not name_or_path.endswith(".yaml") and os.path.isfile(preset):
        return preset
    raise InvalidInputError(f"jobs file {name_or_path} does not exist, and no table preset has that name; the "
                            f"tables: {', '.join(tables())}")


def load_jobs(path: str) -> tuple[list[str], list[list[str]]]:
    """(common overrides, per-job overrides) from a jobs file or table preset (:func:`jobs_path`); a clear error
    for anything else."""
    path = jobs_path(path)
    try:
        spec = OmegaConf.to_container(OmegaConf.load(path))
    except OSError as exc:
        raise InvalidInputError(f"cannot read jobs file {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        raise InvalidInputError(f"jobs file {path} is not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except Exception as exc:  # noqa: BLE001  (yaml's and OmegaConf's errors: the file is not a YAML mapping)
        raise InvalidInputError(f"jobs file {path} is not valid YAML: {_yaml_problem(exc)}") from None
    return parse_jobs(spec, path)


def _yaml_problem(exc: Exception) -> str:
    """One line: what the YAML parser found and where (line and column, 1-based)."""
    problem, mark = getattr(exc, "problem", None), getattr(exc, "problem_mark", None)
    if not problem:
        return " ".join(str(exc).split())
    where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
    context = getattr(exc, "context", None)
    return f"{problem}{where}" + (f", {context}" if context else "")


def label(job: list[str]) -> str:
    text = "_".join(o.split("=", 1)[1] if "=" in o else o for o in job) or "job"
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", text)[:80]


def _composition_problem(exc: Exception) -> str:
    """Hydra's composition error (and its cause) as one line: the unknown key or option and the valid options."""
    text = str(exc)
    if "Available options in" in text:  # an unknown group option: name it and list the valid ones
        head, _, rest = text.partition("Available options in")
        group, _, options = rest.split("Config search path:")[0].partition(":")
        head = " ".join(head.split()).removeprefix("In 'bench': ")
        return f"{head}; available options in{group}: {', '.join(options.split())}"
    parts = []
    for part in (text, str(exc.__cause__ or "")):
        lines = [line.strip() for line in part.splitlines() if line.strip() and not line.strip().startswith(
            ("full_key:", "object_type=", "reference_type=", "To append", "See https://"))]
        if lines:
            parts.append(" ".join(lines))
    if not parts:
        return type(exc).__name__
    return "".join(p if i == 0 else (" " if parts[i - 1].endswith((".", ":")) else ": ") + p
                   for i, p in enumerate(parts))


def compose_jobs(common: list[str], jobs: list[list[str]], source: str = "jobs") -> list:
    """Every job's config, composed before any runs (a typo fails first). A job that does not compose is one
    clear error naming the job, the override at fault (the first one whose addition breaks composition) and
    Hydra's reason."""
    configs, bad = [], []
    for n, job in enumerate(jobs):
        try:
            configs.append(compose(common + job))
        except Exception as exc:  # noqa: BLE001  (Hydra's and OmegaConf's composition errors)
            bad.append((n, job, exc))
    if not bad:
        return configs
    n, job, exc = bad[0]
    overrides = common + job
    at, reason = len(overrides) - 1, exc
    for i in range(len(overrides)):  # the first prefix of the overrides that fails ends with the culprit
        try:
            compose(overrides[: i + 1])
        except Exception as first:  # noqa: BLE001
            at, reason = i, first
            break
    more = f" (and {len(bad) - 1} more job{'s fail' if len(bad) > 2 else ' fails'} to compose)" if len(bad) > 1 else ""
    if 0 <= at < len(common):
        where, more = f"common override {common[at]!r}", ""
    else:
        where = f"job {n + 1} of {len(jobs)} ([{', '.join(job)}])" + (f": override {overrides[at]!r}" if job else "")
    raise InvalidInputError(f"{source}: {where} does not compose: {_composition_problem(reason)}{more}")


def check_jobs(common: list[str], configs: list, jobs: list[list[str]], source: str = "jobs") -> None:
    """What would fail every job's engine before it loads anything (``build.check_engine``: the planner's
    parameters, the KV reserve, the placement under the GPU budget; the scenario against the model's positions),
    checked for all jobs before the first runs, so that a jobs file with a wrong job costs no device time. One
    error lists every such job."""
    import copy

    from fiddler_jax.experiments.bench import fit_scenario
    from fiddler_jax.experiments.build import check_engine

    problems = []
    for n, (job, cfg) in enumerate(zip(jobs, configs)):
        if cfg.baseline is not None:
            continue
        try:
            trial = copy.deepcopy(cfg)
            fit_scenario(trial, common + job)
            check_engine(trial)
        except Exception as exc:  # noqa: BLE001  (InvalidInputError, PlannerError: the job's own error)
            problems.append(f"job {n + 1} ([{', '.join(job)}]): {type(exc).__name__}: {exc}")
    if problems:
        raise InvalidInputError(f"{source}: {len(problems)} of {len(jobs)} jobs cannot run; nothing ran; "
                                + "; ".join(problems))


def _remove(path: str) -> None:
    if os.path.islink(path) or not os.path.isdir(path):
        os.unlink(path)
    else:
        shutil.rmtree(path)


def prepare_out(out: str, folders: list[str], replace: bool) -> None:
    """Make ``out`` ready for a new run: new or empty, or (``replace``) holding a previous bench-jobs run, which is
    removed -- only what its manifest lists; everything else stays, and a new job folder may not collide with it.
    Refuses before removing anything."""
    if os.path.exists(out) and not os.path.isdir(out):
        raise InvalidInputError(f"--out {out} is not a folder")
    entries = sorted(os.listdir(out)) if os.path.isdir(out) else []
    if not entries:
        os.makedirs(out, exist_ok=True)
        return
    if not replace:
        shown = ", ".join(entries[:4]) + (f", ... ({len(entries)} entries)" if len(entries) > 4 else "")
        raise InvalidInputError(f"--out {out} is not empty ({shown}); a result set holds one run: pass --replace to "
                                "clear the previous bench-jobs run there (only what its manifest.json lists), or "
                                "choose a new folder")
    manifest = load_manifest(out)
    if manifest is None:
        raise InvalidInputError(f"--replace clears only what a previous bench-jobs run wrote, and {out} has no "
                                f"{MANIFEST} (not written by bench-jobs, or by one older than manifests): remove its "
                                "contents yourself or choose a new folder")
    ours = {MANIFEST, MANIFEST + ".tmp", *(j["folder"] for j in manifest["jobs"]),
            *manifest.get("report_files", [])}
    kept = [e for e in entries if e not in ours]
    clash = [f for f in folders if f in kept]
    if clash:
        raise InvalidInputError(f"--out {out} holds {', '.join(clash)}, which the previous run's manifest does not "
                                "list (not bench-jobs' to remove), under the name a new job writes: move it or "
                                "choose a new folder")
    removed = [e for e in entries if e in ours]
    for name in removed:
        _remove(os.path.join(out, name))
    print(f"--replace: removed the previous bench-jobs run in {out} (started {manifest.get('started', '?')}: "
          f"{len(removed)} entries)" + (f"; kept {len(kept)} it did not write: {', '.join(kept[:6])}" if kept else ""),
          flush=True)


def run_jobs(common: list[str], jobs: list[list[str]], out: str, *, replace: bool = False,
             jobs_file: str | None = None) -> list[tuple[str, str]]:
    """Run every job into ``out`` (new or empty; ``replace``: clear the previous bench-jobs run there first,
    :func:`prepare_out`) and keep ``out/manifest.json`` up to date; returns (folder, "ok" or the error line)
    per job."""
    from fiddler_jax.experiments import bench
    from fiddler_jax.provenance import git_dirty, git_sha

    configs = compose_jobs(common, jobs, jobs_file or "jobs")  # every job composes before any runs
    check_jobs(common, configs, jobs, jobs_file or "jobs")  # and fits its engine
    budgets = {str(c.hardware.gpu_budget) for c in configs if c.baseline is None}
    if len(budgets) > 1:
        raise InvalidInputError(f"the jobs ask for several GPU budgets ({', '.join(sorted(budgets))}); XLA's "
                                "allocator is capped once per process: one jobs file per budget")
    names = [f"{n:02d}_{label(job)}" for n, job in enumerate(jobs)]
    prepare_out(out, names, replace)
    source = os.path.abspath(jobs_file) if jobs_file and os.path.isfile(jobs_file) else jobs_file  # or table=<name>
    manifest = {"tool": TOOL, "format": 1, "jobs_file": source,
                "common": list(common), "started": _now(), "finished": None, "git_sha": git_sha(),
                "git_dirty": git_dirty(),
                "jobs": [{"folder": name, "overrides": list(job), "status": "pending", "error": None}
                         for name, job in zip(names, jobs)], "report_files": []}
    write_manifest(out, manifest)
    capped = [c for c in configs if c.baseline is None and c.hardware.gpu_budget is not None]
    if capped:
        from fiddler_jax.runtime.gpu_memory import cap_xla_allocator

        cap_xla_allocator(capped[0].hardware.gpu_budget)
    status = []
    for n, (job, cfg, entry) in enumerate(zip(jobs, configs, manifest["jobs"])):
        folder = os.path.join(out, entry["folder"])
        os.makedirs(folder, exist_ok=True)
        entry["status"] = "running"
        write_manifest(out, manifest)
        print(f"[{n + 1}/{len(jobs)}] fiddler-jax bench {' '.join(common + job)}", flush=True)
        try:
            result = bench.run_bench(cfg, folder, job_overrides=common + job)
            print(bench.table(result), flush=True)
            status.append((folder, "ok"))
            entry["status"] = "ok"
        except Exception as exc:  # one failed job (over budget, out of memory) must not lose the others
            line = bench.record_failure(folder, exc)
            print(f"job {n} failed: {line}", flush=True)
            status.append((folder, line))
            entry.update(status="failed", error=line)
        release_if_near_mapping_limit()  # not after every job: the next job may reuse this job's engine and programs
        write_manifest(out, manifest)
    manifest["finished"] = _now()
    write_manifest(out, manifest)
    return status


def main() -> None:
    ap = argparse.ArgumentParser(prog="fiddler-jax bench-jobs", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("jobs", help="YAML file with `common:` and `jobs:` override lists, or the name of a table preset "
                                 "(fiddler_jax/conf/table/<name>.yaml)")
    ap.add_argument("--out", help="folder for the jobs' result.json files, the manifest and the report (new or "
                                  "empty, unless --replace); required unless --check")
    ap.add_argument("--check", action="store_true",
                    help="only compose every job and check that its engine fits (planner parameters, KV reserve, "
                         "placement under the budget), without loading weights or using the GPU; then exit")
    ap.add_argument("--replace", action="store_true",
                    help="--out holds a previous bench-jobs run: remove what its manifest.json lists (its job "
                         "folders and report files; nothing else) before this run")
    args = ap.parse_args()
    from fiddler_jax.experiments import report
    from fiddler_jax.experiments.common import clear_errors

    path = clear_errors(jobs_path)(args.jobs)
    common, jobs = clear_errors(load_jobs)(path)
    if args.check:
        configs = clear_errors(compose_jobs)(common, jobs, args.jobs)
        clear_errors(check_jobs)(common, configs, jobs, args.jobs)
        print(f"{args.jobs}: all {len(jobs)} jobs compose and fit their engines")
        return
    if not args.out:
        ap.error("--out is required (unless --check)")
    status = clear_errors(run_jobs)(common, jobs, args.out, replace=args.replace, jobs_file=path)

    if any(s == "ok" for _, s in status):
        report.main([args.out])  # lists every job of this run's manifest: ok, failed or missing
    else:
        for folder, s in status:
            print(f"{os.path.basename(folder)}: {s}")
    if any(s != "ok" for _, s in status):
        raise SystemExit(1)


if __name__ == "__main__":
    main()
