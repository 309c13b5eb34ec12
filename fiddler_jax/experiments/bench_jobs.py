"""``fiddler-jax bench-jobs JOBS.yaml --out DIR``: several ``bench`` jobs in one process, so jobs whose engines
agree (model, placement, budget, KV reserve, latency model, slots) build Mixtral-8x7B once instead of once per
command (about 3 minutes each on the H100 machine, most of it pinning 70 GB of experts).

Each job is ``fiddler-jax bench <common overrides> <job overrides>``, composed from ``fiddler_jax/conf``
exactly as the command line would be; its ``result.json`` goes to ``DIR/NN_<label>/`` with its overrides
recorded, and a failed job leaves an ``error.txt`` there instead of stopping the rest. At the end
``fiddler-jax report DIR`` runs over all of them (``benchmarks/jobs/`` holds the jobs files of the published
runs). The jobs file::

    common: [model=mixtral_8x7b_random, hardware=rtx6000_24g, latency=fiddler_jax/runtime/latency_h100.json]
    jobs:
      - [planner=fiddler_overlap, trace=true]
      - [planner=fiddler]
      - [planner=cpu_only, kernel=xla, scenario.output_tokens=8]

All jobs must share one ``hardware.gpu_budget``: XLA's allocator is capped at it when JAX starts, once per
process (:mod:`fiddler_jax.runtime.gpu_memory`).
"""
from __future__ import annotations

import argparse
import os
import re
import traceback

from omegaconf import OmegaConf

from fiddler_jax.errors import FiddlerError, InvalidInputError


def load_jobs(path: str) -> tuple[list[str], list[list[str]]]:
    """(common overrides, per-job overrides) from a jobs file; a clear error for anything else."""
    if not os.path.isfile(path):
        raise InvalidInputError(f"jobs file {path} does not exist")
    spec = OmegaConf.to_container(OmegaConf.load(path))
    if not isinstance(spec, dict) or not isinstance(spec.get("jobs"), list) or not spec["jobs"]:
        raise InvalidInputError(f"{path} must hold a non-empty list `jobs:` of override lists (and optionally "
                                "`common:`); see `fiddler-jax bench-jobs --help`")
    common = spec.get("common") or []
    jobs = spec["jobs"]
    for item in [common, *jobs]:
        if not isinstance(item, list) or not all(isinstance(o, str) and "=" in o for o in item):
            raise InvalidInputError(f"{path}: {item!r} is not a list of key=value overrides")
    return [str(o) for o in common], [[str(o) for o in job] for job in jobs]


def label(job: list[str]) -> str:
    text = "_".join(o.split("=", 1)[1] if "=" in o else o for o in job) or "job"
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", text)[:80]


def compose(overrides: list[str]):
    """The bench config for these overrides, as ``fiddler-jax bench`` would compose it."""
    from hydra import compose as hydra_compose, initialize_config_dir

    from fiddler_jax.experiments import schemas  # noqa: F401  (registers bench_schema)
    from fiddler_jax.experiments.common import CONF_DIR

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return hydra_compose(config_name="bench", overrides=overrides)


def run_jobs(common: list[str], jobs: list[list[str]], out: str) -> list[tuple[str, str]]:
    """Run every job; returns (folder, "ok" or the error line) per job."""
    from fiddler_jax.experiments.bench import run_bench, table

    configs = [compose(common + job) for job in jobs]  # every job composes before any runs: typos fail first
    budgets = {str(c.hardware.gpu_budget) for c in configs if c.baseline is None}
    if len(budgets) > 1:
        raise InvalidInputError(f"the jobs ask for several GPU budgets ({', '.join(sorted(budgets))}); XLA's "
                                "allocator is capped once per process: one jobs file per budget")
    capped = [c for c in configs if c.baseline is None and c.hardware.gpu_budget is not None]
    if capped:
        from fiddler_jax.runtime.gpu_memory import cap_xla_allocator

        cap_xla_allocator(capped[0].hardware.gpu_budget)
    status = []
    for n, (job, cfg) in enumerate(zip(jobs, configs)):
        folder = os.path.join(out, f"{n:02d}_{label(job)}")
        os.makedirs(folder, exist_ok=True)
        print(f"[{n + 1}/{len(jobs)}] fiddler-jax bench {' '.join(common + job)}", flush=True)
        try:
            result = run_bench(cfg, folder, job_overrides=common + job)
            print(table(result), flush=True)
            status.append((folder, "ok"))
        except Exception as exc:  # one failed job (over budget, out of memory) must not lose the others
            line = f"{type(exc).__name__}: {exc}".splitlines()[0]
            with open(os.path.join(folder, "error.txt"), "w") as f:
                f.write(traceback.format_exc() if not isinstance(exc, FiddlerError) else f"{line}\n")
            print(f"job {n} failed: {line}", flush=True)
            status.append((folder, line))
    return status


def main() -> None:
    ap = argparse.ArgumentParser(prog="fiddler-jax bench-jobs", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("jobs", help="YAML file with `common:` and `jobs:` override lists")
    ap.add_argument("--out", required=True, help="folder for the jobs' result.json files and the report")
    args = ap.parse_args()
    from fiddler_jax.experiments import report
    from fiddler_jax.experiments.common import clear_errors

    common, jobs = clear_errors(load_jobs)(args.jobs)
    status = clear_errors(run_jobs)(common, jobs, args.out)

    if any(s == "ok" for _, s in status):
        report.main([args.out])
    for folder, s in status:
        print(f"{os.path.basename(folder)}: {s}")
    if any(s != "ok" for _, s in status):
        raise SystemExit(1)


if __name__ == "__main__":
    main()
