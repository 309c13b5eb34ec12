"""The streamed CPU lane: the custom call computes the CPU lane's share (host experts only) on whatever device JAX
runs (on a GPU through the stream's host function), the steps that take it are exactly those whose plan no
routing can change, and an engine that streams computes what the synced engine computes."""
from __future__ import annotations

import dataclasses
import itertools

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

import fiddler_jax as fj
from fiddler_jax.assets import default_model_path
from fiddler_jax.kernels import ExpertTables, KernelError
from fiddler_jax.kernels import streamed_lane as S
from fiddler_jax.runtime import engine as E
from fiddler_jax.runtime import planning as P
from fiddler_jax.runtime.latency import LatencyModel, PiecewiseLinear
from fiddler_jax.runtime.options import EngineOptions
from fiddler_jax.runtime.planning.streamed_steps import all_cpu_for_any_routing, count_vectors, _number_of_vectors
from tests.conftest import assert_recovers_from_injected_failure

BF16 = ml_dtypes.bfloat16


def _layer(rng, E_, H, F, resident):
    mats = [[(rng.standard_normal(shape) * scale).astype(BF16) for _ in range(E_)]
            for shape, scale in (((F, H), 1.0), ((F, H), 1.0), ((H, F), 0.1))]
    return [[None if resident[e] else m[e] for e in range(E_)] for m in mats]


def _reference(x, experts, weights, tables):
    """float64 numpy: Σ over host-held assignments of weight · FFN(x[token])."""
    w1s, w3s, w2s = tables
    out = np.zeros(x.shape, np.float64)
    for t, j in itertools.product(range(experts.shape[0]), range(experts.shape[1])):
        e = experts[t, j]
        if w1s[e] is None:
            continue
        xt = x[t].astype(np.float64)
        gate, up = w1s[e].astype(np.float64) @ xt, w3s[e].astype(np.float64) @ xt
        out[t] += weights[t, j] * (w2s[e].astype(np.float64) @ (gate / (1 + np.exp(-gate)) * up))
    return out


@pytest.mark.parametrize("tokens", [1, 3, 8])
def test_streamed_mix_equals_float64_over_the_host_experts_only(tokens):
    rng = np.random.default_rng(tokens)
    E_, H, F, k = 8, 64, 96, 2
    resident = np.zeros(E_, bool)
    resident[rng.choice(E_, 3, replace=False)] = True
    tables = _layer(rng, E_, H, F, resident)
    device = jax.devices()[0]
    tid = S.register_layer(ExpertTables(*tables, hidden=H), device)
    try:
        x = rng.standard_normal((tokens, H)).astype(BF16)
        experts = np.stack([rng.choice(E_, k, replace=False) for _ in range(tokens)]).astype(np.int32)
        experts[0] = np.flatnonzero(resident)[:2]  # a token served by the GPU alone: its row must be zero
        weights = rng.random((tokens, k)).astype(np.float32)
        put = lambda a: jax.device_put(a, device)  # noqa: E731
        for _ in range(3):  # the GPU path reuses its staging slots
            out = np.asarray(S.streamed_cpu_mix(put(x), put(experts), put(weights), tables=tid))
            ref = _reference(x, experts, weights, tables)
            assert np.all(out[0] == 0)
            assert np.linalg.norm(out - ref) <= 1e-2 * np.linalg.norm(ref)
        from fiddler_jax import kernels as K

        K.set_pool(streamed_spin_us=2000)  # the pool stays hot after a streamed call: same result
        hot = np.asarray(S.streamed_cpu_mix(put(x), put(experts), put(weights), tables=tid))
        K.set_pool(streamed_spin_us=-1)
        np.testing.assert_array_equal(hot, out)
        records, _ = S.drain_records()
        mine = [r for r in records if r["tables"] == tid]
        assert len(mine) == 4 and all(r["end"] >= r["start"] for r in mine)
        held = ~resident[experts]
        assert mine[-1]["assignments"] == int(held.sum())
        np.testing.assert_array_equal(mine[-1]["counts"][:E_], np.bincount(experts.reshape(-1), minlength=E_))
    finally:
        S.unregister_layers([tid])


