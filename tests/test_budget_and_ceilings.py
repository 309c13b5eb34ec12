"""GPU budgets are kept (allocator cap, a run over budget fails), the ceilings' limits follow from the measured
bandwidths, and bench sweeps reuse one engine with short warm-ups that compile the scenario's shapes."""
from __future__ import annotations

import json
import time

import numpy as np
import pytest
from hydra import compose, initialize_config_dir

from fiddler_jax.errors import InvalidInputError
from fiddler_jax.experiments import bench, build, ceilings, model_group
from fiddler_jax.experiments.common import CONF_DIR
from fiddler_jax.runtime import gpu_memory
from fiddler_jax.runtime.placement import expert_bytes, place
from tests.test_harness import COMMON


def test_check_within_fails_only_above_the_budget():
    gpu_memory.check_within("1GiB", 1 << 30)
    gpu_memory.check_within("1GiB", None)  # a backend without statistics
    with pytest.raises(gpu_memory.BudgetExceededError, match="exceeded the 1.0 GiB budget by 1.0 MiB"):
        gpu_memory.check_within("1GiB", (1 << 30) + (1 << 20))
    with pytest.raises(InvalidInputError, match="not a size"):
        gpu_memory.check_within("lots", 1)


def test_cap_needs_a_cuda_driver(monkeypatch):
    monkeypatch.setattr(gpu_memory, "cuda_total_memory", lambda ordinal=0: None)
    assert gpu_memory.cap_xla_allocator("24GiB") == {"capped": False, "why": "no CUDA driver: nothing to cap"}
    monkeypatch.setattr(gpu_memory, "cuda_total_memory", lambda ordinal=0: 80 << 30)
    with pytest.raises(InvalidInputError, match="more than the GPU has"):
        gpu_memory.cap_xla_allocator("100GiB")


def test_cap_sets_the_allocator_fraction_before_jax_starts(monkeypatch):
    monkeypatch.setattr(gpu_memory, "cuda_total_memory", lambda ordinal=0: 80 << 30)
    monkeypatch.setattr(gpu_memory, "jax_started", lambda: False)
    monkeypatch.delenv(gpu_memory.FRACTION, raising=False)
    monkeypatch.delenv(gpu_memory.PREALLOCATE, raising=False)
    assert gpu_memory.cap_xla_allocator("20GiB")["fraction"] == 0.25
    import os

    assert os.environ[gpu_memory.PREALLOCATE] == "false" and os.environ[gpu_memory.FRACTION] == "0.250000"


def test_cap_never_lets_xla_exceed_the_budget(monkeypatch):
    """The H100's 85520809984 bytes: 48 GiB is 0.6026555.. of it, which rounds up to 0.602656 -- a limit above
    the budget. The fraction is rounded down."""
    total = 85520809984
    monkeypatch.setattr(gpu_memory, "cuda_total_memory", lambda ordinal=0: total)
    monkeypatch.setattr(gpu_memory, "jax_started", lambda: False)
    monkeypatch.delenv(gpu_memory.FRACTION, raising=False)
    monkeypatch.delenv(gpu_memory.PREALLOCATE, raising=False)
    for budget in ("24GiB", "48GiB", "79GiB"):
        fraction = gpu_memory.cap_xla_allocator(budget)["fraction"]
        assert 0 <= gpu_memory.parse_bytes(budget) - fraction * total < 1e-6 * total, budget


def test_cap_refuses_a_second_budget_once_jax_started(monkeypatch):
    monkeypatch.setattr(gpu_memory, "cuda_total_memory", lambda ordinal=0: 80 << 30)
    monkeypatch.setattr(gpu_memory, "jax_started", lambda: True)
    monkeypatch.setattr(gpu_memory, "current_limit", lambda: 24 << 30)
    assert gpu_memory.cap_xla_allocator("24GiB")["capped"]
    with pytest.raises(InvalidInputError, match="one process per budget"):
        gpu_memory.cap_xla_allocator("48GiB")


