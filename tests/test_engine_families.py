"""The hybrid engine on the fine-grained families (Qwen3-MoE with dense layers, OLMoE, Qwen2-MoE with a shared
expert), most routed experts off the "GPU": every planner computes the all-resident model's logits and greedy
tokens, the streamed lane gives the synced lane's bits, and beam search gives transformers' beams."""
from __future__ import annotations

import copy

import numpy as np
import pytest

import fiddler_jax as fj
from fiddler_jax.runtime import engine as E
from fiddler_jax.runtime.options import EngineOptions
from fiddler_jax.runtime.planning import Lane
from tests.conftest import FAMILY_GEOMETRIES, make_family_model, token_ids

ALL_PLANNERS = [("fiddler", 0), ("fiddler_overlap", 0), ("cpu_only", 0), ("transfer", 0), ("lru", 1)]
CASES = [(g, p, c) for g in sorted(FAMILY_GEOMETRIES)
         for p, c in (ALL_PLANNERS if g in ("qwen3_dense_layer", "qwen2_shared") else ALL_PLANNERS[1:3])]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """``saved(name)`` → (transformers model, folder it saved) of a FAMILY_GEOMETRIES entry, made once."""
    made = {}

    def get(name):
        if name not in made:
            hf = make_family_model(*FAMILY_GEOMETRIES[name])
            path = tmp_path_factory.mktemp(name)
            hf.save_pretrained(path)
            made[name] = hf, str(path)
        return made[name]

    return get


@pytest.mark.parametrize("geometry,planner,cache_slots", CASES)
def test_hybrid_equals_all_resident_float32(saved, geometry, planner, cache_slots):
    name = geometry
    hf, path = saved(geometry)
    reference = fj.load_pretrained(path, progress=False)
    cfg = reference.config
    engine = E.Engine.from_pretrained(path, gpu_budget=10**9, planner=planner, resident_experts=3, dtype="float32",
                                      cache_slots=cache_slots, progress=False)
    placement = engine.placement
    assert placement.resident_count == 3 and placement.offloaded_count == len(cfg.moe_layers) * cfg.num_experts - 3
    assert all(placement.resident[n].all() for n in placement.dense_layers)
    ids = token_ids(97, (2, 14), seed=1)
    ref = fj.logits(reference, ids)
    out = engine.logits(ids)
    assert np.abs(out - ref).max() <= 1e-5 * np.abs(ref).max(), (name, planner)
    prompt = ids[:1, :5]
    np.testing.assert_array_equal(engine.generate(prompt, 12, eos_token_id=[]),
                                  fj.generate(reference, prompt, 12, eos_token_id=[]))
    assert {s.layer for s in engine.trace.steps} <= set(cfg.moe_layers)  # dense layers run fused, unplanned
    lanes = np.concatenate([r.lanes[r.counts > 0] for r in engine.trace.steps])
    assert set(lanes[lanes != Lane.GPU].tolist())  # something ran off the GPU


@pytest.fixture(scope="module")
def bf16_shared(tmp_path_factory):
    """Qwen2-MoE with a shared expert and a dense layer, saved in bfloat16 (the CPU kernel's dtype)."""
    import torch

    family, overrides = FAMILY_GEOMETRIES["qwen2_shared"]
    hf = make_family_model(family, overrides | {"hidden_size": 64, "moe_intermediate_size": 32}, seed=3)
    path = tmp_path_factory.mktemp("bf16_shared")
    copy.deepcopy(hf).to(torch.bfloat16).save_pretrained(path)
    return str(path)


def test_streamed_lane_equals_the_synced_lane_bf16(bf16_shared):
    engine = E.Engine.from_pretrained(bf16_shared, gpu_budget=10**9, planner="cpu_only", resident_experts=4,
                                      dtype="bfloat16", progress=False)
    ids = token_ids(97, (1, 7), seed=2)
    streamed = engine.generate(ids, 10, eos_token_id=[])
    moe_layers = engine.config.moe_layers
    assert all(engine.streamed.qualifies[(layer, 1)] for layer in moe_layers)
    synced = engine.with_planner("cpu_only", options=EngineOptions(streamed_cpu_lane=False))
    np.testing.assert_array_equal(synced.generate(ids, 10, eos_token_id=[]), streamed)
    one = ids[:, :1]
    # the per-layer streamed dispatches give the synced logits bit for bit; the whole-pass program (the default)
    # is compiled as one computation, so in bf16 it agrees to bf16 rounding (runtime/token_program.py)
    per_layer = engine.with_planner("cpu_only", options=EngineOptions(token_program=False))
    np.testing.assert_array_equal(synced.logits(one), per_layer.logits(one))
    assert engine.step_loop.program_for(1) is not None
    got, want = engine.logits(one), synced.logits(one)
    assert np.abs(got - want).max() <= 2e-2 * np.abs(want).max()
    np.testing.assert_array_equal(got.argmax(-1), want.argmax(-1))
    reference = fj.load_pretrained(bf16_shared, dtype="bfloat16", progress=False)
    ref = fj.logits(reference, ids)
    out = engine.logits(ids)
    per_position = np.linalg.norm(out - ref, axis=-1) / np.linalg.norm(ref, axis=-1)
    assert np.median(per_position) <= 1e-2


@pytest.mark.parametrize("name", ["qwen3_dense_layer", "qwen2_shared"])
@pytest.mark.parametrize("k", [2, 4])
def test_engine_beam_search_equals_transformers(saved, name, k):
    import torch

    hf, path = saved(name)
    ids = token_ids(97, (1, 6), seed=4)
    engine = E.Engine.from_pretrained(path, gpu_budget=10**9, planner="fiddler_overlap", resident_experts=3,
                                      dtype="float32", max_batch=k, progress=False)
    ours = engine.generate(ids, 10, num_beams=k, eos_token_id=2)
    with torch.no_grad():
        ref = hf.generate(torch.as_tensor(ids), max_new_tokens=10, num_beams=k, do_sample=False, eos_token_id=2,
                          pad_token_id=2).numpy()
    assert ours.shape == ref.shape
    np.testing.assert_array_equal(ours, ref, err_msg=name)