def test_a_128_expert_layer_records_every_experts_count():
    """Fine-grained MoE (128 experts, top-8): the call computes the host experts' share and its record counts
    the tokens of all 128 experts, the last ones included."""
    rng = np.random.default_rng(128)
    E_, H, F, k, tokens = 128, 32, 48, 8, 5
    resident = np.zeros(E_, bool)
    resident[rng.choice(E_, 40, replace=False)] = True
    tables = _layer(rng, E_, H, F, resident)
    device = jax.devices()[0]
    tid = S.register_layer(ExpertTables(*tables, hidden=H), device)
    try:
        S.drain_records()
        x = rng.standard_normal((tokens, H)).astype(BF16)
        experts = np.stack([rng.choice(E_, k, replace=False) for _ in range(tokens)]).astype(np.int32)
        experts[0, :3] = [127, 100, 64]  # experts beyond the first 64
        experts[1, :2] = [127, 65]
        weights = rng.random((tokens, k)).astype(np.float32)
        put = lambda a: jax.device_put(a, device)  # noqa: E731
        out = np.asarray(S.streamed_cpu_mix(put(x), put(experts), put(weights), tables=tid))
        ref = _reference(x, experts, weights, tables)
        assert np.linalg.norm(out - ref) <= 1e-2 * np.linalg.norm(ref)
        (record,) = [r for r in S.drain_records()[0] if r["tables"] == tid]
        np.testing.assert_array_equal(record["counts"], np.bincount(experts.reshape(-1), minlength=E_))
        assert record["counts"][127] == 2 and record["assignments"] == int((~resident[experts]).sum())
    finally:
        S.unregister_layers([tid])


def test_begin_and_end_pair_in_dispatch_order_across_layers_with_one_compile():
    """Begin and end as separate dispatches (the engine's order: begin, other work, end): each end gets its own
    begin's result, layer ids are data (one compiled begin for both layers), an end with no open begin is refused,
    and abandon frees begun calls no end will follow."""
    rng = np.random.default_rng(7)
    E_, H, F, k, T = 8, 32, 48, 2, 3
    device = jax.devices()[0]
    layers, ids = [], []
    for _ in range(2):
        resident = np.zeros(E_, bool)
        resident[rng.choice(E_, 2, replace=False)] = True
        layers.append(_layer(rng, E_, H, F, resident))
        ids.append(S.register_layer(ExpertTables(*layers[-1], hidden=H), device))
    put = lambda a: jax.device_put(a, device)  # noqa: E731
    begin = jax.jit(S.streamed_cpu_begin)
    try:
        calls = []
        for n in range(4):  # two calls per layer, begun before any ends
            x = rng.standard_normal((T, H)).astype(BF16)
            experts = np.stack([rng.choice(E_, k, replace=False) for _ in range(T)]).astype(np.int32)
            weights = rng.random((T, k)).astype(np.float32)
            calls.append((x, experts, weights, n % 2, begin(put(x), put(experts), put(weights), np.int32(ids[n % 2]))))
        assert begin._cache_size() == 1
        if device.platform == "cpu":  # the ticket names its call: ends may come in another order
            calls = calls[::-1]
        for x, experts, weights, layer, ticket in calls:
            out = np.asarray(S.end(ticket, T, H))
            ref = _reference(x, experts, weights, layers[layer])
            assert np.linalg.norm(out - ref) <= 1e-2 * np.linalg.norm(ref)
        with pytest.raises(Exception, match="no open streamed_cpu_begin"):
            S.end(calls[0][-1], T, H).block_until_ready()
        x, experts, weights = (put(a) for a in calls[-1][:3])
        begin(x, experts, weights, np.int32(ids[0])).block_until_ready()
        assert S.abandon() == 1 and S.abandon() == 0
        with pytest.raises(Exception, match="no open streamed_cpu_begin"):
            S.end(calls[0][-1], T, H).block_until_ready()
        ticket = begin(x, experts, weights, np.int32(ids[0]))
        with pytest.raises(Exception, match="this end expects 2 x 32"):  # an end of another shape
            S.end(ticket, 2, H).block_until_ready()
        np.testing.assert_array_equal(np.asarray(S.end(ticket, T, H)),
                                      np.asarray(S.streamed_cpu_mix(x, experts, weights, tables=ids[0])))
    finally:
        S.abandon()
        S.unregister_layers(ids)