def test_ceiling_limits_follow_from_the_bandwidths():
    cfg = model_group.random_model_config()
    bw = {"host_read": 100e9, "pinned_h2d": 50e9, "hbm_read": 3000e9}
    lim = ceilings.limits(cfg, "24GiB", bw)
    plan = place(cfg, "24GiB", itemsize=2, max_context=256, staging_slots=2)
    expert = expert_bytes(cfg, 2)
    assert lim["resident_experts"] == plan.resident_count and lim["offloaded_experts"] == 256 - plan.resident_count
    per_token = 2 * lim["offloaded_experts"] / 8  # uniform routing, top-2 of 8
    assert lim["offloaded_experts_per_token"] == pytest.approx(per_token)
    assert lim["two_lane_decode_tokens_per_s"] == pytest.approx(150e9 / (per_token * expert))
    assert lim["cpu_lane_only_decode_tokens_per_s"] == pytest.approx(100e9 / (per_token * expert))
    assert lim["pcie_prefill_limit_s"] == pytest.approx(lim["offloaded_bytes"] / 50e9)
    assert 100 < lim["hbm_roofline_tokens_per_s"] < 130  # ~26 GB read per token at 3 TB/s
    assert lim["two_lanes_together_decode_tokens_per_s"] is None  # not measured
    both = ceilings.limits(cfg, "24GiB", {**bw, "host_read_with_h2d": 80e9, "pinned_h2d_with_read": 40e9})
    assert both["two_lanes_together_decode_tokens_per_s"] == pytest.approx(120e9 / (per_token * expert))
    whole = ceilings.limits(cfg, "1024GiB", bw)
    assert whole["offloaded_experts"] == 0 and whole["two_lane_decode_tokens_per_s"] is None
    with pytest.raises(InvalidInputError, match="not a size"):
        ceilings.limits(cfg, "24 gigs", bw)


def test_ceilings_run_measures_every_bandwidth(tmp_path):
    out = tmp_path / "c.json"
    ceilings.main(["--budgets", "24GiB", "--host-gib", "0.05", "--h2d-gib", "0.01", "--hbm-gib", "0.02",
                   "--reps", "2", "--out", str(out)])
    result = json.loads(out.read_text())
    assert all(v > 0 for v in result["bandwidth_GBps"].values())
    assert [lim["budget"] for lim in result["limits"]] == ["24GiB"] and result["git_sha"] is not None


def _compose(*overrides):
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose("bench", overrides=[*COMMON, *overrides])


def test_a_run_above_its_budget_fails_after_writing_its_result(tmp_path, monkeypatch):
    monkeypatch.setattr(gpu_memory, "usage", lambda: {"peak_bytes_in_use": 3 << 30, "bytes_limit": None})
    with pytest.raises(gpu_memory.BudgetExceededError):
        bench.run_bench(_compose("hardware.gpu_budget=2GiB", "planner=cpu_only"), str(tmp_path))
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["gpu_memory"]["within_budget"] is False and result["peak_gpu_bytes"] == 3 << 30


def test_a_sweep_over_planners_builds_the_engine_once(tmp_path, monkeypatch):
    from fiddler_jax.runtime.engine import Engine

    built = []
    real = Engine._build.__func__
    monkeypatch.setattr(Engine, "_build", classmethod(lambda cls, *a, **k: built.append(1) or real(cls, *a, **k)))
    bench.release_engines()
    for planner in ("cpu_only", "fiddler", "transfer"):
        result = bench.run_bench(_compose(f"planner={planner}", "warmup_tokens=1"), str(tmp_path))
        assert result["metrics"]["tokens_per_s"]["median"] > 0
    assert len(built) == 1
    bench.run_bench(_compose("planner=cpu_only", "placement.resident_experts=6"), str(tmp_path))
    assert len(built) == 2  # another placement: a new engine
    bench.release_engines()


def test_kv_slots_share_compiled_shapes_and_are_checked():
    from fiddler_jax.runtime.generate import cache_length

    cfg = _compose()
    engine, _ = bench.build_engine(cfg)
    prompt = np.arange(1, 9)[None] % engine.config.vocab_size
    kv = cache_length(8, 40, engine.config)
    engine.generate(prompt, 2, eos_token_id=[], kv_slots=kv)  # a short warm-up at the long run's KV length
    jitted = list(engine.jitted_functions().values())
    before = [f._cache_size() for f in jitted]
    engine.generate(prompt, 40, eos_token_id=[], kv_slots=kv)
    assert [f._cache_size() for f in jitted] == before
    with pytest.raises(InvalidInputError, match="kv_slots=16 must hold"):
        engine.generate(prompt, 40, eos_token_id=[], kv_slots=16)
    bench.release_engines()


def test_lanes_together_measures_both_lanes_and_raises_a_copy_error():
    buffers = [np.ones(1 << 22, np.uint8)]

    def copy_one():
        time.sleep(0.002)
        return 1 << 20

    both = ceilings.lanes_together(buffers, copy_one, reps=3)
    assert both["host_read_with_h2d"] > 0 and 0 < both["pinned_h2d_with_read"] <= (1 << 20) / 0.002

    def broken():
        raise RuntimeError("copy failed")

    with pytest.raises(RuntimeError, match="copy failed"):
        ceilings.lanes_together(buffers, broken, reps=1)


