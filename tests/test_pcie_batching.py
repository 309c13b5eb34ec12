"""The PCIe lane copies a step's experts as one batch into its stacked staging buffer and mixes them in one call:
dispatches counted by instrumenting the jitted pieces, results compared with one-expert-at-a-time copies and mixes
(float32, 1e-5) and with the all-resident model."""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fiddler_jax as fj
from fiddler_jax.errors import FiddlerError
from fiddler_jax.memory_kinds import DEVICE
from fiddler_jax.models.moe import Routing, sparse_expert_mix
from fiddler_jax.runtime import engine as E
from fiddler_jax.runtime.lanes import pcie
from fiddler_jax.runtime.latency import LatencyModel
from fiddler_jax.runtime.planning import Lane
from fiddler_jax.runtime.placement import expert_bytes
from tests.conftest import GEOMETRIES, make_hf_model, token_ids


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("pcie")
    make_hf_model(GEOMETRIES["gqa_headdim_window"], seed=7).save_pretrained(path)  # 2 layers x 4 experts, top-2
    return str(path), fj.load_pretrained(path, progress=False)


@pytest.fixture
def counted(monkeypatch):
    """Every ``stage_copy`` (its batch size) and ``staged_mix`` call the PCIe lane makes."""
    calls = {"copy": [], "mix": 0}
    copy, mix = pcie.stage_copy, pcie.staged_mix

    def counting_copy(stack, rows, experts, **kw):
        calls["copy"].append(len(experts))
        return copy(stack, rows, experts, **kw)

    def counting_mix(*args):
        calls["mix"] += 1
        return mix(*args)

    monkeypatch.setattr(pcie, "stage_copy", counting_copy)
    monkeypatch.setattr(pcie, "staged_mix", counting_mix)
    return calls


def _engine(path, **kw):
    return E.Engine.from_pretrained(path, gpu_budget=10**9, resident_experts=1, dtype="float32", progress=False,
                                    **kw)


def _step_inputs(engine, tokens: int, seed: int):
    """moe_in [tokens, hidden] float32 on the device and a top-2 routing that picks every expert."""
    cfg = engine.config
    rng = np.random.default_rng(seed)
    moe_in = jnp.asarray(rng.standard_normal((tokens, cfg.hidden_size)), jnp.float32)
    num_experts = engine.placement.resident.shape[1]
    experts = np.stack([np.arange(tokens) % num_experts, (np.arange(tokens) + 1) % num_experts], 1)
    weights = rng.uniform(0.1, 1.0, experts.shape)
    return moe_in, Routing(jnp.asarray(weights / weights.sum(1, keepdims=True), jnp.float32),
                           jnp.asarray(experts, jnp.int32))


def _per_expert(engine, layer: int, order, moe_in, routing):
    """One expert at a time: three eager copies into fresh device arrays and one mix each, summed."""
    target = jax.sharding.SingleDeviceSharding(jax.devices()[0], memory_kind=DEVICE)
    out = jnp.zeros(moe_in.shape, jnp.float32)
    E_ = engine.placement.resident.shape[1]
    for e in order:
        w = {k: jax.device_put(a, target) for k, a in engine.host.arrays(layer, int(e)).items()}
        slot_of = jnp.asarray(np.where(np.arange(E_) == e, 0, -1), jnp.int32)
        out = out + sparse_expert_mix(moe_in, routing, w["w1"][None], w["w3"][None], w["w2"][None], slot_of)
    return np.asarray(out)


@pytest.mark.parametrize("tokens", [1, 12])  # decode's gathered rows and prefill's grouped product
def test_a_step_copies_in_one_batch_and_mixes_in_one_call(checkpoint, counted, tokens):
    path, _ = checkpoint
    engine = _engine(path, planner="transfer", staging_slots=4)
    layer = int(np.flatnonzero(~engine.placement.resident.any(1))[0])  # a layer with every expert offloaded
    order = np.array([2, 0, 3], np.int32)
    lane, pool = engine.executor.pcie, engine.resources.staging
    moe_in, routing = _step_inputs(engine, tokens, seed=tokens)
    zeros = jnp.zeros(moe_in.shape, jnp.float32)
    out = lane.copy_and_mix(layer, moe_in, routing, order, zeros)
    assert counted == {"copy": [3], "mix": 1}
    assert len(pool) == 3 and pool.free() == 1
    np.testing.assert_allclose(np.asarray(out), _per_expert(engine, layer, order, moe_in, routing),
                               rtol=1e-5, atol=1e-5 * float(np.abs(np.asarray(out)).max()))
    pool.release(layer)
    assert len(pool) == 0 and pool.free() == 4


def test_more_copies_than_slots_go_in_batches_of_the_free_rows(checkpoint, counted):
    """Two slots, four copies: two batches of two, reusing the rows without waiting on the host; the pool never
    holds more than its slots."""
    path, _ = checkpoint
    engine = _engine(path, planner="transfer", staging_slots=2)
    layer = int(np.flatnonzero(~engine.placement.resident.any(1))[0])
    order = np.array([1, 3, 0, 2], np.int32)
    lane, pool = engine.executor.pcie, engine.resources.staging
    moe_in, routing = _step_inputs(engine, 12, seed=3)
    out = lane.copy_and_mix(layer, moe_in, routing, order, jnp.zeros(moe_in.shape, jnp.float32))
    assert counted == {"copy": [2, 2], "mix": 2}
    assert len(pool) == 2 and pool.staged(layer, 4).tolist() == [True, False, True, False]
    np.testing.assert_allclose(np.asarray(out), _per_expert(engine, layer, order, moe_in, routing),
                               rtol=1e-5, atol=1e-5 * float(np.abs(np.asarray(out)).max()))


