"""The C++ expert kernel on quantised experts (``expert_precision`` int8 / int4): the grouped call over
``ExpertTables`` of ``QuantizedMatrix`` computes the FFN with the exact weights q * scale (xla_ffi/kernels.h:
WeightFormat; not rounded to bf16 first) -- checked against a float64 reference over those weights, per path, in
poisoned buffers; the GPU's W' = bf16(q * scale) differs from them by bf16 rounding, as bf16 experts do from
float32 ones -- its result does not depend on the thread count,
malformed tables are refused by name, and the jax.numpy formats (``quantized_experts``) agree with the numpy
reference ones (``quantization``)."""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

import fiddler_jax.kernels as K
from fiddler_jax.models import quantization as Q
from fiddler_jax.kernels._lib import WEIGHT_FORMATS
from fiddler_jax.models import quantized_experts as QE
from fiddler_jax.random_bits import random_bf16

BF16 = ml_dtypes.bfloat16
AVX512 = K.path_supported("avx512_bf16")

pytestmark = pytest.mark.usefixtures("restore_kernel_settings")  # the tests change process-wide knobs

# (precision, int4 group, hidden, ffn): rows of w1 / w3 have ``hidden`` inputs, rows of w2 ``ffn``
CASES = [
    ("int8", None, 64, 96),
    ("int8", None, 80, 48),    # rows of 80 and 48 inputs: not multiples of 32 (a masked last step)
    ("int8", None, 96, 160),
    ("int4", 32, 64, 96),
    ("int4", 32, 96, 160),     # three and five groups a row
    ("int4", 64, 48, 128),     # w1 / w3 rows of 48 < 64: one group a row; w2 rows two groups
    ("int4", 64, 128, 192),
    ("int4", 128, 256, 128),
    ("int4", 128, 48, 64),     # every row shorter than its group
]
_SEED = {"int8": 8, "int4": 4}
_IDS = [f"{p}{'' if g is None else f'g{g}'}-{h}x{f}" for p, g, h, f in CASES]


def _quantized(w, precision, group):
    return w if precision == "bf16" else Q.quantize(w, precision, group or Q.DEFAULT_INT4_GROUP)


