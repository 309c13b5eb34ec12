"""The hybrid engine on CPU: with most experts off the "GPU", every planner computes what the all-resident
model computes; plans never recompile; bad configurations fail clearly."""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fiddler_jax as fj
from fiddler_jax.assets import default_model_path
from fiddler_jax.errors import InvalidInputError
from fiddler_jax.runtime import engine as E
from fiddler_jax.runtime.pinned_activations import PinnedActivations
from fiddler_jax.runtime.latency import LatencyModel
from fiddler_jax.runtime.options import EngineOptions
from fiddler_jax.runtime.planning import Lane, PlannerError
from tests.conftest import GEOMETRIES, make_hf_model, token_ids


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("engine")
    make_hf_model(GEOMETRIES["gqa_headdim_window"], seed=4).save_pretrained(path)  # 2 layers x 4 experts, top-2
    return str(path), fj.load_pretrained(path, progress=False)


@pytest.mark.parametrize("planner,cache_slots", [("fiddler", 0), ("fiddler_overlap", 0), ("cpu_only", 0),
                                                ("transfer", 0), ("lru", 1), ("fiddler_overlap", 1)])
def test_hybrid_equals_all_resident_float32(checkpoint, planner, cache_slots):
    path, reference = checkpoint
    engine = E.Engine.from_pretrained(path, gpu_budget=10**9, planner=planner, resident_experts=2, dtype="float32",
                                      cache_slots=cache_slots, progress=False)
    assert engine.placement.resident_count == 2
    ids = token_ids(97, (2, 20), seed=1)
    ref = fj.logits(reference, ids)
    out = engine.logits(ids)
    assert np.abs(out - ref).max() <= 1e-5 * np.abs(ref).max(), planner
    prompt = ids[:1, :5]
    np.testing.assert_array_equal(engine.generate(prompt, 16, eos_token_id=[]),
                                  fj.generate(reference, prompt, 16, eos_token_id=[]))
    lanes = np.concatenate([r.lanes[r.counts > 0] for r in engine.trace.steps])
    expected = {"cpu_only": {Lane.CPU}, "transfer": {Lane.TRANSFER}, "lru": {Lane.TRANSFER}}.get(planner)
    off_gpu = set(lanes[lanes != Lane.GPU].tolist())
    assert off_gpu and (expected is None or off_gpu == expected)
    if planner == "lru":  # the cache served some experts: more GPU steps than the 2 resident experts explain
        hits = sum(int((r.lanes == Lane.GPU).sum()) for r in engine.trace.steps)
        resident_hits = sum(int((r.counts[engine.placement.resident[r.layer]] > 0).sum())
                            for r in engine.trace.steps)
        assert hits > resident_hits


def test_all_resident_layers_skip_the_planner(checkpoint):
    path, reference = checkpoint
    engine = E.Engine.from_pretrained(path, gpu_budget=10**9, dtype="float32", progress=False)
    assert engine.placement.resident.all()
    ids = token_ids(97, (1, 9), seed=2)
    np.testing.assert_allclose(engine.logits(ids), fj.logits(reference, ids), rtol=0, atol=1e-6)
    assert len(engine.trace) == 0