def test_prefetched_copies_are_mixed_with_the_first_batch(checkpoint, counted):
    path, _ = checkpoint
    engine = _engine(path, planner="transfer", staging_slots=3)
    layer = int(np.flatnonzero(~engine.placement.resident.any(1))[0])
    lane, pool = engine.executor.pcie, engine.resources.staging
    lane.prefetch(layer, [3])  # one batch, from the lane's thread
    assert counted["copy"] == [] or counted["copy"] == [1]  # the thread may not have dispatched yet
    moe_in, routing = _step_inputs(engine, 12, seed=4)
    out = lane.copy_and_mix(layer, moe_in, routing, np.array([0, 1], np.int32),
                            jnp.zeros(moe_in.shape, jnp.float32), staged=[3])
    assert sorted(counted["copy"]) == [1, 2] and counted["mix"] == 1
    assert pool.staged(layer, 4).tolist() == [True, True, False, True] and pool.free() == 0
    np.testing.assert_allclose(np.asarray(out), _per_expert(engine, layer, [3, 0, 1], moe_in, routing),
                               rtol=1e-5, atol=1e-5 * float(np.abs(np.asarray(out)).max()))


def test_the_staging_buffer_is_the_reserved_bytes_and_refuses_more(checkpoint):
    path, _ = checkpoint
    engine = _engine(path, planner="transfer", staging_slots=3)
    pool = engine.resources.staging
    assert pool.nbytes == 3 * expert_bytes(engine.config, 4)
    assert {w: a.shape[0] for w, a in pool.stack().items()} == {"w1": 3, "w3": 3, "w2": 3}
    layer = int(np.flatnonzero(~engine.placement.resident.any(1))[0])
    pool.copy(layer, [0, 1])
    with pytest.raises(FiddlerError, match="no free staging slot"):
        pool.copy(layer, [2, 3])
    assert pool.copy(layer, [1, 2])[0] is pool.copy(layer, 1)  # held copies are not copied again
    pool.wait(layer)
    for e in (0, 1, 2):
        for w, a in pool.arrays(layer, e).items():
            np.testing.assert_array_equal(np.asarray(a), np.asarray(engine.host.arrays(layer, e)[w]))
    assert pool.backlog_s() == 0.0 and (pool.left_s(layer, 4)[:3] == 0).all()


@pytest.fixture(scope="module")
def fast_copies(tmp_path_factory):
    """A latency model whose copies are cheap enough for ``fiddler`` to choose them on the tiny model."""
    path = tmp_path_factory.mktemp("latency") / "latency.json"
    dataclasses.replace(LatencyModel.from_design_numbers(), transfer_s=1e-5).save(path)
    return path


@pytest.mark.parametrize("planner,slots", [("transfer", 4), ("transfer", 2), ("fiddler", 4)])
def test_engine_steps_make_one_copy_per_batch_and_equal_the_all_resident_model(checkpoint, counted, fast_copies,
                                                                                 planner, slots):
    """Through the engine: every step that copies k experts makes ceil(k / slots) copy calls of at most ``slots``
    experts and as many mix calls; the logits are the all-resident model's."""
    path, reference = checkpoint
    engine = _engine(path, planner=planner, staging_slots=slots, latency=fast_copies)
    ids = token_ids(97, (2, 16), seed=2)
    ref = fj.logits(reference, ids)
    out = engine.logits(ids)
    assert np.abs(out - ref).max() <= 1e-5 * np.abs(ref).max()
    copies = [int((r.lanes == Lane.TRANSFER).sum()) for r in engine.trace.steps]
    copies = [k for k in copies if k]
    assert copies and max(copies) > 1
    assert len(counted["copy"]) == counted["mix"] == sum(-(-k // slots) for k in copies)
    assert sum(counted["copy"]) == sum(copies) and max(counted["copy"]) <= slots
    assert len(engine.resources.staging) == 0


def test_batched_copies_compile_once_per_batch_size(checkpoint):
    path, _ = checkpoint
    engine = _engine(path, planner="transfer", staging_slots=4)
    jitted = engine.jitted_functions()
    start = jitted["stage_copy"]._cache_size()  # the jits are shared by every engine in the process
    prompt = token_ids(97, (1, 8), seed=6)
    engine.generate(prompt, 12, eos_token_id=[])
    before = {k: jitted[k]._cache_size() for k in ("stage_copy", "staged_mix")}
    sizes = {int((r.lanes == Lane.TRANSFER).sum()) for r in engine.trace.steps} - {0}
    assert before["stage_copy"] - start <= len(sizes)
    engine.generate(prompt, 12, eos_token_id=[])
    assert {k: jitted[k]._cache_size() for k in ("stage_copy", "staged_mix")} == before
