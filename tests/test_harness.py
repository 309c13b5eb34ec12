"""The research harness: every config in fiddler_jax/conf composes against its schema, a tiny sweep on the bundled model
writes complete result files that `report` turns into a table, and bad input fails with one clear message."""
from __future__ import annotations

import csv
import json
import os

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

from fiddler_jax.errors import InvalidInputError
from fiddler_jax.experiments import bench, build, model_group, report
from fiddler_jax.experiments.common import CONF_DIR
from tests.test_cli import cli

GROUPS = ("model", "planner", "placement", "hardware", "scenario", "kernel")
COMMON = ["placement.resident_experts=8", "scenario.input_tokens=12", "scenario.output_tokens=4", "repeats=1",
          "warmup=1"]


def options(group: str) -> list[str]:
    return sorted(f[:-5] for f in os.listdir(os.path.join(CONF_DIR, group)) if f.endswith(".yaml"))


def test_every_config_composes():
    import importlib

    for app in ("generate", "profile", "calibrate", "train_tiny", "init_random"):
        importlib.import_module(f"fiddler_jax.experiments.{app}")  # registers the app's schema
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        for group in GROUPS:
            for option in options(group):
                cfg = compose("bench", overrides=[f"{group}={option}"])
                assert OmegaConf.select(cfg, group) is not None, (group, option)
        for experiment in options("experiment"):
            cfg = compose("bench", overrides=[f"+experiment={experiment}"], return_hydra_config=True)
            assert cfg.hydra.sweeper.params, experiment  # each preset is a sweep
        assert compose("bench", overrides=["model=mixtral_8x7b_random"]).model.geometry.num_hidden_layers == 32
        for name in ("generate", "profile", "calibrate", "train_tiny"):
            compose(name)
        compose("init_random", overrides=["out=x"])


def test_typos_and_unknown_options_fail_at_composition():
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        with pytest.raises(ConfigCompositionException, match="fiddler_overlap"):  # Hydra lists the options
            compose("bench", overrides=["planner=fidler"])
        with pytest.raises(Exception, match="repeets"):
            compose("bench", overrides=["repeets=3"])
        with pytest.raises(Exception, match="input_tokns"):
            compose("bench", overrides=["scenario.input_tokns=3"])


