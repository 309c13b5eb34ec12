"""The hybrid engine at ``expert_precision`` int8 / int4: every planner computes what the plain model loaded at
the same precision computes, the host holds the quantised bytes, the bf16 model on the CPU kernel stays close to
its plain model, and precisions or groups that do not fit are refused before anything is loaded."""
from __future__ import annotations

import shutil

import numpy as np
import pytest

import fiddler_jax as fj
from fiddler_jax.assets import default_model_path
from fiddler_jax.errors import CheckpointError, InvalidInputError
from fiddler_jax.models import quantization as Q
from fiddler_jax.models.config import ModelConfig
from fiddler_jax.models.quantization import QuantizedMatrix
from fiddler_jax.models.quantized_experts import QuantizedStack
from fiddler_jax.runtime import engine as E
from fiddler_jax.runtime.planning import Lane
from tests.conftest import GEOMETRIES, make_hf_model, token_ids

GROUP = 64  # hidden 48 and moe ffn 56 are both shorter than 64: one group a row (32 divides neither)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """2 layers x 4 experts, top-2, hidden 48, expert ffn 56; float32 weights."""
    path = tmp_path_factory.mktemp("quantized_engine")
    make_hf_model(GEOMETRIES["gqa_headdim_window"], seed=4).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def plain(checkpoint):
    """The plain (all-resident, float32) models: unquantised, and at each precision, loaded once."""
    models = {"bf16": fj.load_pretrained(checkpoint, dtype="float32", progress=False)}
    for precision in ("int8", "int4"):
        models[precision] = fj.load_pretrained(checkpoint, dtype="float32", expert_precision=precision,
                                               int4_group=GROUP, progress=False)
    return models


def _expert_bytes(config, precision: str, group: int = GROUP, itemsize: int = 2) -> int:
    """Stored bytes of one expert (w1, w3, w2) at ``precision``; unquantised weights of ``itemsize`` bytes."""
    h, f = config.hidden_size, config.moe_intermediate_size
    return sum(Q.expert_matrix_bytes(o, i, precision, group, itemsize) for o, i in ((f, h), (f, h), (h, f)))


@pytest.mark.parametrize("precision", ["int8", "int4"])
@pytest.mark.parametrize("planner", ["fiddler_overlap", "cpu_only", "transfer"])
def test_hybrid_equals_the_plain_model_at_the_same_precision(checkpoint, plain, planner, precision):
    engine = E.Engine.from_pretrained(checkpoint, gpu_budget=10**9, planner=planner, resident_experts=2,
                                      dtype="float32", expert_precision=precision, int4_group=GROUP,
                                      progress=False)
    assert engine.placement.resident_count == 2
    # the host holds the offloaded experts quantised: q and scales, not the float32 matrices
    host = engine.host
    assert host.precision == precision
    assert host.expert_nbytes == _expert_bytes(engine.config, precision)
    assert host.expert_nbytes < _expert_bytes(engine.config, "bf16", itemsize=4) // 3  # not the float32 weights
    assert host.nbytes == int(host.held.sum()) * host.expert_nbytes
    layer, expert = map(int, np.argwhere(host.held)[0])
    for m in host.tables(layer):
        m = m[expert]
        assert isinstance(m, QuantizedMatrix) and m.precision == precision
        assert m.q.dtype == (np.int8 if precision == "int8" else np.uint8)

    # the resident experts stay quantised on the device: q and scales, no float32 stack
    for n, layer in enumerate(engine.model.layers):
        stack, held = layer.mlp.w1.get_value(), int(engine.placement.resident[n].sum())
        if held:
            assert isinstance(stack, QuantizedStack) and stack.shape == (held, 56, 48)
            assert stack.q.dtype == (np.int8 if precision == "int8" else np.uint8)

    ids = token_ids(97, (2, 20), seed=1)
    ref = fj.logits(plain[precision], ids)
    out = engine.logits(ids)
    assert np.abs(out - ref).max() <= 1e-5 * np.abs(ref).max(), (planner, precision)
    # and precision was not ignored: the unquantised model is far from both
    unquantised = fj.logits(plain["bf16"], ids)
    assert np.abs(out - unquantised).max() > 1e-3 * np.abs(unquantised).max()

    prompt = ids[:1, :5]
    np.testing.assert_array_equal(engine.generate(prompt, 12, eos_token_id=[]),
                                  fj.generate(plain[precision], prompt, 12, eos_token_id=[]))
    lanes = np.concatenate([r.lanes[r.counts > 0] for r in engine.trace.steps])
    off_gpu = set(lanes[lanes != Lane.GPU].tolist())
    expected = {"cpu_only": {Lane.CPU}, "transfer": {Lane.TRANSFER}}.get(planner)
    assert off_gpu and (expected is None or off_gpu == expected)


@pytest.mark.parametrize("precision", ["int8", "int4"])
def test_an_all_resident_quantised_engine_equals_the_plain_model(checkpoint, plain, precision):
    """Every expert resident and quantised: each layer runs fused (and a decode token as one program), reading
    its experts from the quantised stacks, with the plain model's logits and tokens."""
    engine = E.Engine.from_pretrained(checkpoint, gpu_budget=10**9, planner="gpu_only", dtype="float32",
                                      expert_precision=precision, int4_group=GROUP, progress=False)
    assert engine.placement.resident.all() and engine.host.nbytes == 0
    ids = token_ids(97, (2, 20), seed=2)
    ref = fj.logits(plain[precision], ids)
    assert np.abs(engine.logits(ids) - ref).max() <= 1e-5 * np.abs(ref).max()
    prompt = ids[:1, :5]
    np.testing.assert_array_equal(engine.generate(prompt, 12, eos_token_id=[]),
                                  fj.generate(plain[precision], prompt, 12, eos_token_id=[]))