def test_bfloat16_hybrid_with_the_cpu_kernel_on_the_bundled_model():
    """bf16: the CPU lane runs the C++ kernel. Measured: median per-position relative error of the logits
    against the all-resident bf16 model 4e-3 (max 8e-3); the greedy continuation is identical."""
    path = default_model_path()
    reference = fj.load_pretrained(path, dtype="bfloat16", progress=False)
    ids = np.asarray(fj.load_tokenizer(path)("def fibonacci(n):\n    if n < 2:")["input_ids"])[None]
    engine = E.Engine.from_pretrained(path, gpu_budget=10**9, planner="fiddler_overlap", resident_experts=8,
                                      dtype="bfloat16", progress=False)
    ref, out = fj.logits(reference, ids), engine.logits(ids)
    per_position = np.linalg.norm(out - ref, axis=-1) / np.linalg.norm(ref, axis=-1)
    assert np.median(per_position) <= 1e-2
    np.testing.assert_array_equal(engine.generate(ids, 16, eos_token_id=[]),
                                  fj.generate(reference, ids, 16, eos_token_id=[]))
    summary = engine.trace_summary()
    assert summary["experts_per_lane"]["cpu"] > 0 and 0 < summary["gpu_hit_rate"] < 1
    # cpu_lane_thread: the kernel starts on the lane's thread before the GPU calls; same bits
    threaded = engine.with_planner("fiddler_overlap", options=EngineOptions(cpu_lane_thread=True))
    np.testing.assert_array_equal(threaded.logits(ids), out)
    assert threaded.trace_summary()["experts_per_lane"]["cpu"] > 0
    # every CPU output through the pinned buffers (on a GPU only prefill's large ones): same bits, buffers reused
    pinned = engine.executor.cpu.pinned = PinnedActivations(jax.devices()[0], min_bytes=0)
    np.testing.assert_array_equal(engine.logits(ids), out)
    np.testing.assert_array_equal(engine.generate(ids, 16, eos_token_id=[]),
                                  fj.generate(reference, ids, 16, eos_token_id=[]))
    assert 0 < pinned.nbytes <= 2 * 2 * ids.shape[1] * engine.config.hidden_size * 4  # 2 shapes x 2


def test_plans_never_recompile(checkpoint):
    """Compile counts stay flat over a 100-token run whose plans keep changing (the issue's measurement)."""
    path, _ = checkpoint
    engine = E.Engine.from_pretrained(path, gpu_budget=10**9, planner="fiddler_overlap", resident_experts=1,
                                      cache_slots=1, dtype="float32", progress=False)
    prompt = token_ids(97, (1, 6), seed=3)
    engine.generate(prompt, 100, eos_token_id=[])  # compiles every shape this generation length uses
    jitted = list(engine.jitted_functions().values())
    assert len(jitted) == 8  # all four layers share one structure: one jitted step of each kind
    before = [f._cache_size() for f in jitted]
    engine.trace.clear()
    engine.generate(prompt, 100, eos_token_id=[])  # the same shapes again, many different plans
    assert len({tuple(r.lanes) for r in engine.trace.steps}) > 1
    assert [f._cache_size() for f in jitted] == before


def test_offloaded_experts_are_held_once_in_pinned_memory(checkpoint):
    """Each offloaded expert exists once, in pinned_host memory; the CPU lane's views are those same bytes;
    the device model holds only the resident experts."""
    from fiddler_jax.runtime.placement import expert_bytes

    path, _ = checkpoint
    engine = E.Engine.from_pretrained(path, gpu_budget=10**9, planner="fiddler_overlap", resident_experts=3,
                                      dtype="float32", progress=False)
    resident = engine.placement.resident
    np.testing.assert_array_equal(engine.host.held, ~resident)
    assert engine.host.nbytes == int((~resident).sum()) * expert_bytes(engine.config, 4)
    for layer, expert in zip(*np.nonzero(~resident)):
        arrays = engine.host.arrays(int(layer), int(expert))
        tables = engine.host.tables(int(layer))
        for i, name in enumerate(("w1", "w3", "w2")):
            assert arrays[name].sharding.memory_kind == "pinned_host"
            assert tables[i][expert].ctypes.data == arrays[name].unsafe_buffer_pointer()
    for layer, moe in enumerate(l.mlp for l in engine.model.layers):
        assert moe.w1.shape[0] == resident[layer].sum()
    with pytest.raises(fj.FiddlerError, match="not held in host memory"):
        engine.host.arrays(*map(int, np.argwhere(resident)[0]))


def test_host_experts_are_freed_with_their_engine():
    """Nothing keeps pinned experts alive once their holder is gone (a cache on them once did)."""
    import gc
    import weakref

    from fiddler_jax.runtime.host_experts import HostExperts

    source = lambda l, e: {w: np.ones((8, 4), np.float32) for w in ("w1", "w3", "w2")}  # noqa: E731
    host = HostExperts.pin(source, np.ones((2, 3), bool), progress=False)
    assert host.tables(1)[2][0] is not None
    ref = weakref.ref(host)
    del host
    gc.collect()
    assert ref() is None