@pytest.mark.gpu
def test_on_the_gpu_timed_calls_carry_their_stream_times():
    """With timing on, each CUDA call's record carries four stream times in order (before and after the input
    copy, before end's wait, after the output copy), and the CPU's run lies between the copy and the output."""
    rng = np.random.default_rng(3)
    E_, H, F, k, T = 8, 64, 96, 2, 1
    resident = np.zeros(E_, bool)
    tables = _layer(rng, E_, H, F, resident)
    device = jax.devices()[0]
    tid = S.register_layer(ExpertTables(*tables, hidden=H), device)
    put = lambda a: jax.device_put(a, device)  # noqa: E731
    begin = jax.jit(S.streamed_cpu_begin)
    try:
        S.drain_records()
        S.set_timing(True)
        for _ in range(5):
            x = put(rng.standard_normal((T, H)).astype(BF16))
            experts = put(np.stack([rng.choice(E_, k, replace=False) for _ in range(T)]).astype(np.int32))
            weights = put(rng.random((T, k)).astype(np.float32))
            ticket = begin(x, experts, weights, np.int32(tid))
            gpu_work = x.astype(jnp.float32) @ jnp.ones((H, H), jnp.float32)  # between begin and end, as the mix
            out = S.end(ticket, T, H)
            gpu_work.block_until_ready(), out.block_until_ready()
        S.set_timing(False)
        records = [r for r in S.drain_records()[0] if r["tables"] == tid]
        assert len(records) == 5
        for r in records:
            before, copied, wait, landed = r["gpu"]
            assert before <= copied <= wait <= landed
            assert copied - 1e-3 <= r["start"] <= r["end"] <= landed + 1e-3
    finally:
        S.set_timing(False)
        S.unregister_layers([tid])


def test_layers_beyond_the_records_experts_are_refused_at_registration():
    assert S.STREAMED_MAX_EXPERTS == 256
    E_ = S.STREAMED_MAX_EXPERTS + 1
    w = np.zeros((4, 8), BF16)
    tables = ExpertTables([w] * E_, [w] * E_, [w.T.copy()] * E_, hidden=8)
    with pytest.raises(KernelError, match="1 to 256 experts.*has 257"):
        S.register_layer(tables, jax.devices()[0])
    tid = S.register_layer(ExpertTables([w] * 256, [w] * 256, [w.T.copy()] * 256, hidden=8), jax.devices()[0])
    S.unregister_layers([tid])


def test_streamed_mix_refuses_bad_input():
    rng = np.random.default_rng(0)
    tables = _layer(rng, 4, 32, 48, np.array([True, False, False, False]))
    device = jax.devices()[0]
    tid = S.register_layer(ExpertTables(*tables, hidden=32), device)
    x = jax.device_put(rng.standard_normal((2, 32)).astype(BF16), device)
    weights = jnp.ones((2, 2), jnp.float32)
    try:
        with pytest.raises(KernelError, match="bfloat16"):
            S.streamed_cpu_mix(x.astype(jnp.float32), jnp.zeros((2, 2), jnp.int32), weights, tables=tid)
        with pytest.raises(KernelError, match="tokens"):
            S.streamed_cpu_mix(x, jnp.zeros((3, 2), jnp.int32), jnp.ones((3, 2)), tables=tid)
        with pytest.raises(Exception, match="no layer tables registered"):
            S.streamed_cpu_mix(x, jnp.zeros((2, 2), jnp.int32), weights, tables=tid + 1000).block_until_ready()
        with pytest.raises(Exception, match="hidden size"):
            S.streamed_cpu_mix(jnp.zeros((2, 16), jnp.bfloat16), jnp.zeros((2, 2), jnp.int32), weights,
                               tables=tid).block_until_ready()
        bad = jnp.asarray([[0, 7], [1, 2]], jnp.int32)  # expert 7 of 4: on a GPU the host function finds it
        try:
            out = np.asarray(S.streamed_cpu_mix(x, bad, weights, tables=tid))
        except Exception as e:  # the CPU platform fails the call itself
            assert "out of range" in str(e)
        else:
            assert not out.any()  # the host function wrote zeros and kept the error
            with pytest.raises(KernelError, match="out of range"):
                S.raise_pending_error()
        S.raise_pending_error()  # reported once
    finally:
        S.unregister_layers([tid])


