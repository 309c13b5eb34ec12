"""Sweeps through Hydra's submitit launchers: a real sweep of the bundled model as local processes
(hydra/launcher=local), read back by report with its failed run named; the Slurm launcher's config composes and the
sbatch script submitit would write asks for one GPU, a whole node, every core and the job's pinned experts in
host memory."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from omegaconf import OmegaConf

import fiddler_jax.experiments.bench  # noqa: F401  (registers the bench schema)
from fiddler_jax.experiments import cluster, report
from fiddler_jax.experiments.model_group import random_model_config
from fiddler_jax.experiments.common import CONF_DIR
from fiddler_jax.runtime.placement import place

pytest.importorskip("hydra_plugins.hydra_submitit_launcher")


def test_a_local_launcher_sweep_runs_each_job_in_its_own_process_and_report_names_the_failed_one(tmp_path):
    sweep = tmp_path / "sweep"
    cmd = [sys.executable, "-m", "fiddler_jax.cli", "bench", "-m", "planner=cpu_only,gpu_only",
           "placement.resident_experts=4", "repeats=1", "warmup=0", "scenario.input_tokens=16",
           "scenario.output_tokens=3", "hydra/launcher=local", "hydra.sweeper.max_batch_size=1",
           f"hydra.sweep.dir={sweep}"]
    subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600,
                   env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert (sweep / "0" / "result.json").is_file() and not (sweep / "1" / "result.json").exists()
    jobs = {p.name for p in (sweep / ".submitit").iterdir() if p.name != "%j"}
    assert len(jobs) == 2  # one submitit job (process) per run
    assert "gpu_only" in (sweep / "1" / "error.txt").read_text()
    runs = report.collect(str(sweep))
    assert [r["config"]["planner"]["name"] for _, r in runs.results] == ["cpu_only"]
    status = dict(runs.jobs)
    assert status["0"] == "ok"
    assert status["1"].startswith("failed (planner=gpu_only") and "not on the GPU" in status["1"]


def test_the_slurm_launcher_asks_for_a_whole_node_one_gpu_and_the_pinned_experts(tmp_path, monkeypatch):
    from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf
    from submitit import AutoExecutor
    from submitit.slurm.slurm import SlurmExecutor

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("bench", overrides=["hydra/launcher=slurm", "model=mixtral_8x7b_random",
                                          "hardware=rtx6000_24g", "hydra.launcher.partition=gpu",
                                          "hydra.launcher.account=lab"], return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    launcher = OmegaConf.to_container(cfg.hydra.launcher, resolve=True)
    assert launcher["_target_"].endswith("SlurmLauncher")
    # host memory: the experts that 24 GiB leaves on the host, a quarter more, and the process's base
    model = random_model_config(cfg.model.geometry, cfg.model.name)
    placed = place(model, "24GiB", itemsize=2, max_context=4096)
    pinned = placed.offloaded_count * placed.memory.expert
    assert 150 < placed.offloaded_count < 256
    assert launcher["mem_gb"] == cluster.BASE_GB + math.ceil(pinned * 1.25 / 2**30)
    # the sbatch script submitit writes from these parameters, as the launcher passes them (without srun here)
    monkeypatch.setattr(SlurmExecutor, "affinity", classmethod(lambda cls: 1))
    executor = AutoExecutor(cluster="slurm", folder=str(tmp_path))
    base = set(OmegaConf.structured(BaseQueueConf).keys())
    executor.update_parameters(**{k if k in base else f"slurm_{k}": v for k, v in launcher.items()
                                  if k not in ("_target_", "submitit_folder", "max_num_timeout")})
    script = executor._executor._make_submission_file_text("python -m fiddler_jax.cli bench", "uid")
    for line in ("--gpus-per-node=1", "--exclusive", "--cpus-per-task=16", f"--mem={launcher['mem_gb']}GB",
                 "--ntasks-per-node=1", "--nodes=1", "--partition=gpu", "--account=lab", "--time=60"):
        assert f"#SBATCH {line}\n" in script, line


def test_host_memory_covers_every_expert_when_the_budget_is_the_gpus_and_falls_back_without_a_model():
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        auto = compose("bench", overrides=["model=qwen3_30b_a3b_random", "hardware=auto"])
        folder = compose("bench", overrides=["model=mixtral_8x7b", "model.path=/nonexistent/mixtral"])
    model = random_model_config(auto.model.geometry, auto.model.name)
    every = 48 * 128 * 3 * 2048 * 768 * 2
    assert cluster.pinned_expert_bytes(model, None, "bfloat16") == every
    assert cluster.host_memory_gb(auto) == cluster.BASE_GB + math.ceil(every * 1.25 / 2**30)
    assert cluster.host_memory_gb(folder) == cluster.FALLBACK_GB
    # int8 experts are pinned at half the bytes, and at a budget more of them are resident
    int8_expert = 3 * 2048 * 768 + (768 + 768 + 2048) * 4  # q bytes, and a float32 scale per output row
    assert cluster.pinned_expert_bytes(model, None, "bfloat16", "int8") == 48 * 128 * int8_expert
    bf16, int8 = (cluster.pinned_expert_bytes(model, "16GiB", "bfloat16", p) for p in ("bf16", "int8"))
    assert int8 < bf16 / 2
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        quantised = compose("bench", overrides=["model=qwen3_30b_a3b_random", "hardware=auto",
                                                "model.expert_precision=int4"])
    assert cluster.host_memory_gb(quantised) - cluster.BASE_GB < (cluster.host_memory_gb(auto) - cluster.BASE_GB) / 3


def _tiny_tables(root) -> str:
    """A config folder with two table presets on the bundled model (each two jobs sharing one engine, one of
    them with a job that fails when it runs); ``hydra.searchpath`` adds it beside fiddler_jax/conf."""
    (root / "table").mkdir(parents=True)
    common = "[placement.resident_experts=4, repeats=1, warmup=0, scenario.input_tokens=16, scenario.output_tokens=3]"
    (root / "table" / "tiny_a.yaml").write_text(f"common: {common}\njobs:\n  - [planner=cpu_only]\n"
                                                "  - [planner=fiddler]\n")
    (root / "table" / "tiny_b.yaml").write_text(f"common: {common}\njobs:\n  - [planner=fiddler_overlap]\n"
                                                "  - [planner=fiddler_overlap, prompts_file=/nonexistent/prompts.txt]\n")
    return f"file://{root}"


def test_bench_table_sweep_runs_each_table_as_one_job_with_its_report(tmp_path):
    """`bench-table -m table=a,b hydra/launcher=local`: one submitit process per table; each table's folder holds
    its jobs' results, manifest and report, a job that fails at run time leaves error.txt there and fails its
    table's job (named on the one error line), and the other table is complete."""
    sweep = tmp_path / "sweep"
    cmd = [sys.executable, "-m", "fiddler_jax.cli", "bench-table", "-m", "table=tiny_a,tiny_b",
           f"hydra.searchpath=[{_tiny_tables(tmp_path / 'conf')}]", "hydra/launcher=local",
           "hydra.sweeper.max_batch_size=1", f"hydra.sweep.dir={sweep}"]
    r = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600,
                       env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert {p.name for p in (sweep / ".submitit").iterdir() if p.name != "%j"}.__len__() == 2  # one per table
    a, b = sweep / "tiny_a", sweep / "tiny_b"
    assert (a / "00_cpu_only" / "result.json").is_file() and (a / "01_fiddler" / "result.json").is_file()
    assert (a / "report.md").is_file() and "cpu_only" in (a / "report.md").read_text()
    runs = report.collect(str(a))
    assert sorted(r["config"]["planner"]["name"] for _, r in runs.results) == ["cpu_only", "fiddler"]
    assert (b / "00_fiddler_overlap" / "result.json").is_file()
    assert "/nonexistent/prompts.txt" in (b / "01_fiddler_overlap_-nonexistent-prompts.txt" / "error.txt").read_text()
    manifest = json.loads((b / "manifest.json").read_text())
    assert manifest["jobs_file"] == "table=tiny_b" and [j["status"] for j in manifest["jobs"]] == ["ok", "failed"]
    assert r.returncode != 0 and "table tiny_b: 1 of 2 jobs failed" in r.stderr + r.stdout