def test_pinned_memory_exhaustion_names_the_limit(checkpoint, monkeypatch):
    import jax

    from fiddler_jax.runtime import host_experts

    real_put = jax.device_put
    calls = []

    def put(x, *args, **kwargs):
        calls.append(1)
        if len(calls) > 4:
            raise RuntimeError("RESOURCE_EXHAUSTED: Out of memory allocating 4096 bytes")
        return real_put(x, *args, **kwargs)

    monkeypatch.setattr(jax, "device_put", put)
    offloaded = np.ones((2, 4), bool)
    source = lambda l, e: {w: np.zeros((8, 4), np.float32) for w in ("w1", "w3", "w2")}  # noqa: E731
    with pytest.raises(host_experts.HostMemoryError, match="XLA_PJRT_GPU_HOST_MEMORY_LIMIT_GB.*gpu_budget"):
        host_experts.HostExperts.pin(source, offloaded, progress=False)


def test_sequential_plans_run_the_lanes_one_after_another(checkpoint):
    """``fiddler`` (the paper) runs GPU, PCIe, CPU in turn; ``cpu_only`` (concurrent) starts the CPU lane
    before the GPU lane has finished queueing its work."""
    path, _ = checkpoint
    ids = token_ids(97, (1, 12), seed=6)
    engine = E.Engine.from_pretrained(path, gpu_budget=10**9, planner="fiddler", resident_experts=2,
                                      dtype="float32", progress=False, latency=None)
    engine.logits(ids)
    for step in engine.trace.steps:
        if "cpu" in step.spans:
            assert step.spans["cpu"][0] >= step.spans["gpu"][1]
            if "pcie" in step.spans:
                assert step.spans["cpu"][0] >= step.spans["pcie"][1]
    assert engine.trace_summary()["overlap_s"]["cpu+pcie"] == 0
    concurrent = E.Engine.from_pretrained(path, gpu_budget=10**9, planner="cpu_only", resident_experts=2,
                                          dtype="float32", progress=False)
    concurrent.logits(ids)
    assert any(s.spans["cpu"][0] < s.spans["gpu"][1] for s in concurrent.trace.steps if "cpu" in s.spans)


def test_bad_configurations(checkpoint):
    path, _ = checkpoint
    with pytest.raises(PlannerError, match="unknown planner 'fastest'.*fiddler_overlap"):
        E.Engine.from_pretrained(path, planner="fastest", progress=False)
    with pytest.raises(InvalidInputError, match="unknown placement 'hot'"):
        E.Engine.from_pretrained(path, placement="hot", progress=False)
    with pytest.raises(InvalidInputError, match="below the minimum"):
        E.Engine.from_pretrained(path, gpu_budget="1KiB", progress=False)
    with pytest.raises(InvalidInputError, match="unknown cpu_backend 'numba'; valid: kernel, xla"):
        E.Engine.from_pretrained(path, options=EngineOptions(cpu_backend="numba"), progress=False)
    with pytest.raises(PlannerError, match="cache_slots must be at least 1"):
        E.Engine.from_pretrained(path, planner="lru", cache_slots=-1, progress=False)
    with pytest.raises(PlannerError, match="gpu_budget"):  # refused at construction, before loading
        E.Engine.from_pretrained(path, gpu_budget=10**9, planner="gpu_only", resident_experts=1, dtype="float32",
                                 progress=False)


def test_trace_saves_a_perfetto_timeline(checkpoint, tmp_path):
    import json

    path, _ = checkpoint
    engine = E.Engine.from_pretrained(path, gpu_budget=10**9, planner="fiddler_overlap", resident_experts=1,
                                      dtype="float32", progress=False)
    engine.generate(token_ids(97, (1, 6), seed=5), 6, eos_token_id=[])
    assert len(engine.trace) == 6 * 2  # every step of both (partly offloaded) layers was planned
    engine.trace.save(tmp_path / "trace.json")
    data = json.loads((tmp_path / "trace.json").read_text())
    spans = [e for e in data["traceEvents"] if e["ph"] == "X"]
    lanes = {e["args"]["name"] for e in data["traceEvents"] if e.get("name") == "thread_name"}
    assert lanes == {"plan", "pcie", "cpu", "gpu", "attention", "cpu_wait"}
    assert {e["tid"] for e in spans} >= {0, 3} and all(e["dur"] >= 0 for e in spans)
    summary = data["otherData"]["summary"]
    assert summary["planned_steps"] == 12 and 0 <= summary["gpu_hit_rate"] <= 1
    assert sum(summary["experts_per_lane"].values()) == sum(int((s.counts > 0).sum()) for s in engine.trace.steps)
    assert sum(summary["steps_by_copies"].values()) == 12
    engine.trace.clear()
    assert engine.trace_summary() == {"planned_steps": 0}
    tokens, stats = engine.generate_with_stats(token_ids(97, (1, 6), seed=5), 6, eos_token_id=[])
    assert tokens.shape == (1, 12) and stats.prefill_s > 0 and stats.new_tokens == 6