@pytest.mark.parametrize("experts,tokens,k", [(8, 1, 2), (8, 2, 2), (4, 3, 2), (6, 2, 3)])
def test_count_vectors_are_every_routing_and_nothing_else(experts, tokens, k):
    seen = {tuple(c) for c in count_vectors(experts, tokens, k)}
    assert len(seen) == _number_of_vectors(experts, tokens * k, tokens)
    reachable = set()
    for picks in itertools.product(itertools.combinations(range(experts), k), repeat=tokens):
        reachable.add(tuple(np.bincount(np.concatenate(picks), minlength=experts)))
    assert seen == reachable
    if (experts, tokens, k) == (8, 1, 2):
        assert len(seen) == 28


def test_only_plans_no_routing_can_change_are_streamed():
    latency = LatencyModel.from_design_numbers()  # one copy 6.4 ms, one CPU expert 3.5 ms
    resident = np.array([True, False, False, False, False, False, False, False])

    def plan_of(name, **params):
        planner = P.get_planner(name, **params)
        return lambda counts: planner(counts, resident, latency)

    assert all_cpu_for_any_routing(plan_of("cpu_only"), resident, 1, 2)
    assert all_cpu_for_any_routing(plan_of("cpu_only"), resident, 2, 2)
    assert not all_cpu_for_any_routing(plan_of("cpu_only"), resident, 16, 2)  # too many classes to examine
    assert not all_cpu_for_any_routing(plan_of("fiddler"), resident, 1, 2)  # sequential: the paper's execution
    assert not all_cpu_for_any_routing(plan_of("transfer"), resident, 1, 2)
    # two offloaded experts: 7.0 ms on the CPU against 3.5 ms beside a 6.4 ms copy -> the overlap planner copies
    assert not all_cpu_for_any_routing(plan_of("fiddler_overlap"), resident, 1, 2)
    slow_copies = dataclasses.replace(latency, transfer_s=0.1)
    planner = P.get_planner("fiddler_overlap")
    assert all_cpu_for_any_routing(lambda c: planner(c, resident, slow_copies), resident, 1, 2)