def test_bench_jobs_takes_a_table_name_and_every_table_fits_and_sizes_its_cluster_job():
    """Every table preset composes and fits its engine (`bench-jobs <name> --check`, from the configs alone), an
    unknown name lists the tables, and a `bench-table` job asks Slurm for the host memory of the table's largest
    job (decode at 24 GiB on Mixtral: the experts 24 GiB leaves on the host, a quarter more and the base)."""
    from fiddler_jax.errors import InvalidInputError
    from fiddler_jax.experiments import bench_jobs

    names = bench_jobs.tables()
    assert {"decode_24g", "prefill_24g", "beam_24g", "all_resident_h200", "hf_accelerate_24g", "kernel_xla_24g",
            "qwen3_decode_16g", "qwen3_prefill_16g", "qwen3_beam_16g"} <= set(names)
    for name in names:
        common, jobs = bench_jobs.load_jobs(name)
        bench_jobs.check_jobs(common, bench_jobs.compose_jobs(common, jobs, name), jobs, name)
    with pytest.raises(InvalidInputError, match="no table preset has that name; the tables: all_resident_h200, "):
        bench_jobs.load_jobs("decode_25g")
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("bench_table", overrides=["table=decode_24g", "hydra/launcher=slurm"], return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    mem = OmegaConf.to_container(cfg.hydra.launcher, resolve=True)["mem_gb"]
    model = random_model_config(None)
    placed = place(model, "24GiB", itemsize=2, max_context=4096)
    assert mem == cluster.BASE_GB + math.ceil(placed.offloaded_count * placed.memory.expert * 1.25 / 2**30)