def test_decode_limit_from_the_latency_model_pays_the_copy_beside_the_cpu_lane():
    """With no copies measured in the process, the decode limit is the latency model's: both lanes run at once, so a
    copy costs ``transfer_busy_s`` (the copy beside the CPU lane), not the copy alone."""
    import dataclasses
    from types import SimpleNamespace

    from fiddler_jax.runtime.latency import LatencyModel
    from fiddler_jax.runtime.planning import Lane
    from fiddler_jax.runtime.trace import StepRecord

    layers, experts, k = 2, 8, 2
    resident = np.zeros((layers, experts), bool)
    resident[:, :4] = True
    counts = np.zeros(experts, np.int32)
    counts[[0, 5]] = 1  # one resident expert, one offloaded: one offloaded expert per layer step
    lanes = np.full(experts, Lane.GPU, np.int8)
    lanes[5] = Lane.CPU
    steps = [StepRecord(layer, counts, lanes, 0.0, {"cpu": (0.0, 1e-3)}) for layer in range(layers)] * 3
    model = LatencyModel.from_design_numbers()
    busy = dataclasses.replace(model, transfer_busy_s=2 * model.transfer_s)

    def limit(latency):
        engine = SimpleNamespace(config=SimpleNamespace(num_experts_per_tok=k, num_hidden_layers=layers),
                                 trace=SimpleNamespace(steps=steps), placement=SimpleNamespace(resident=resident),
                                 host=SimpleNamespace(expert_nbytes=1 << 20), latency=latency)
        return bench.decode_limit(engine)

    per_token = layers  # offloaded experts a token needs
    alone, beside = limit(model), limit(busy)
    assert alone["offloaded_experts_per_token"] == per_token
    assert beside["two_lane_decode_tokens_per_s"] == pytest.approx(
        (1 / busy.cpu(1) + 1 / (2 * model.transfer_s)) / per_token)
    assert beside["two_lane_decode_tokens_per_s"] < alone["two_lane_decode_tokens_per_s"]
    assert beside["cpu_lane_read_GBps"] == pytest.approx(per_token * 3 * (1 << 20) / (per_token * 3 * 1e-3) / 1e9)


def test_planner_sync_s_replaces_the_latency_models_sync_only():
    """``planner.sync_s`` plans with the latency model's sync replaced -- on a new engine and on one reused from
    the last build -- and leaves everything else of the model alone; a bad value is one clear error."""
    bench.release_engines()
    base, _ = bench.build_engine(_compose())
    engine, _ = bench.build_engine(_compose("planner.sync_s=0.002"))  # reuses the weights
    assert engine.resources is base.resources
    assert engine.latency.sync_s == 0.002 and engine.memo.latency.sync_s == 0.002
    assert engine.latency.transfer_s == base.latency.transfer_s and engine.latency.cpu == base.latency.cpu
    again, _ = bench.build_engine(_compose())  # the override does not stick to the reused engine
    assert again.latency.sync_s == base.latency.sync_s
    bench.release_engines()
    fresh, _ = bench.build_engine(_compose("planner.sync_s=0.001"))
    assert fresh.latency.sync_s == 0.001
    bench.release_engines()
    for bad in ("-1", "inf"):
        with pytest.raises(InvalidInputError, match="planner.sync_s must be a finite non-negative number"):
            build.check_engine(_compose(f"planner.sync_s={bad}"))
    with pytest.raises(InvalidInputError, match="measure or null; got 'soon'"):
        build.check_engine(_compose("planner.sync_s=soon"))


def test_planner_sync_s_measure_measures_once_per_engine_and_kernel_group(monkeypatch):
    from fiddler_jax.runtime import sync_penalty

    measured = []
    monkeypatch.setattr(sync_penalty, "measure_sync_penalty", lambda engine: measured.append(engine) or 0.004)
    bench.release_engines()
    engine, _ = bench.build_engine(_compose("planner.sync_s=measure"))
    assert engine.latency.sync_s == 0.004 and len(measured) == 1
    assert bench.build_engine(_compose("planner=cpu_only", "planner.sync_s=measure"))[0].latency.sync_s == 0.004
    assert len(measured) == 1  # the same engine and options: measured once
    serial, _ = bench.build_engine(_compose("planner.sync_s=measure", "kernel.streamed_overlap=false"))
    assert len(measured) == 2 and measured[1].options.streamed_overlap is False
    bench.build_engine(_compose("planner.sync_s=measure", "kernel.spin_us=10"))  # the pool's spin: measured again
    assert len(measured) == 3
    bench.release_engines()