def test_the_quantised_plain_models_hold_the_dequantised_experts(checkpoint, plain):
    """``fj.load_pretrained(expert_precision=...)``: every routed expert holds W' = dequantise(quantise(W)) (the
    reference the engine test compares with), distinct from W."""
    w2 = np.asarray(plain["bf16"].layers[1].mlp.w2.value[3])
    for precision in ("int8", "int4"):
        got = np.asarray(plain[precision].layers[1].mlp.w2.value[3])
        want = Q.dequantize(Q.quantize(w2, precision, GROUP))
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=0)  # jnp and numpy scales may differ by an ulp
        assert np.abs(got - w2).max() > 1e-4 * np.abs(w2).max()


def test_an_int4_group_that_does_not_fit_is_refused_with_the_groups_that_do(checkpoint, tmp_path, monkeypatch):
    """Rows of 48 (w1 / w3) and 56 (w2) inputs: 32 divides neither; refused before any weight is read."""
    config_only = tmp_path / "config_only"
    config_only.mkdir()
    shutil.copy(f"{checkpoint}/config.json", config_only / "config.json")
    match = r"int4 group 32 does not fit .* 48 inputs \(hidden_size\); use int4_group among 64, 128"
    with pytest.raises(InvalidInputError, match=match):
        E.Engine.from_pretrained(config_only, gpu_budget=10**9, resident_experts=2, dtype="float32",
                                 expert_precision="int4", int4_group=32, progress=False)
    with pytest.raises(InvalidInputError, match=match):
        E.Engine.check(ModelConfig.from_pretrained(checkpoint), gpu_budget=10**9, resident_experts=2,
                       dtype="float32", expert_precision="int4", int4_group=32)
    from fiddler_jax.models import checkpoint as C

    def no_loading(*args, **kwargs):
        raise AssertionError("load_split was called: the weights were read before the group was checked")

    monkeypatch.setattr(C, "load_split", no_loading)
    with pytest.raises(InvalidInputError, match=match):
        fj.load_pretrained(checkpoint, dtype="float32", expert_precision="int4", int4_group=32, progress=False)
    with pytest.raises(InvalidInputError, match="int4 group 48 is not supported; use one of 32, 64, 128"):
        E.Engine.from_pretrained(config_only, gpu_budget=10**9, expert_precision="int4", int4_group=48,
                                 progress=False)


def test_an_unknown_precision_is_refused_before_loading(checkpoint, tmp_path):
    config_only = tmp_path / "config_only"  # no weights: an error about them would mean loading had started
    config_only.mkdir()
    shutil.copy(f"{checkpoint}/config.json", config_only / "config.json")
    match = r"unknown expert_precision 'int3'; valid: bf16, int8, int4"
    with pytest.raises(InvalidInputError, match=match):
        E.Engine.from_pretrained(config_only, gpu_budget=10**9, dtype="float32", expert_precision="int3",
                                 progress=False)
    with pytest.raises(InvalidInputError, match=match):
        E.Engine.check(ModelConfig.from_pretrained(checkpoint), gpu_budget=10**9, expert_precision="int3")
    with pytest.raises(InvalidInputError, match=match):
        fj.load_pretrained(config_only, expert_precision="int3", progress=False)
    # the config-only folder is what makes the above "before loading": with bf16 the same call reaches the weights
    with pytest.raises(CheckpointError, match="holds no weights"):
        E.Engine.from_pretrained(config_only, gpu_budget=10**9, dtype="float32", progress=False)


@pytest.mark.parametrize("precision", ["int8", "int4"])
def test_bfloat16_hybrid_with_the_cpu_kernel_on_the_bundled_model(precision):
    """bf16 at int8 / int4 (default group): the CPU lane's kernel reads q and scales; the engine stays close to
    the plain bf16 model at the same precision, and the greedy continuation is identical."""
    path = default_model_path()
    reference = fj.load_pretrained(path, dtype="bfloat16", expert_precision=precision, progress=False)
    ids = np.asarray(fj.load_tokenizer(path)("def fibonacci(n):\n    if n < 2:")["input_ids"])[None]
    engine = E.Engine.from_pretrained(path, gpu_budget=10**9, planner="fiddler_overlap", resident_experts=8,
                                      dtype="bfloat16", expert_precision=precision, progress=False)
    assert engine.host.precision == precision
    assert engine.host.kernel_tables(0) is not None and engine.host.kernel_tables(0).precision == precision
    ref, out = fj.logits(reference, ids), engine.logits(ids)
    per_position = np.linalg.norm(out - ref, axis=-1) / np.linalg.norm(ref, axis=-1)
    assert np.median(per_position) <= 1e-2
    np.testing.assert_array_equal(engine.generate(ids, 16, eos_token_id=[]),
                                  fj.generate(reference, ids, 16, eos_token_id=[]))
    assert engine.trace_summary()["experts_per_lane"]["cpu"] > 0