def test_trace_counts_the_steps_by_their_copies():
    """``steps_by_copies`` counts each step's active experts on the PCIe lane (an idle copied expert is not one)."""
    from fiddler_jax.runtime.trace import StepRecord, Trace

    def step(lanes, counts):
        return StepRecord(0, np.array(counts), np.array(lanes, np.int8), 0.0, {"cpu": (0.0, 1e-3)})

    C, G, T = Lane.CPU, Lane.GPU, Lane.TRANSFER
    trace = Trace()
    for record in (step([C, G, T, T], [1, 1, 1, 1]), step([T, T, C, G], [1, 0, 1, 1]),
                   step([C, C, G, G], [1, 1, 1, 1]), step([T, G, C, C], [2, 1, 1, 0])):
        trace.add(record)
    assert trace.summary()["steps_by_copies"] == {"0": 1, "1": 2, "2": 1}


def test_same_seed_same_output_across_cpu_thread_counts():
    """bf16 hybrid decoding (CPU lane = the C++ kernel) is bit-identical with 1 and 3 kernel threads, sampled."""
    from fiddler_jax import kernels

    path = default_model_path()
    engine = E.Engine.from_pretrained(path, gpu_budget=10**9, planner="cpu_only", resident_experts=4,
                                      dtype="bfloat16", progress=False)
    prompt = np.asarray(fj.load_tokenizer(path)("class Stack:")["input_ids"])[None]
    before = kernels.get_num_threads()
    outputs, logits = [], []
    try:
        for threads in (1, 3):
            kernels.set_num_threads(threads)
            logits.append(engine.logits(prompt))
            outputs.append(engine.generate(prompt, 12, do_sample=True, seed=7, top_p=0.9, eos_token_id=[]))
    finally:
        kernels.set_num_threads(before)
    np.testing.assert_array_equal(logits[0], logits[1])
    np.testing.assert_array_equal(outputs[0], outputs[1])


def test_pinned_pool_is_sized_to_the_offloaded_experts_before_jax_starts():
    """Before JAX starts, an engine narrows the pinned-host cap from the machine's RAM to what its experts need
    (a doubling pool capped at the RAM pinned more than the machine had); a cap the user set is kept."""
    import os
    import subprocess
    import sys

    code = ("import os, fiddler_jax\n"
            "from fiddler_jax.runtime.host_experts import size_pinned_pool\n"
            "print(size_pinned_pool(10 << 30), os.environ['XLA_PJRT_GPU_HOST_MEMORY_LIMIT_GB'])\n"
            "import jax; jax.devices()\n"
            "print(size_pinned_pool(20 << 30), os.environ['XLA_PJRT_GPU_HOST_MEMORY_LIMIT_GB'])\n")
    env = {k: v for k, v in os.environ.items() if k != "XLA_PJRT_GPU_HOST_MEMORY_LIMIT_GB"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert out.split() == ["True", "13", "False", "13"]  # 10 GiB + 2% + 2 GiB, rounded up; unchanged once started
    env["XLA_PJRT_GPU_HOST_MEMORY_LIMIT_GB"] = "40"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "40", "False", "40"]


