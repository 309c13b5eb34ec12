"""Sweeps through Hydra's submitit launchers: a real sweep of the bundled model as local processes
(hydra/launcher=local), read back by report with its failed run named; the Slurm launcher's config composes and the
sbatch script submitit would write asks for one GPU, a whole node, every core and the job's pinned experts in
host memory."""
from __future__ import annotations

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
    cmd = [sys.executable, "-m", "fiddler_jax.cli", "bench", "-m", "planner=cpu_only,fiddler,gpu_only",
           "placement.resident_experts=4", "repeats=1", "warmup=0", "scenario.input_tokens=16",
           "scenario.output_tokens=3", "hydra/launcher=local", "hydra.sweeper.max_batch_size=1",
           f"hydra.sweep.dir={sweep}"]
    subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600,
                   env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert (sweep / "0" / "result.json").is_file() and (sweep / "1" / "result.json").is_file()
    jobs = {p.name for p in (sweep / ".submitit").iterdir() if p.name != "%j"}
    assert len(jobs) == 3  # one submitit job (process) per run
    assert "gpu_only" in (sweep / "2" / "error.txt").read_text()
    runs = report.collect(str(sweep))
    assert sorted(r["config"]["planner"]["name"] for _, r in runs.results) == ["cpu_only", "fiddler"]
    status = dict(runs.jobs)
    assert status["0"] == status["1"] == "ok"
    assert status["2"].startswith("failed (planner=gpu_only") and "not on the GPU" in status["2"]


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
