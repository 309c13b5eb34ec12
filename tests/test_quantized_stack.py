"""QuantizedStack, the resident experts' quantised form on the device: its shape and bytes, the row-wise product
against float64 over the dequantised weights W', and every MoE form over it against the same form over W'."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fiddler_jax.models import quantization as Q
from fiddler_jax.models.moe import Routing, gathered_expert_ffn, sparse_expert_mix
from fiddler_jax.models.quantized_experts import (QuantizedStack, dense_stack, dequantize_matrix, expert_matvec,
                                                  quantize_stack)

FORMATS = [("int8", 64), ("int4", 32), ("int4", 64)]


def stack(shape, seed, dtype=jnp.float32):
    return (jax.random.normal(jax.random.key(seed), shape, jnp.float32) * 0.1).astype(dtype)


@pytest.mark.parametrize("precision,group", FORMATS)
def test_shape_bytes_and_rows(precision, group):
    w = stack((3, 40, 128), 1)
    qs = quantize_stack(w, precision=precision, group=group)
    assert isinstance(qs, QuantizedStack) and qs.shape == (3, 40, 128) and qs.dtype == jnp.float32
    assert qs.nbytes == 3 * Q.expert_matrix_bytes(40, 128, precision, group)
    assert qs[...] is qs
    dense = np.asarray(dense_stack(qs))
    for e in range(3):
        np.testing.assert_array_equal(dense[e], np.asarray(dequantize_matrix(qs.q[e], qs.scales[e], jnp.float32)))
    np.testing.assert_array_equal(np.asarray(qs[jnp.array([2, 0])]), dense[[2, 0]])
    np.testing.assert_array_equal(np.asarray(qs[1]), dense[1])
    np.testing.assert_array_equal(np.asarray(qs[jnp.int32(2)]), dense[2])
    # the stack is a pytree: through jit and back
    again = jax.jit(lambda s: s)(qs)
    assert isinstance(again, QuantizedStack) and again.dtype == qs.dtype
    np.testing.assert_array_equal(np.asarray(again.q), np.asarray(qs.q))


@pytest.mark.parametrize("dtype,bar", [(jnp.float32, 1e-5), (jnp.bfloat16, 1e-2)])
@pytest.mark.parametrize("precision,group", FORMATS)
def test_row_product_against_float64_over_the_dequantised_weights(precision, group, dtype, bar):
    w = stack((3, 40, 128), 2, dtype)
    qs = quantize_stack(w, precision=precision, group=group)
    dense = np.asarray(dense_stack(qs), np.float64)
    v = stack((128,), 3, dtype)
    for e in range(3):
        got = np.asarray(jax.jit(expert_matvec)(qs, jnp.int32(e), v))
        want = dense[e] @ np.asarray(v, np.float64)
        assert np.abs(got - want).max() <= bar * np.abs(want).max(), (precision, group, dtype, e)
    # and the unquantised weights are elsewhere: the format's error is real
    far = np.asarray(w[0], np.float64) @ np.asarray(v, np.float64)
    assert np.abs(np.asarray(expert_matvec(qs, jnp.int32(0), v)) - far).max() > 1e-4 * np.abs(far).max()


@pytest.mark.parametrize("tokens", [1, 3, 40])  # the row-wise form (decode) and the grouped one
@pytest.mark.parametrize("precision,group", FORMATS)
def test_moe_forms_over_a_quantised_stack_equal_them_over_its_weights(precision, group, tokens):
    e, h, f, k = 6, 64, 128, 2
    w1, w3, w2 = (quantize_stack(stack(s, i), precision=precision, group=group)
                  for i, s in enumerate(((e, f, h), (e, f, h), (e, h, f)), start=10))
    dense = [dense_stack(w) for w in (w1, w3, w2)]
    rng = np.random.default_rng(tokens)
    experts = jnp.asarray(np.stack([rng.choice(8, k, replace=False) for _ in range(tokens)]).astype(np.int32))
    routing = Routing(jnp.asarray(rng.random((tokens, k)).astype(np.float32)), experts)
    slot_of = jnp.asarray([0, 1, -1, 2, 3, -1, 4, 5], jnp.int32)  # experts 2 and 5 live elsewhere
    x = stack((tokens, h), 20)
    got = np.asarray(sparse_expert_mix(x, routing, w1, w3, w2, slot_of))
    want = np.asarray(sparse_expert_mix(x, routing, *dense, slot_of))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6 * np.abs(want).max())
    ids = jnp.asarray(rng.integers(0, e, 5).astype(np.int32))
    np.testing.assert_allclose(np.asarray(gathered_expert_ffn(x[:5] if tokens >= 5 else stack((5, h), 21), ids,
                                                              w1, w3, w2)),
                               np.asarray(gathered_expert_ffn(x[:5] if tokens >= 5 else stack((5, h), 21), ids,
                                                              *dense)), rtol=1e-5, atol=1e-7)