def test_with_planner_shares_weights_and_buffers_across_sweeps(checkpoint):
    """Engines made by with_planner run on the built engine's weights and GPU buffers; any sequence of them (the
    copies donate and replace the staging buffers) equals the all-resident model, and a planner needing more
    buffers than were placed is refused."""
    path, reference = checkpoint
    base = E.Engine.from_pretrained(path, gpu_budget=10**9, planner="fiddler_overlap", resident_experts=2,
                                    dtype="float32", progress=False)
    ids = token_ids(97, (1, 12), seed=2)
    ref = fj.logits(reference, ids)
    for planner in ("transfer", "cpu_only", "transfer", "fiddler"):
        engine = base.with_planner(planner)
        assert engine.model is base.model and engine.host is base.host
        out = engine.logits(ids)
        assert np.abs(out - ref).max() <= 1e-5 * np.abs(ref).max(), planner
        assert engine.trace.steps and not base.trace.steps  # each engine keeps its own trace
    assert base.with_planner("transfer", options=EngineOptions(cpu_backend="xla")).options.cpu_backend == "xla"
    with pytest.raises(InvalidInputError, match="build a new engine"):
        base.with_planner("lru", cache_slots=1)
    with pytest.raises(InvalidInputError, match="cpu_backend"):
        base.with_planner("transfer", options=EngineOptions(cpu_backend="gpu"))


@pytest.mark.parametrize("cache_slots", [0, 1])
def test_plans_of_small_steps_are_remembered_unless_a_cache_makes_the_planner_stateful(checkpoint, cache_slots):
    """Decode repeats (layer, counts): the planner runs once per distinct pair; the remembered plan is the plan
    the planner gives. A dynamic cache makes plans depend on history, so then it runs every step."""
    path, _ = checkpoint
    engine = E.Engine.from_pretrained(path, gpu_budget=10**9, planner="fiddler_overlap", resident_experts=2,
                                      dtype="float32", cache_slots=cache_slots, progress=False)
    planner, calls = engine.planner, []

    def counting(counts, resident, latency, layer):
        calls.append((layer, counts.tobytes()))
        return planner(counts, resident, latency, layer=layer)

    engine.planner = engine.memo.planner = counting
    engine.generate(token_ids(97, (1, 6), seed=5), 30, eos_token_id=[])
    steps = [(s.layer, s.counts.tobytes()) for s in engine.trace.steps]
    if cache_slots:
        assert calls == steps
        return
    # the memo plans each canonical step once (experts relabelled by residency and count: planning/memo.py)
    from fiddler_jax.runtime.planning.memo import canonical_order

    canonical = {(int(engine.placement.resident[s.layer].sum()),
                  s.counts[canonical_order(s.counts, engine.placement.resident[s.layer])].astype(np.int32).tobytes())
                 for s in engine.trace.steps}
    assert len(calls) == len(canonical) < len(steps)  # decode repeats count vectors
    for s in engine.trace.steps:
        fresh = planner(s.counts, engine.placement.resident[s.layer], engine.latency, layer=s.layer)
        np.testing.assert_array_equal(s.lanes, fresh.lanes)


@pytest.mark.parametrize("max_transfers", [0, 2])
def test_prefetched_copies_equal_the_all_resident_model_and_stay_within_the_slots(checkpoint, max_transfers,
                                                                                    tmp_path):
    """With prefetch, layer 0 starts copying layer 1's predicted experts; layer 1 runs those on the GPU from the
    copies. Outputs still equal the all-resident model, the copies never outnumber the staging slots, the trace
    counts the copies, and changing staged sets never compile again."""
    path, reference = checkpoint
    # copies as fast as on this machine (the design latency model's 6.4 ms copy never pays for the tiny model)
    fast_copies = tmp_path / "latency.json"
    dataclasses.replace(LatencyModel.from_design_numbers(), transfer_s=1e-5).save(fast_copies)
    engine = E.Engine.from_pretrained(path, gpu_budget=10**9, planner="fiddler_overlap", resident_experts=1,
                                      dtype="float32", prefetch=2, max_transfers=max_transfers,
                                      latency=fast_copies, progress=False)
    pool = engine.resources.staging
    copy, held = pool.copy, []

    def counting_copy(layer, expert, **kw):
        staged = copy(layer, expert, **kw)
        held.append(len(pool))
        return staged

    pool.copy = counting_copy
    ids = token_ids(97, (2, 20), seed=1)
    ref = fj.logits(reference, ids)
    assert np.abs(engine.logits(ids) - ref).max() <= 1e-5 * np.abs(ref).max()
    prompt = ids[:1, :5]
    np.testing.assert_array_equal(engine.generate(prompt, 24, eos_token_id=[]),
                                  fj.generate(reference, prompt, 24, eos_token_id=[]))
    assert held and max(held) <= engine.staging_slots and len(pool) == 0
    summary = engine.trace_summary().get("prefetch", {})
    if max_transfers == 0:  # decode steps leave the PCIe lane idle: layer 0 prefetches, layer 1 uses copies
        assert summary["copies"] > 0 and 0 < summary["used"] <= summary["wanted"] <= summary["copies"]
        assert all(not r.prefetched.any() for r in engine.trace.steps if r.layer == 0)
    jitted = list(engine.jitted_functions().values())
    before = [f._cache_size() for f in jitted]
    engine.generate(prompt, 24, eos_token_id=[])
    assert [f._cache_size() for f in jitted] == before


