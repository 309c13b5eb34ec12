"""Expert weight formats (fiddler_jax.models.quantization): int8 per-output-row and int4 group-wise symmetric
quantisation against their definitions, computed here in float64 from the weights."""
from __future__ import annotations

import numpy as np
import pytest

from fiddler_jax.errors import InvalidInputError
from fiddler_jax.models import quantization as Q


def _weights(rng, out=24, inp=128):
    w = rng.standard_normal((out, inp)).astype(np.float32) * rng.uniform(0.01, 2.0, (out, 1)).astype(np.float32)
    w[3] = 0.0  # a zero row: scale 0, q 0
    return w


def test_int8_rows_round_to_the_nearest_step_of_their_own_scale():
    rng = np.random.default_rng(0)
    w = _weights(rng)
    m = Q.quantize(w, "int8")
    assert m.q.dtype == np.int8 and m.scales.dtype == np.float32 and m.scales.shape == (24,)
    peak = np.abs(w.astype(np.float64)).max(axis=1)
    np.testing.assert_allclose(m.scales, peak / 127, rtol=1e-6)
    assert np.abs(m.q).max() == 127 and not m.q[3].any() and m.scales[3] == 0
    err = np.abs(Q.dequantize(m).astype(np.float64) - w)
    assert (err <= m.scales[:, None] * 0.5 * (1 + 1e-5) + 1e-12).all()
    assert m.nbytes == Q.expert_matrix_bytes(24, 128, "int8")


@pytest.mark.parametrize("group", Q.INT4_GROUPS)
def test_int4_groups_round_to_the_nearest_step_and_pack_two_per_byte(group):
    rng = np.random.default_rng(group)
    w = _weights(rng, inp=256)
    w[5, group:2 * group] = 0.0  # a zero group
    m = Q.quantize(w, "int4", group)
    assert m.q.dtype == np.uint8 and m.q.shape == (24, 128)
    assert m.scales.dtype == np.float16 and m.scales.shape == (24, 256 // group)
    q = Q.unpack_int4(m.q)
    assert q.min() >= -8 and q.max() <= 7
    np.testing.assert_array_equal(Q.pack_int4(q), m.q)
    assert m.scales[5, 1] == 0 and not q[5, group:2 * group].any()
    step = np.repeat(m.scales.astype(np.float64), group, axis=1)
    err = np.abs(Q.dequantize(m).astype(np.float64) - w)
    assert (err <= step * 0.5 * (1 + 1e-5) + 1e-12).all()
    # the float16 scale is within its rounding of max|W| / 7
    peak = np.abs(w.reshape(24, -1, group).astype(np.float64)).max(axis=2) / 7
    np.testing.assert_allclose(m.scales.astype(np.float64), peak, rtol=1e-3)
    assert m.nbytes == Q.expert_matrix_bytes(24, 256, "int4", group)


def test_int4_rows_shorter_than_the_group_are_one_group():
    w = _weights(np.random.default_rng(1), inp=64)
    m = Q.quantize(w, "int4", 128)
    assert m.group == 64 and m.scales.shape == (24, 1)
    np.testing.assert_array_equal(Q.dequantize(m), Q.dequantize(Q.quantize(w, "int4", 64)))
    assert m.nbytes == Q.expert_matrix_bytes(24, 64, "int4", 128)


def test_int4_nibble_layout_is_low_first_twos_complement():
    q = np.array([[1, -1, -8, 7, 0, 3]], np.int8)
    packed = Q.pack_int4(q)
    assert packed.tolist() == [[0xF1, 0x78, 0x30]]
    np.testing.assert_array_equal(Q.unpack_int4(packed), q)


def test_bytes_per_precision_shrink_as_the_issue_counts():
    bf16, int8, int4 = (Q.expert_matrix_bytes(14336, 4096, p) for p in Q.EXPERT_PRECISIONS)
    assert 1.95 < bf16 / int8 < 2.0 and 3.5 < bf16 / int4 < 4.0


@pytest.mark.parametrize("call,text", [
    (lambda: Q.quantize(np.ones((2, 64)), "fp8"), "unknown expert_precision 'fp8'"),
    (lambda: Q.quantize(np.ones((2, 64)), "int4", 48), "int4 group 48 is not supported"),
    (lambda: Q.quantize(np.ones((2, 96)), "int4", 64),
     "groups of 64 must divide the matrix's 96 inputs; use a group among 32"),
    (lambda: Q.quantize(np.ones(8), "int8"), "non-empty 2-D weight matrix"),
    (lambda: Q.quantize(np.full((2, 64), np.nan), "int8"), "NaN or infinite"),
    (lambda: Q.quantize(np.ones((2, 64)), "bf16"), "unquantised format"),
])
def test_bad_input_is_refused_with_the_fix(call, text):
    with pytest.raises(InvalidInputError, match=text):
        call()