def _weights64(m) -> np.ndarray:
    """The weights the kernel computes with, in float64: a bf16 matrix as it is; a quantised one exactly
    q * scale (its row's, or its group's), computed here in float64."""
    if not isinstance(m, Q.QuantizedMatrix):
        return np.asarray(m, np.float64)
    out, inp = m.shape
    if m.precision == "int8":
        return m.q.astype(np.float64) * m.scales.astype(np.float64)[:, None]
    q = Q.unpack_int4(m.q).astype(np.float64).reshape(out, inp // m.group, m.group)
    return (q * m.scales.astype(np.float64)[:, :, None]).reshape(out, inp)


def _bf16(a: np.ndarray) -> np.ndarray:
    """float64 -> float32 -> bfloat16 (nearest even) -> float64: how the kernel rounds its float32 h."""
    return a.astype(np.float32).astype(BF16).astype(np.float64)


def _reference(x, mats, tok, exp, wts, round_h: bool):
    """(y, slack, ties): the grouped FFN in float64 over the float64 matrices ``mats[e] = (w1, w3, w2)``, h
    rounded to bfloat16 when ``round_h`` (the AVX512_BF16 path's activations).

    The kernel computes h in float32 before rounding it, so an h within the float32 error of a bfloat16 rounding
    tie may legitimately round to the other neighbour: ``slack`` bounds what such ties can move each output by
    (zero where no h is that close). A tie's reach is taken as 2^-22 of the dot products' absolute sums, about
    two float32 ulps of them. ``ties``: the fraction of the h values that close to a tie (about 1%)."""
    T, H = x.shape
    y, slack, ties = np.zeros((T, H)), np.zeros((T, H)), []
    for t, e, w in zip(tok, exp, wts):
        w1, w3, w2 = mats[e]
        xx = x[t].astype(np.float64)
        g, u = w1 @ xx, w3 @ xx
        silu = g / (1.0 + np.exp(-g))
        h = silu * u
        if round_h:
            dg, du = 2.0 ** -22 * (np.abs(w1) @ np.abs(xx)), 2.0 ** -22 * (np.abs(w3) @ np.abs(xx))
            dh = 1.1 * dg * np.abs(u) + np.abs(silu) * du + 2.0 ** -22 * np.abs(h)
            hb = _bf16(h)
            reach = np.maximum(np.abs(_bf16(h + dh) - hb), np.abs(_bf16(h - dh) - hb))
            slack[t] += float(w) * (np.abs(w2) @ reach)
            ties.append(reach > 0)
            h = hb
        y[t] += float(w) * (w2 @ h)
    return y, slack, float(np.mean(ties)) if ties else 0.0


def _problem(rng, precision, group, hidden, ffn, E=4, T=5):
    """Fresh random experts (bf16, and at ``precision``), tokens and a routing that uses every expert, some
    token twice and one expert for several tokens."""
    base = [[random_bf16(rng, s, std=s[1] ** -0.5) for s in ((ffn, hidden), (ffn, hidden), (hidden, ffn))]
            for _ in range(E)]
    base[1][0][3] = 0  # a zero row of w1: scale 0, q 0
    held = [[_quantized(m, precision, group) for m in ws] for ws in base]
    x = random_bf16(rng, (T, hidden), std=1.0)
    tok = np.array([0, 0, 1, 2, 3, 4, 4, 1], np.int32)
    exp = np.array([0, 1, 1, 3, 2, 0, 2, 0], np.int32)
    wts = rng.uniform(0.1, 1.0, len(tok)).astype(np.float32)
    return base, held, x, tok, exp, wts


def _tables(held, hidden):
    return K.ExpertTables(*[[ws[i] for ws in held] for i in range(3)], hidden=hidden)


def _call(x, tok, exp, wts, tables, out_dtype=np.float32) -> np.ndarray:
    """The kernel into a NaN-poisoned buffer; every element must have been written."""
    out = np.full(x.shape, np.nan, out_dtype)
    K.grouped_expert_ffn_numpy(x, tok, exp, wts, tables, None, None, out)
    assert np.isfinite(out.astype(np.float32)).all(), "the kernel left elements of its output unwritten"
    return out.astype(np.float64)


def _rel(y, ref) -> float:
    return float(np.linalg.norm(y - ref) / np.linalg.norm(ref))


@pytest.mark.skipif(not AVX512, reason="CPU lacks AVX512_BF16")
@pytest.mark.parametrize("precision,group,hidden,ffn", CASES, ids=_IDS)
def test_avx512_path_computes_with_exact_q_times_scale(precision, group, hidden, ffn):
    """AVX512_BF16: weights q * scale, h in bfloat16, float32 sums: within 1e-5 of the float64 reference over
    the same weights and bf16 h, outside the slack of h values sitting on a rounding tie (measured below 1e-6);
    a kernel computing with bf16(q * scale) instead would be 3e-3 away."""
    K.set_kernel_path("avx512_bf16")
    for trial in range(3):
        rng = np.random.default_rng([_SEED[precision], group or 0, hidden, ffn, trial])
        _, held, x, tok, exp, wts = _problem(rng, precision, group, hidden, ffn)
        tables = _tables(held, hidden)
        assert (tables.precision, tables.format) == (precision, WEIGHT_FORMATS[precision])
        mats = [[_weights64(m) for m in ws] for ws in held]
        ref, slack, ties = _reference(x, mats, tok, exp, wts, round_h=True)
        out = _call(x, tok, exp, wts, tables)
        excess = np.maximum(np.abs(out - ref) - slack, 0.0)
        assert np.linalg.norm(excess) / np.linalg.norm(ref) < 1e-5, (trial, _rel(out, ref))
        assert ties <= 0.05, ties  # the slack is for the rare h on a tie, not a blanket tolerance
        assert _rel(out, ref) < 1e-4  # even counting every tie (measured up to 1e-5 where one flips)
        # a bfloat16 output buffer: the float32 result rounded once
        out16 = _call(x, tok, exp, wts, tables, BF16)
        np.testing.assert_array_equal(out16, out.astype(np.float32).astype(BF16).astype(np.float64))


@pytest.mark.parametrize("precision,group,hidden,ffn", CASES, ids=_IDS)
def test_generic_path_computes_with_exact_q_times_scale(precision, group, hidden, ffn):
    """generic: weights q * scale in float32, h kept in float32: within 5e-3 of the reference with bf16 h (measured
    1.2e-3 to 2.3e-3: h's rounding), and within 1e-5 of the float64 reference whose h is not rounded (measured
    4e-7)."""
    K.set_kernel_path("generic")
    for trial in range(2):
        rng = np.random.default_rng([_SEED[precision], group or 0, hidden, ffn, trial, 1])
        _, held, x, tok, exp, wts = _problem(rng, precision, group, hidden, ffn)
        mats = [[_weights64(m) for m in ws] for ws in held]
        out = _call(x, tok, exp, wts, _tables(held, hidden))
        assert _rel(out, _reference(x, mats, tok, exp, wts, round_h=True)[0]) < 5e-3
        assert _rel(out, _reference(x, mats, tok, exp, wts, round_h=False)[0]) < 1e-5


@pytest.mark.parametrize("precision,group,bound", [("int8", None, 2e-2), ("int4", 32, 0.3), ("int4", 64, 0.3),
                                                   ("int4", 128, 0.3)])
def test_quantised_output_differs_from_bf16_by_the_format_error(precision, group, bound):
    """The kernel's output on quantised experts against its output on the bf16 experts they came from: a
    measurable change (the kernel really reads q and scales, not some bf16 copy) within the format's error."""
    hidden, ffn = 128, 256
    rng = np.random.default_rng([7, group or 0])
    base, held, x, tok, exp, wts = _problem(rng, precision, group, hidden, ffn)
    y16 = _call(x, tok, exp, wts, _tables(base, hidden))
    yq = _call(x, tok, exp, wts, _tables(held, hidden))
    err = _rel(yq, y16)
    floor = 1e-3 if precision == "int8" else 1e-2  # an int8 step is 1/127 of a row's peak, an int4 one 1/7
    assert floor < err < bound, err
    # the change is the format's: the float64 references over bf16 and over dequantised weights differ alike
    ref16 = _reference(x, [[_weights64(m) for m in ws] for ws in base], tok, exp, wts, round_h=False)[0]
    refq = _reference(x, [[_weights64(m) for m in ws] for ws in held], tok, exp, wts, round_h=False)[0]
    assert abs(err - _rel(refq, ref16)) < 0.05 * _rel(refq, ref16)


@pytest.mark.parametrize("path", ["avx512_bf16", "generic"])
@pytest.mark.parametrize("precision,group,hidden,ffn", [CASES[1], CASES[5], CASES[7]], ids=[_IDS[1], _IDS[5],
                                                                                           _IDS[7]])
def test_thread_count_does_not_change_quantised_results(path, precision, group, hidden, ffn):
    if path == "avx512_bf16" and not AVX512:
        pytest.skip("CPU lacks AVX512_BF16")
    K.set_kernel_path(path)
    rng = np.random.default_rng([11, hidden, ffn])
    T = 13
    _, held, _, _, _, _ = _problem(rng, precision, group, hidden, ffn)
    x = random_bf16(rng, (T, hidden), std=1.0)
    tok = np.repeat(np.arange(T, dtype=np.int32), 2)
    exp = rng.integers(0, 4, 2 * T).astype(np.int32)
    wts = rng.uniform(0.1, 1.0, 2 * T).astype(np.float32)
    tables = _tables(held, hidden)
    results = []
    for threads in (1, 2):
        K.set_num_threads(threads)
        assert K.get_num_threads() == threads
        results.append(_call(x, tok, exp, wts, tables))
    K.set_num_threads(0)
    np.testing.assert_array_equal(results[0], results[1])
    np.testing.assert_array_equal(_call(x, tok, exp, wts, tables), results[0])


# ---------------------------------------------------------------------------------------------------------------
# malformed tables

@pytest.mark.skipif(not AVX512, reason="CPU lacks AVX512_BF16")
@pytest.mark.parametrize("precision,group,hidden,ffn", CASES, ids=_IDS)
def test_dense_rows_compute_with_bf16_dequantised_weights(precision, group, hidden, ffn):
    """From ``set_quant_dense_min_tokens`` tokens a quantised expert's rows are dequantised to bf16 blocks
    (W' = bf16(q * scale), the GPU's weights) and the bf16 path runs on them (here AVX512_BF16; AMX where the CPU
    has it): within 1e-5 of the float64 reference over W' outside the tie slack, and 1e-3 or more away from the
    exact q * scale (so the test tells the two paths apart)."""
    K.set_quant_dense_min_tokens(1)
    rng = np.random.default_rng([_SEED[precision], group or 0, hidden, ffn, 7])
    _, held, x, tok, exp, wts = _problem(rng, precision, group, hidden, ffn)
    tables = _tables(held, hidden)
    w_prime = [[_bf16(_weights64(m)) for m in ws] for ws in held]
    ref, slack, _ = _reference(x, w_prime, tok, exp, wts, round_h=True)
    out = _call(x, tok, exp, wts, tables)
    excess = np.maximum(np.abs(out - ref) - slack, 0.0)
    assert np.linalg.norm(excess) / np.linalg.norm(ref) < 1e-5, _rel(out, ref)
    exact, _, _ = _reference(x, [[_weights64(m) for m in ws] for ws in held], tok, exp, wts, round_h=True)
    assert _rel(out, exact) > 1e-3
    K.set_quant_dense_min_tokens(None)  # auto: never on a CPU without AMX, so the exact path is back
    if not K.path_supported("amx"):
        assert _rel(_call(x, tok, exp, wts, tables), exact) < 1e-4
    with pytest.raises(K.KernelError, match="token count"):
        K.set_quant_dense_min_tokens(-3)


def _experts(precision, group=None, hidden=64, ffn=128, E=3, seed=0):
    rng = np.random.default_rng(seed)
    base = [[random_bf16(rng, s, std=0.1) for s in ((ffn, hidden), (ffn, hidden), (hidden, ffn))] for _ in range(E)]
    return [[_quantized(m, precision, group) for m in ws] for ws in base]


def _columns(experts):
    return [[ws[i] for ws in experts] for i in range(3)]


def _refused(w1s, w3s, w2s, match, hidden=64):
    """Refused both when the tables are made and through the grouped call's own sequences."""
    with pytest.raises(K.KernelError, match=match):
        K.ExpertTables(w1s, w3s, w2s, hidden=hidden)
    rng = np.random.default_rng(0)
    x = random_bf16(rng, (2, hidden), std=1.0)
    with pytest.raises(K.KernelError, match=match):
        K.grouped_expert_ffn_numpy(x, np.array([0, 1], np.int32), np.array([0, 0], np.int32),
                                   np.ones(2, np.float32), w1s, w3s, w2s, np.zeros((2, hidden), np.float32))


def test_mixing_bf16_and_quantised_experts_is_refused_by_entry():
    bf16, int8 = _columns(_experts("bf16")), _columns(_experts("int8"))
    w1s = [bf16[0][0], int8[0][1], bf16[0][2]]
    _refused(w1s, bf16[1], bf16[2], r"w1\[1\] is int8 .*but the tables hold bf16 experts")
    w3s = [int8[1][0], int8[1][1], bf16[1][2]]
    _refused(int8[0], w3s, int8[2], r"w3\[2\] is bf16 .*but the tables hold int8 experts")
    _refused(int8[0], int8[1], bf16[2], r"w2\[0\] is bf16 .*but the tables hold int8 experts")


def test_mixing_int8_and_int4_or_two_int4_groups_is_refused_by_entry():
    int8, g32, g64 = (_columns(_experts(p, g)) for p, g in (("int8", None), ("int4", 32), ("int4", 64)))
    _refused(int8[0], int8[1], [int8[2][0], g32[2][1], int8[2][2]],
             r"w2\[1\] is int4 \(group 32\), but the tables hold int8 experts")
    _refused([g32[0][0], g32[0][1], int8[0][2]], g32[1], g32[2],
             r"w1\[2\] is int8 .*but the tables hold int4 experts \(group 32\)")
    _refused(g64[0], [g64[1][0], g32[1][1], g64[1][2]], g64[2],
             r"w3\[1\] is int4 \(group 32\), but the tables hold int4 experts \(group 64\)")


def test_scales_of_the_wrong_shape_dtype_or_layout_are_refused():
    int8 = r"w1\[1\]\.scales must be a numpy float32 array of shape \(128,\)"
    int4 = r"w1\[1\]\.scales must be a numpy float16 array of shape \(128, 2\)"
    for precision, group, bad_scales, match in [
        ("int8", None, lambda s: s.astype(np.float16), int8),
        ("int8", None, lambda s: s.astype(np.float64), int8),
        ("int8", None, lambda s: np.concatenate([s, s[:1]]), int8),
        ("int8", None, lambda s: s[:, None].copy(), int8),
        ("int4", 32, lambda s: s.astype(np.float32), int4),
        ("int4", 32, lambda s: s.view(np.uint16), int4),
        ("int4", 32, lambda s: s[:, :1].copy(), int4),
        ("int4", 32, lambda s: s.T.copy(), int4),
        ("int4", 32, np.asfortranarray, r"w1\[1\]\.scales must be C-contiguous"),
    ]:
        w1s, w3s, w2s = _columns(_experts(precision, group))
        w1s[1] = dataclasses.replace(w1s[1], scales=bad_scales(w1s[1].scales))
        _refused(w1s, w3s, w2s, match)


def test_an_int4_group_that_does_not_fit_is_refused():
    """A group must divide the row and be a multiple of 32, or be the whole row (kernels.h)."""
    rng = np.random.default_rng(2)
    hidden, ffn = 96, 64

    def entry(out, inp, group):
        q = rng.integers(0, 256, (out, inp // 2)).astype(np.uint8)
        scales = rng.uniform(0.01, 0.1, (out, max(inp // group, 1))).astype(np.float16)
        return Q.QuantizedMatrix(q, scales, "int4", (out, inp), group)

    for group, match in [(48, "int4 group 48 does not fit rows of 96 inputs"),   # divides, not a multiple of 32
                         (64, "int4 group 64 does not fit rows of 96 inputs"),   # a multiple of 32, does not divide
                         (128, "int4 group 128 does not fit rows of 96 inputs")]:  # longer than the row
        w1s = [entry(ffn, hidden, group) for _ in range(2)]
        w3s = [entry(ffn, hidden, group) for _ in range(2)]
        w2s = [entry(hidden, ffn, 64) for _ in range(2)]
        _refused(w1s, w3s, w2s, match, hidden=hidden)
    # w2's group is checked as well
    w1s = [entry(ffn, hidden, 32) for _ in range(2)]
    w3s = [entry(ffn, hidden, 32) for _ in range(2)]
    w2s = [entry(hidden, ffn, 16) for _ in range(2)]
    _refused(w1s, w3s, w2s, "int4 group 16 does not fit", hidden=hidden)


def test_non_contiguous_or_misshapen_q_is_refused():
    for precision, group in (("int8", None), ("int4", 64)):
        w1s, w3s, w2s = _columns(_experts(precision, group))
        w2s[2] = dataclasses.replace(w2s[2], q=np.asfortranarray(w2s[2].q))
        _refused(w1s, w3s, w2s, r"w2\[2\]\.q must be C-contiguous")
        w1s, w3s, w2s = _columns(_experts(precision, group))
        wide = np.zeros((w3s[0].q.shape[0], 2 * w3s[0].q.shape[1]), w3s[0].q.dtype)
        wide[:, ::2] = w3s[0].q
        w3s[0] = dataclasses.replace(w3s[0], q=wide[:, ::2])  # a strided view of the right shape
        _refused(w1s, w3s, w2s, r"w3\[0\]\.q must be C-contiguous")
        w1s, w3s, w2s = _columns(_experts(precision, group))
        w1s[0] = dataclasses.replace(w1s[0], q=w1s[0].q.view(np.uint8 if precision == "int8" else np.int8))
        _refused(w1s, w3s, w2s, r"w1\[0\]\.q must be a numpy (u)?int8 array")
        w1s, w3s, w2s = _columns(_experts(precision, group))
        w1s[1] = dataclasses.replace(w1s[1], shape=(95, 64))
        _refused(w1s, w3s, w2s, r"w1\[1\] is a quantised matrix of shape \(95, 64\), expected \(128, 64\)")


# ---------------------------------------------------------------------------------------------------------------
# jax.numpy formats against the numpy reference

def _weights(rng, out, inp, dtype):
    w = rng.standard_normal((out, inp)) * rng.uniform(0.01, 2.0, (out, 1))
    w[2] = 0.0  # a zero row: scale 0, q 0
    return w.astype(dtype)


@pytest.fixture(autouse=True)
def _on_cpu_device():
    with jax.default_device(jax.devices("cpu")[0]):
        yield


@pytest.mark.parametrize("dtype", [np.float32, BF16])
@pytest.mark.parametrize("precision,group,shape", [("int8", None, (56, 48)), ("int8", None, (96, 80)),
                                                   ("int4", 32, (64, 96)), ("int4", 64, (48, 128)),
                                                   ("int4", 64, (56, 48)), ("int4", 128, (40, 256))])
def test_jnp_quantize_matrix_agrees_with_the_numpy_reference(precision, group, shape, dtype):
    rng = np.random.default_rng([shape[0], shape[1], group or 0])
    w = _weights(rng, *shape, dtype)
    group = group or Q.DEFAULT_INT4_GROUP
    ref = Q.quantize(w, precision, group)
    q, s = (np.asarray(a) for a in QE.quantize_matrix(jnp.asarray(w), precision=precision, group=group))
    assert (q.dtype, q.shape) == (ref.q.dtype, ref.q.shape)
    assert (s.dtype, s.shape) == (ref.scales.dtype, ref.scales.shape)
    s64, r64 = s.astype(np.float64), ref.scales.astype(np.float64)
    assert (np.abs(s64 - r64) <= 1e-6 * np.abs(r64)).all()
    assert not s[2].any()
    qa, qb = (a if precision == "int8" else Q.unpack_int4(a) for a in (q, ref.q))
    steps = qa.astype(np.int16) - qb.astype(np.int16)
    assert np.abs(steps).max() <= 1 and np.count_nonzero(steps) <= 0.005 * steps.size
    assert not qa[2].any()


@pytest.mark.parametrize("precision,group,shape", [("int8", None, (56, 48)), ("int4", 32, (64, 96)),
                                                   ("int4", 64, (56, 48)), ("int4", 128, (40, 256))])
def test_jnp_dequantize_matrix_equals_the_numpy_reference(precision, group, shape):
    rng = np.random.default_rng([shape[0], shape[1], group or 0, 1])
    m = Q.quantize(_weights(rng, *shape, np.float32), precision, group or Q.DEFAULT_INT4_GROUP)
    want = Q.dequantize(m)
    w32 = np.asarray(QE.dequantize_matrix(jnp.asarray(m.q), jnp.asarray(m.scales), jnp.float32))
    assert w32.dtype == np.float32
    np.testing.assert_array_equal(w32, want)
    w16 = np.asarray(QE.dequantize_matrix(jnp.asarray(m.q), jnp.asarray(m.scales), jnp.bfloat16))
    assert w16.dtype == BF16
    np.testing.assert_array_equal(w16.view(np.uint16), want.astype(BF16).view(np.uint16))
    # traced (the PCIe lane dequantises inside its jitted copy): the same bits
    jitted = jax.jit(QE.dequantize_matrix, static_argnums=2)(jnp.asarray(m.q), jnp.asarray(m.scales), jnp.bfloat16)
    np.testing.assert_array_equal(np.asarray(jitted).view(np.uint16), w16.view(np.uint16))
