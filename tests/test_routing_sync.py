"""The packed routing sync: what the jitted segment packs, the host unpacks bit for bit."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fiddler_jax.runtime import routing_sync as R


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
@pytest.mark.parametrize("n,hidden,with_predicted", [(1, 64, True), (3, 64, False), (5, 6, True)])
def test_round_trip(dtype, n, hidden, with_predicted):
    E, k = 8, 2
    key = jax.random.key(n)
    moe_in = jax.random.normal(key, (n, hidden), dtype)
    experts = jax.random.randint(key, (n, k), 0, E, jnp.int32)
    weights = jax.random.uniform(key, (n, k), jnp.float32)
    counts = jnp.bincount(experts.reshape(-1), length=E)
    predicted = jnp.arange(E, dtype=jnp.int32)[::-1] if with_predicted else None
    words = np.asarray(jax.jit(R.pack)(counts, experts, weights, predicted, moe_in))
    step = R.unpack(words, num_experts=E, top_k=k, moe_in_shape=(n, hidden), moe_in_dtype=dtype,
                    predicted=with_predicted)
    assert np.array_equal(step.counts, np.asarray(counts))
    assert np.array_equal(step.experts, np.asarray(experts))
    assert np.array_equal(step.weights, np.asarray(weights))  # float32 bits survive the int32 trip
    if with_predicted:
        assert np.array_equal(step.predicted, np.asarray(predicted))
    else:
        assert step.predicted is None
    assert step.moe_in is not None and step.moe_in.dtype == np.dtype(dtype)
    assert np.array_equal(step.moe_in.view(np.uint8), np.asarray(moe_in).view(np.uint8))


def test_large_or_odd_steps_leave_the_activations_on_the_device():
    assert R.ships_activations((1, 4096), jnp.bfloat16)
    assert not R.ships_activations((2048, 4096), jnp.bfloat16)  # 16 MiB: the CPU lane fetches it itself
    assert not R.ships_activations((3, 5), jnp.bfloat16)  # rows of 10 bytes are not whole int32 words
    E, k, n, hidden = 4, 2, 3, 5
    moe_in = jnp.ones((n, hidden), jnp.bfloat16)
    experts = jnp.zeros((n, k), jnp.int32)
    words = np.asarray(R.pack(jnp.zeros(E, jnp.int32), experts, jnp.ones((n, k)), None, moe_in))
    assert words.shape == (E + 2 * n * k,)
    step = R.unpack(words, num_experts=E, top_k=k, moe_in_shape=(n, hidden), moe_in_dtype=jnp.bfloat16,
                    predicted=False)
    assert step.moe_in is None


def test_a_vector_of_another_layout_is_refused():
    words = np.zeros(10, np.int32)
    with pytest.raises(ValueError, match=r"expected int32 \[18\]"):
        R.unpack(words, num_experts=4, top_k=2, moe_in_shape=(2, 6), moe_in_dtype=jnp.bfloat16, predicted=False)