def test_tiny_sweep_writes_results_and_report_tables_them(tmp_path):
    sweep = tmp_path / "sweep"
    r = cli("bench", "-m", "planner=fiddler,cpu_only", "scenario=decode", *COMMON, f"hydra.sweep.dir={sweep}",
            cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    results = sorted(sweep.glob("*/result.json"))
    assert len(results) == 2
    for path, planner in zip(results, ("fiddler", "cpu_only")):
        result = json.loads(path.read_text())
        assert {"metrics", "config", "overrides", "git_sha", "git_dirty", "versions", "hardware",
                "latency_model", "engine", "peak_gpu_bytes"} <= set(result)
        assert result["config"]["planner"]["name"] == planner
        assert {"cpu", "cpu_flags", "gpu"} <= set(result["hardware"]) and result["versions"]["jax"]
        tps = result["metrics"]["tokens_per_s"]
        assert tps["min"] <= tps["median"] <= tps["max"] and tps["median"] > 0
        assert result["metrics"]["ttft_s"]["median"] > 0
        assert result["engine"]["trace_summary"]["planned_steps"] > 0  # the engine really offloaded experts
        limits = result["limits"]  # 8 of 32 experts resident: every decode token needs offloaded experts
        assert limits["offloaded_experts_per_token"] > 0 and limits["two_lane_decode_tokens_per_s"] > 0
        # the limit comes from the lanes' ceilings measured in the run, not from the latency model
        ceil = limits["ceilings_GBps"]
        assert ceil["host_read"] > 0 and ceil["pinned_h2d"] > 0 and limits["cpu_lane_read_GBps"] > 0
        assert ceil["host_read_with_h2d"] > 0 and ceil["pinned_h2d_with_read"] > 0
        assert ceil["host_read"] == max(ceil["host_read_kernel"], ceil["host_read_numpy"])
        # rates only: the counts of experts read and copied stand apart
        assert set(ceil) == {"host_read", "host_read_kernel", "host_read_numpy", "pinned_h2d", "host_read_with_h2d",
                             "pinned_h2d_with_read"}
        # the probe is sized in bytes (2.8 GB read, 1.06 GB copied): on the tiny model that is all 24 offloaded
        assert limits["ceilings_experts"] == {"experts_read": 24, "experts_copied": 24}
        assert limits["two_lane_decode_tokens_per_s"] == pytest.approx(
            (ceil["host_read"] + ceil["pinned_h2d"]) * 1e9
            / (limits["offloaded_experts_per_token"] * limits["expert_bytes"]))
    r = cli("report", str(sweep), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "| planner |" in r.stdout and "cpu_only" in r.stdout and "| / limit |" in r.stdout
    rows = list(csv.DictReader((sweep / "report.csv").open()))
    assert [row["planner"] for row in rows] == ["fiddler", "cpu_only"]
    assert float(rows[0]["tokens_per_s_median"]) > 0
    assert float(rows[0]["two_lane_limit_tokens_per_s"]) > 0
    assert (sweep / "report_tokens_per_s.png").stat().st_size > 1000


@pytest.mark.parametrize("scenario,metric", [("prefill", "ttft_s"), ("beam", "tokens_per_s")])
def test_prefill_and_beam_scenarios_in_process(tmp_path, scenario, metric):
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("bench", overrides=[f"scenario={scenario}", *COMMON, "scenario.num_beams=2"])
    result = bench.run_bench(cfg, str(tmp_path))
    assert result["metrics"][metric]["median"] > 0
    assert json.loads((tmp_path / "result.json").read_text())["config"]["scenario"]["name"] == scenario


def test_batch_scenario_runs_prompts_of_different_lengths_together(tmp_path):
    """scenario=batch: batch_size seeded prompts of input_tokens ± input_spread, one engine whose KV reserve
    holds them (max_batch defaults to batch_size); tokens/s over all rows is batch_size x one request's."""
    from fiddler_jax.experiments.workload import batch_prompts

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("bench", overrides=["scenario=batch", *COMMON, "scenario.batch_size=3",
                                          "scenario.input_spread=5"])
    assert build.kv_rows(cfg) == 3
    result = bench.run_bench(cfg, str(tmp_path))
    m = result["metrics"]
    assert m["tokens_per_s"]["median"] == pytest.approx(3 * m["per_request_tokens_per_s"]["median"])
    assert m["new_tokens"]["median"] == 3 * cfg.scenario.output_tokens and m["ttft_s"]["median"] > 0
    prompts = batch_prompts(None, "", 16, 5, 3, 97, 0)
    assert [len(p) for p in prompts] == [len(p) for p in batch_prompts(None, "", 16, 5, 3, 97, 0)]
    assert all(11 <= len(p) <= 21 for p in prompts) and len({len(p) for p in prompts}) > 1
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        small = compose("bench", overrides=["scenario=batch", *COMMON, "scenario.batch_size=4", "max_batch=2"])
    with pytest.raises(InvalidInputError, match="max_batch=2 is below scenario.batch_size=4"):
        build.kv_rows(small)


def test_random_geometry_model_and_xla_kernel(tmp_path):
    """model=mixtral_8x7b_random machinery at a small geometry; kernel=xla runs the CPU lane through XLA."""
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("bench", overrides=[
            "model=mixtral_8x7b_random", "model.geometry.num_hidden_layers=2", "model.geometry.hidden_size=64",
            "model.geometry.intermediate_size=96", "model.geometry.vocab_size=300", "model.router_bias=0.5",
            "model.geometry.num_attention_heads=4", "model.geometry.num_key_value_heads=2", "kernel=xla",
            "planner=cpu_only", *COMMON, "placement.resident_experts=2"])
    result = bench.run_bench(cfg, str(tmp_path))
    assert result["engine"]["trace_summary"]["experts_per_lane"]["cpu"] > 0
    assert len(result["engine"]["routing_counts"]) == 2


@pytest.mark.usefixtures("restore_kernel_settings")
def test_kernel_threads_set_the_pool_and_null_restores_the_default(monkeypatch):
    """kernel.threads sizes the kernel pool for a job and keeps its pinning; the next job without it gets the
    start-up count back (FIDDLER_KERNEL_THREADS, read again); 0 is refused."""
    import fiddler_jax.kernels as K

    monkeypatch.setenv("FIDDLER_KERNEL_THREADS", "2")
    build.set_kernel("auto", threads=1)
    assert K.get_num_threads() == 1
    build.set_kernel("auto", threads=None)
    assert K.get_num_threads() == 2
    monkeypatch.setenv("FIDDLER_KERNEL_THREADS", "1")
    K.reset_num_threads()
    assert K.get_num_threads() == 1
    with pytest.raises(InvalidInputError, match=r"kernel.threads must be >= 1 .*got 0"):
        build.set_kernel("auto", threads=0)


def test_bad_input_messages(tmp_path):
    with pytest.raises(InvalidInputError, match="no result.json under"):
        report.report(str(tmp_path))
    with pytest.raises(InvalidInputError, match="not a folder"):
        report.report(str(tmp_path / "missing"))
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    with pytest.raises(InvalidInputError, match="is empty"):
        bench.prompt_text(str(empty))
    with pytest.raises(InvalidInputError, match=r"kernel.spin_us must be >= 0, got -1"):
        build.set_kernel("auto", -1)
    with pytest.raises(InvalidInputError, match=r"kernel.streamed_spin_us must be >= 0, got -3"):
        build.set_kernel("auto", 50, -3)
    r = cli("bench", "model=mixtral_8x7b", f"model.path={tmp_path}", *COMMON, cwd=tmp_path)
    assert r.returncode == 2 and "config.json" in r.stderr and "Traceback" not in r.stderr
    r = cli("bench", "model=mixtral_8x7b", *COMMON, cwd=tmp_path)
    assert r.returncode != 0 and "model.path" in r.stderr and "Traceback" not in r.stderr
    r = cli("bench", "baseline=hf_accelerate", *COMMON, cwd=tmp_path)
    assert r.returncode == 2 and "hf_accelerate" in r.stderr and "Traceback" not in r.stderr


def test_random_model_is_the_same_model_at_every_budget_and_router_bias_skews_routing():
    """Expert (l, e) of the seeded random model has the same weights resident or offloaded, so budgets compare
    one model; router_bias moves tokens to the low-numbered experts."""
    import numpy as np

    from fiddler_jax.models.config import ModelConfig
    from fiddler_jax.runtime.engine import Engine

    cfg = ModelConfig.from_hf_dict(dict(model_type="mixtral", vocab_size=256, hidden_size=256,
                                          intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                          num_key_value_heads=2, num_local_experts=8, num_experts_per_tok=2,
                                          max_position_embeddings=512), source="test")
    ids = np.random.default_rng(0).integers(0, 256, (1, 200))

    def run(resident, bias):
        engine = Engine.from_random(cfg, gpu_budget="1GiB", resident_experts=resident, planner="cpu_only",
                                    dtype="float32", weight_seed=3, router_bias=bias, progress=False)
        return engine.logits(ids), sum(s.counts for s in engine.trace.steps)

    all_resident, _ = run(16, 0.0)
    hybrid, uniform = run(3, 0.0)
    assert np.abs(hybrid - all_resident).max() <= 1e-5 * np.abs(all_resident).max()
    _, skewed = run(3, 2.0)
    low = slice(0, 4)  # the lower half of the experts
    assert skewed[low].sum() / skewed.sum() > max(0.75, uniform[low].sum() / uniform.sum())


def test_bench_jobs_share_one_engine_and_keep_going_after_a_failed_job(tmp_path, monkeypatch):
    """`bench-jobs`: jobs whose engines agree build it once (a beam sweep with max_batch at its widest, a planner
    change), each writes its result.json with its overrides, a bad job leaves error.txt and the rest still run."""
    from fiddler_jax.experiments import bench_jobs
    from fiddler_jax.runtime.engine import Engine

    builds = []
    real_build = Engine._build.__func__
    monkeypatch.setattr(Engine, "_build", classmethod(lambda cls, *a, **k: builds.append(k["max_batch"])
                                                       or real_build(cls, *a, **k)))
    jobs = tmp_path / "jobs.yaml"
    jobs.write_text("common: [" + ", ".join(COMMON) + ", scenario=beam, max_batch=3]\n"
                    "jobs:\n  - [scenario.num_beams=1]\n  - [scenario.num_beams=3]\n"
                    "  - [scenario.num_beams=4]\n  - [scenario.num_beams=3, planner=cpu_only]\n")
    bench.release_engines()
    common, job_list = bench_jobs.load_jobs(str(jobs))
    # the engine checks refuse the run before any job starts, naming the job that cannot run
    with pytest.raises(InvalidInputError, match=r"1 of 4 jobs cannot run; nothing ran; job 3 \(\[scenario.num_beams=4\]\): "
                                                "InvalidInputError: max_batch=3 is below scenario.num_beams=4"):
        bench_jobs.run_jobs(common, job_list, str(tmp_path / "out"))
    assert not (tmp_path / "out").exists() and builds == []
    # a job that fails only when it runs (on the device: out of GPU memory) leaves error.txt; the others run
    monkeypatch.setattr(bench_jobs, "check_jobs", lambda *a, **k: None)
    status = bench_jobs.run_jobs(common, job_list, str(tmp_path / "out"))
    assert [s == "ok" for _, s in status] == [True, True, False, True]
    assert "max_batch=3 is below scenario.num_beams=4" in status[2][1]
    assert (tmp_path / "out" / os.path.basename(status[2][0]) / "error.txt").exists()
    assert builds == [3]  # one engine for all three good jobs
    result = json.loads((tmp_path / "out" / os.path.basename(status[3][0]) / "result.json").read_text())
    assert "planner=cpu_only" in result["overrides"] and result["config"]["planner"]["name"] == "cpu_only"
    assert result["metrics"]["tokens_per_s"]["median"] > 0
    table = report.report(str(tmp_path / "out"))
    assert "cpu_only" in table
    bench.release_engines()
    with pytest.raises(InvalidInputError, match="non-empty list `jobs:`"):
        bad = tmp_path / "bad.yaml"
        bad.write_text("common: []\n")
        bench_jobs.load_jobs(str(bad))
    with pytest.raises(InvalidInputError, match="several GPU budgets .*one jobs file per budget"):
        bench_jobs.run_jobs(COMMON, [["hardware=rtx6000_24g"], ["hardware=ada6000_48g"]], str(tmp_path / "two"))
    assert not (tmp_path / "two").exists()  # refused before any job ran
    r = cli("bench-jobs", str(bad), "--out", str(tmp_path / "cli"), cwd=tmp_path)
    assert r.returncode == 2 and "non-empty list `jobs:`" in r.stderr and "Traceback" not in r.stderr


def test_bench_jobs_check_refuses_jobs_whose_engine_cannot_be_built_without_loading_anything(tmp_path):
    """`bench-jobs --check`: a file with jobs that would fail on the device (the planner's parameters, the KV
    reserve, placement under the budget; checked from the configs alone) gets one error line naming each of them,
    and nothing is written. (Every table preset passes: test_cluster_sweeps.)"""
    bad = tmp_path / "bad.yaml"
    bad.write_text("common: [model=qwen3_30b_a3b_random, hardware.gpu_budget=16GiB, max_batch=8, max_context=2112]\n"
                   "jobs:\n  - [scenario=prefill, scenario.input_tokens=2048]\n"
                   "  - [scenario=decode, planner=cpu_only, planner.max_transfers=8, max_batch=1, max_context=256]\n"
                   "  - [scenario=decode, max_batch=1, max_context=256]\n")
    r = cli("bench-jobs", str(bad), "--check", cwd=tmp_path)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    line, = r.stderr.strip().splitlines()
    assert line.startswith(f"error: {bad}: 2 of 3 jobs cannot run; nothing ran; job 1 ([scenario=prefill, "), line
    assert "gpu_budget 16.0 GiB is below the minimum" in line and "workspace" in line
    assert "job 2 ([scenario=decode, planner=cpu_only, planner.max_transfers=8, max_batch=1, max_context=256]): " \
           "PlannerError: planner 'cpu_only' takes no parameter max_transfers" in line
    assert "job 3" not in line
    bad.write_text(bad.read_text().split("jobs:")[0] + "jobs:\n  - [scenario=decode, max_batch=1, max_context=256]\n")
    r = cli("bench-jobs", str(bad), "--check", cwd=tmp_path)
    assert r.returncode == 0 and "all 1 jobs compose and fit their engines" in r.stdout, r.stderr
    assert sorted(os.listdir(tmp_path)) == ["bad.yaml"]


def test_hf_accelerate_random_fill_is_seeded_tiled_normal():
    """The baseline's random init: norms 1, every other weight a seeded normal(0, std) tile repeated, so a
    47B-parameter model fills at memory speed."""
    torch = pytest.importorskip("torch")
    from fiddler_jax.experiments.baselines import TILE, _fill_random

    def model():
        return torch.nn.ModuleDict({"norm": torch.nn.LayerNorm(8), "big": torch.nn.Linear(1000, 1100, bias=False),
                                    "small": torch.nn.Linear(64, 32, bias=False)}).to(torch.bfloat16)

    a, b, c = model(), model(), model()
    _fill_random(a, torch, 0.02, seed=0)
    _fill_random(b, torch, 0.02, seed=0)
    _fill_random(c, torch, 0.02, seed=1)
    assert torch.equal(a["norm"].weight, torch.ones(8, dtype=torch.bfloat16))
    big = a["big"].weight.float().reshape(-1)
    assert big.numel() > TILE and torch.isfinite(big).all() and abs(big.std().item() - 0.02) < 1e-3
    assert torch.equal(big[TILE:TILE + 1000], big[:1000])  # the tile repeats, the tail included
    assert torch.equal(a["big"].weight, b["big"].weight) and not torch.equal(a["big"].weight, c["big"].weight)


def test_resident_fraction_fixes_the_share_of_moe_experts_and_bundled_presets_name_their_folder(monkeypatch):
    """placement.resident_fraction counts the MoE layers' experts only (rounded); it and resident_experts are
    exclusive; model=tiny_qwen3_moe names the bundled folder, or says this installation lacks it."""
    from types import SimpleNamespace

    from fiddler_jax import assets
    from fiddler_jax.models.config import ModelConfig

    qwen = ModelConfig.from_hf_dict({"model_type": "qwen3_moe", "vocab_size": 64, "hidden_size": 16,
                                     "intermediate_size": 32, "moe_intermediate_size": 8, "num_hidden_layers": 4,
                                     "num_attention_heads": 2, "num_experts": 10, "num_experts_per_tok": 2,
                                     "mlp_only_layers": [1]})
    place = lambda **kw: SimpleNamespace(**{"resident_experts": None, "resident_fraction": None, **kw})  # noqa: E731
    assert build.resident_count(qwen, place(resident_fraction=0.25)) == 8  # 3 MoE layers x 10 experts
    assert build.resident_count(qwen, place(resident_experts=5)) == 5
    assert build.resident_count(qwen, place()) is None
    with pytest.raises(InvalidInputError, match="set one of them"):
        build.resident_count(qwen, place(resident_experts=5, resident_fraction=0.5))
    with pytest.raises(InvalidInputError, match=r"must be in \[0, 1\]"):
        build.resident_count(qwen, place(resident_fraction=1.5))
    with pytest.raises(InvalidInputError, match="model.random needs model.geometry"):
        model_group.model_config(SimpleNamespace(random=True, geometry={}, name="mixtral_8x7b_random"))
    model = SimpleNamespace(random=False, path=None, name="tiny_qwen3_moe")
    if assets.bundled_model_path("tiny_qwen3_moe") is not None:
        assert model_group.checkpoint_path(model).endswith("tiny-qwen3-moe")
    monkeypatch.setattr(assets, "BUNDLED", {**assets.BUNDLED, "tiny_qwen3_moe": assets.ASSETS_DIR / "absent"})
    with pytest.raises(InvalidInputError, match="does not ship the bundled absent"):
        model_group.checkpoint_path(model)
