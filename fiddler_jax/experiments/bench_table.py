"""``fiddler-jax bench-table table=<name>``: one table of docs/benchmarks.md as one Hydra job.

A table preset (``conf/table/<name>.yaml``) is a jobs file: ``common:`` overrides and one override list per job.
This app runs it exactly as ``fiddler-jax bench-jobs <name> --out <this job's folder>`` does (every job checked
before the first runs, one process, an engine built once for the jobs that agree on it, ``error.txt`` for a job
that fails, ``manifest.json`` and the report), so a Hydra launcher can run tables as its jobs:
``-m table=a,b hydra/launcher=slurm`` gives each table a node, and the table's runs share their engine there.
Which mode pays: ``bench -m`` sweeps build an engine per run and spread runs over as many GPUs as there are, which
pays when runs are long or the nodes many; ``bench-table`` builds an engine once per group of jobs that share it,
on one GPU, which pays when the build dominates (about 3 minutes for Mixtral-8x7B's engine, against 10-60 s per
run).
"""
from __future__ import annotations

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import OmegaConf

from fiddler_jax.errors import InvalidInputError
from fiddler_jax.experiments.bench_config import parse_jobs
from fiddler_jax.experiments.common import CONF_DIR, clear_errors


def run_table(cfg, out: str, name: str) -> list[tuple[str, str]]:
    """Run the table ``cfg.table`` into ``out`` and write its report; (folder, status) per job."""
    from fiddler_jax.experiments import bench_jobs, report

    if name is None or "table" not in cfg:
        raise InvalidInputError(f"bench-table needs table=<name>; the tables: {', '.join(bench_jobs.tables())}")
    common, jobs = parse_jobs(OmegaConf.to_container(cfg.table, resolve=True), f"table {name}")
    status = bench_jobs.run_jobs(common, jobs, out, jobs_file=f"table={name}")
    if any(s == "ok" for _, s in status):
        report.main([out])
    return status


@hydra.main(config_path=CONF_DIR, config_name="bench_table", version_base="1.3")
@clear_errors
def main(cfg) -> None:
    from fiddler_jax.experiments.bench import record_failure

    out = HydraConfig.get().runtime.output_dir
    name = HydraConfig.get().runtime.choices.get("table")
    try:
        status = run_table(cfg, out, name)
    except Exception as exc:  # the job's folder says why it has no results (a sweep shows it per table)
        record_failure(out, exc)
        raise
    failed = [f"{folder.rsplit('/', 1)[-1]}: {s}" for folder, s in status if s != "ok"]
    if failed:
        raise InvalidInputError(f"table {name}: {len(failed)} of {len(status)} jobs failed ({'; '.join(failed)}); "
                                f"their error.txt files are in {out}")


if __name__ == "__main__":
    main()