def test_staging_pool_holds_at_most_its_slots_and_knows_when_copies_landed(checkpoint):
    """A copy takes a slot until released; a copy beyond the slots is refused; a landed copy has 0 s left and
    holds the expert's bytes; experts without a copy are inf."""
    import jax

    from fiddler_jax.errors import FiddlerError
    from fiddler_jax.runtime.lanes.pcie import StagingPool

    path, _ = checkpoint
    engine = E.Engine.from_pretrained(path, gpu_budget=10**9, planner="cpu_only", resident_experts=1,
                                      dtype="float32", progress=False)
    layer, (e1, e2) = 0, np.flatnonzero(engine.host.held[0])[:2]
    pool = StagingPool(engine.host, jax.devices()[0], 1, transfer_s=5.0)
    pool.copy(layer, int(e1), ahead=True)
    assert pool.free() == 0 and pool.staged(layer, 4).tolist() == [e == e1 for e in range(4)]
    with pytest.raises(FiddlerError, match="no free staging slot"):
        pool.copy(layer, int(e2))
    pool.wait(layer)
    left = pool.left_s(layer, 4)
    assert left[e1] == 0.0 and np.isinf(np.delete(left, e1)).all() and pool.backlog_s() == 0.0
    for w, a in pool.arrays(layer, int(e1)).items():
        np.testing.assert_array_equal(np.asarray(a), np.asarray(engine.host.arrays(layer, int(e1))[w]))
    pool.release(layer)
    assert pool.free() == 1 and len(pool) == 0


def test_pinned_activations_choose_by_size_reuse_a_ring_and_refuse_depth_one():
    """pinned_activations.PinnedActivations: activations from ``min_bytes`` take the pinned path (None: none do);
    a fetched input equals the device array; output buffers are reused round the ring, and what was written
    moves to the device unchanged."""
    dev = jax.devices()[0]
    assert not PinnedActivations(dev, None).wants((4096, 4096))
    pinned = PinnedActivations(dev, min_bytes=2048)
    assert not pinned.wants((1, 128)) and pinned.wants((4, 128)) and not pinned.wants((4, 128), itemsize=2)
    x = jax.random.normal(jax.random.key(0), (8, 128), jnp.bfloat16)  # 2 KiB: fetched through pinned memory
    np.testing.assert_array_equal(pinned.fetch(x), np.asarray(x))
    host = np.ones((8, 128), np.float32)
    assert pinned.fetch(host) is host
    taken = []
    for i in range(5):
        buffer = pinned.take((4, 128))
        buffer.view[...] = i
        np.testing.assert_array_equal(np.asarray(pinned.to_device(buffer)), np.full((4, 128), i, np.float32))
        taken.append(buffer)
    assert taken[0] is taken[2] is taken[4] and taken[1] is taken[3] and taken[0] is not taken[1]
    assert pinned.nbytes == 2 * 4 * 128 * 4
    pinned.take((8, 128))  # a second shape: two rings
    assert pinned.nbytes == (2 * 4 + 8) * 128 * 4
    pinned.take((16, 128))  # a third: the least recently used ring, (4, 128), is dropped
    assert pinned.nbytes == (8 + 16) * 128 * 4
    pinned.settle()
    assert all(b.copy is None for ring in pinned._rings.values() for b in ring)
    with pytest.raises(InvalidInputError, match="depth >= 2"):
        PinnedActivations(dev, 0, depth=1)