def test_streamed_engine_equals_the_synced_engine_on_the_bundled_model():
    """bfloat16 bundled model, cpu_only: decode steps (one token) take the streamed lane; the logits and the
    greedy continuation are those of every step synced, and the trace still records each step's CPU lane."""
    path = default_model_path()
    engine = E.Engine.from_pretrained(path, gpu_budget=10**9, planner="cpu_only", resident_experts=8,
                                      dtype="bfloat16", progress=False)
    ids = np.asarray(fj.load_tokenizer(path)("def fibonacci(n):\n    if n < 2:")["input_ids"])[None]
    streamed = engine.generate(ids, 12, eos_token_id=[])
    layers = engine.config.num_hidden_layers
    assert all(engine.streamed.qualifies[(layer, 1)] for layer in range(layers)
               if not engine.placement.layer_all_resident(layer))
    steps = engine.trace.steps
    decode_steps = [s for s in steps if int(s.counts.sum()) == engine.config.num_experts_per_tok]
    assert len(decode_steps) == 11 * sum(not engine.placement.layer_all_resident(n) for n in range(layers))
    assert all("cpu" in s.spans and s.busy_s("cpu") >= 0 for s in decode_steps)
    assert all(set(s.lanes[(s.counts > 0) & ~engine.placement.resident[s.layer]].tolist()) <= {P.Lane.CPU}
               for s in decode_steps)
    one = ids[:, :1]
    logits_streamed = engine.logits(one)
    assert not engine.streamed.open
    serial = engine.with_planner("cpu_only", options=EngineOptions(streamed_overlap=False))  # mix, then CPU lane
    np.testing.assert_array_equal(serial.generate(ids, 12, eos_token_id=[]), streamed)
    np.testing.assert_array_equal(serial.logits(one), logits_streamed)
    engine = engine.with_planner("cpu_only", options=EngineOptions(streamed_cpu_lane=False))
    np.testing.assert_array_equal(engine.generate(ids, 12, eos_token_id=[]), streamed)
    np.testing.assert_array_equal(engine.logits(one), logits_streamed)
    assert all(len(s.spans) > 1 for s in engine.trace.steps)  # synced steps: plan, gpu and cpu spans


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe"])
def test_streamed_overlap_equals_the_synced_engine_on_random_transformers_models(family, tmp_path):
    """A random transformers model of each family in bfloat16, most experts offloaded, cpu_only: the streamed
    lane (begin, resident mix, end; the whole pass as one program, and as per-layer dispatches) and the serial
    streamed order give the tokens and logits of every step synced, greedy, sampled with one seed, and in beam
    search."""
    from tests.conftest import make_family_model

    overrides = {"mixtral": dict(hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2,
                                 num_local_experts=8, num_experts_per_tok=2),
                 "qwen3_moe": dict(hidden_size=64, intermediate_size=96, moe_intermediate_size=48,
                                   num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_experts=16,
                                   num_experts_per_tok=4, norm_topk_prob=True)}[family]
    make_family_model(family, overrides, seed=5).save_pretrained(tmp_path)
    engine = E.Engine.from_pretrained(tmp_path, gpu_budget=10**9, planner="cpu_only", resident_experts=2,
                                      dtype="bfloat16", max_batch=2, progress=False)
    ids = np.random.default_rng(2).integers(3, 97, (1, 9))
    runs = {}
    for name, options in (("overlap", EngineOptions()), ("per_layer", EngineOptions(token_program=False)),
                          ("serial", EngineOptions(streamed_overlap=False)),
                          ("synced", EngineOptions(streamed_cpu_lane=False))):
        e = engine.with_planner("cpu_only", options=options)
        runs[name] = (e.generate(ids, 8, eos_token_id=[]), e.generate(ids, 8, do_sample=True, seed=3, eos_token_id=[]),
                      e.generate(ids, 5, num_beams=2, eos_token_id=[]), np.asarray(e.logits(ids[:, :1])))
        if name == "overlap":
            assert any(set(s.spans) == {"cpu"} for s in e.trace.steps)  # decode steps streamed
    for name in ("overlap", "per_layer", "serial"):
        for got, want in zip(runs[name], runs["synced"]):
            np.testing.assert_array_equal(got, want, err_msg=name)


def test_a_pass_that_raises_between_begin_and_end_leaves_the_lane_usable(monkeypatch):
    """An error after a streamed step's begin (here: the resident mix's dispatch) abandons the begun call; the
    next forward pass pairs its begins and ends again and gives the logits of an engine that never failed. (The
    per-layer dispatches: a whole-pass program is one dispatch, tests/test_token_program.py.)"""
    path = default_model_path()
    engine = E.Engine.from_pretrained(path, gpu_budget=10**9, planner="cpu_only", resident_experts=8,
                                      dtype="bfloat16", progress=False,
                                      options=EngineOptions(token_program=False))

    def failing(*args, **kwargs):
        raise RuntimeError("injected dispatch failure")

    assert_recovers_from_injected_failure(engine, monkeypatch, engine.executor.gpu, "resident_mix", failing)


def test_fiddler_overlap_streams_decode_when_a_copy_saves_less_than_the_sync(tmp_path):
    """A latency model where, beside two offloaded one-token experts, one copy saves 1 ms of the CPU's 2 ms but
    the sync costs 1.2 ms: fiddler_overlap's decode steps stream (no plan span, nothing copied) and give the
    tokens of the synced ablation, which syncs every step and copies."""
    ms = 1e-3
    latency = dataclasses.replace(LatencyModel.from_design_numbers(),
                                  cpu=PiecewiseLinear((1, 64), (1.0 * ms, 2.0 * ms)),
                                  gpu=PiecewiseLinear((1, 64), (0.1 * ms, 0.2 * ms)), transfer_s=0.6 * ms,
                                  sync_s=1.2 * ms)
    latency.save(tmp_path / "latency.json")
    path = default_model_path()
    engine = E.Engine.from_pretrained(path, gpu_budget=10**9, planner="fiddler_overlap", resident_experts=4,
                                      dtype="bfloat16", latency=tmp_path / "latency.json", progress=False)
    ids = np.asarray(fj.load_tokenizer(path)("def fibonacci(n):\n    if n < 2:")["input_ids"])[None]
    top_k = engine.config.num_experts_per_tok
    streamed = engine.generate(ids, 10, eos_token_id=[])
    decode = [s for s in engine.trace.steps if int(s.counts.sum()) == top_k]
    assert decode and all("plan" not in s.spans for s in decode)
    assert not any((s.lanes == P.Lane.TRANSFER).any() for s in decode)
    synced = engine.with_planner("fiddler_overlap", options=EngineOptions(streamed_cpu_lane=False))
    np.testing.assert_array_equal(synced.generate(ids, 10, eos_token_id=[]), streamed)
    decode = [s for s in synced.trace.steps if int(s.counts.sum()) == top_k]
    assert all("plan" in s.spans for s in decode)
    assert any((s.lanes == P.Lane.TRANSFER).any() for s in decode)


def test_a_synced_step_does_not_prefetch_for_a_layer_that_streams(tmp_path):
    """Prefetched copies serve only a synced step's plan: when the next layer's step streams, a synced step
    leaves the PCIe lane idle instead of filling staging slots nobody reads. Layer 0 and the prompt's steps are
    forced to sync here (with max_transfers=0 every step could stream: the planner never copies); the other
    decode steps stream; the tokens are those of every layer streaming."""
    # copies fast enough that prefetching pays; max_transfers=0: plans never copy, so the PCIe lane is idle
    dataclasses.replace(LatencyModel.from_design_numbers(), transfer_s=1e-5).save(tmp_path / "latency.json")
    path = default_model_path()
    engine = E.Engine.from_pretrained(path, gpu_budget=10**9, planner="fiddler_overlap", resident_experts=4,
                                      dtype="bfloat16", latency=tmp_path / "latency.json", prefetch=2,
                                      max_transfers=0, progress=False)
    ids = np.asarray(fj.load_tokenizer(path)("def fibonacci(n):\n    if n < 2:")["input_ids"])[None]
    expected = engine.generate(ids, 8, eos_token_id=[])
    streams, rows_now = engine.streamed.tables_id, {}

    def syncs(layer, rows):
        return layer == 0 or rows > 1

    def forced(layer, rows):
        if layer == 0:
            rows_now["rows"] = rows  # asked first in every forward pass: the pass's rows
        return None if syncs(layer, rows) else streams(layer, rows)

    engine.streamed.tables_id = forced
    prefetched = []
    prefetch = engine.executor.pcie.prefetch
    engine.executor.pcie.prefetch = lambda layer, experts: (prefetched.append((layer, rows_now["rows"])),
                                                            prefetch(layer, experts))
    np.testing.assert_array_equal(engine.generate(ids, 8, eos_token_id=[]), expected)
    top_k = engine.config.num_experts_per_tok
    decode = [s for s in engine.trace.steps if int(s.counts.sum()) == top_k]
    assert {s.layer for s in decode if "plan" in s.spans} == {0} and streams(1, 1) is not None
    assert prefetched and all(syncs(layer, rows) for layer, rows in prefetched)  # the prompt's do
