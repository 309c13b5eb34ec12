"""The MoE pure functions against a float64 numpy reference written from the algorithm's definition."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fiddler_jax.models import moe


def np_moe(x, gate, w1, w3, w2, top_k):
    """Mixtral MoE in float64 numpy, token by token."""
    logits = x @ gate.T
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    out = np.zeros_like(x)
    for t in range(x.shape[0]):
        top = np.argsort(-probs[t], kind="stable")[:top_k]
        w = probs[t, top] / probs[t, top].sum()
        for e, we in zip(top, w):
            g = x[t] @ w1[e].T
            h = (g / (1 + np.exp(-g))) * (x[t] @ w3[e].T)
            out[t] += we * (h @ w2[e].T)
    return out


@pytest.mark.parametrize("n,e,k", [(1, 4, 2), (17, 8, 2), (33, 3, 1), (9, 5, 3)])
def test_moe_pipeline_matches_float64_reference(n, e, k):
    rng = np.random.default_rng(n * 100 + e)
    h, f = 24, 40
    x, gate = rng.normal(size=(n, h)), rng.normal(size=(e, h))
    w1, w3, w2 = rng.normal(size=(e, f, h)) / 5, rng.normal(size=(e, f, h)) / 5, rng.normal(size=(e, h, f)) / 5
    f32 = lambda a: jnp.asarray(a, jnp.float32)  # noqa: E731
    routing = moe.route(jnp.matmul(f32(x), f32(gate).T, precision=jax.lax.Precision.HIGHEST), k)
    groups = moe.group_by_expert(routing.experts, e)
    x_sorted = f32(x)[groups.order // k]
    ref = np_moe(x, gate, w1, w3, w2, k)
    y = moe.grouped_expert_ffn(x_sorted, groups.sizes, f32(w1), f32(w3), f32(w2))
    out = np.asarray(moe.combine(y, groups, routing, n))
    assert np.abs(out - ref).max() <= 1e-4 * np.abs(ref).max()
    sorted_ids = routing.experts.reshape(-1)[groups.order]
    for form in (moe.gathered_expert_ffn, moe.rowwise_expert_ffn):
        y = form(x_sorted, sorted_ids, f32(w1), f32(w3), f32(w2))
        out = np.asarray(moe.combine(y, groups, routing, n))
        assert np.abs(out - ref).max() <= 1e-4 * np.abs(ref).max(), form.__name__
    out = np.asarray(moe.dense_expert_mix(f32(x), routing, f32(w1), f32(w3), f32(w2)))
    assert np.abs(out - ref).max() <= 1e-4 * np.abs(ref).max()


def test_route_renormalises_top_k():
    logits = jnp.array([[0.0, 1.0, 2.0, 3.0], [3.0, 3.0, -1.0, 0.0]])
    r = moe.route(logits, 2)
    np.testing.assert_array_equal(np.asarray(r.experts[0]), [3, 2])
    np.testing.assert_allclose(np.asarray(r.weights.sum(-1)), 1.0, rtol=1e-6)
    np.testing.assert_allclose(float(r.weights[0, 0]), 1 / (1 + np.exp(-1.0)), rtol=1e-6)


def test_group_by_expert_counts_and_order():
    experts = jnp.array([[2, 0], [2, 1], [0, 2]])
    g = moe.group_by_expert(experts, 4)
    np.testing.assert_array_equal(np.asarray(g.sizes), [2, 1, 3, 0])
    flat = np.asarray(experts).reshape(-1)
    assert list(flat[np.asarray(g.order)]) == [0, 0, 1, 2, 2, 2]
    assert sorted(np.asarray(g.order).tolist()) == list(range(6))


def test_expert_ffn_equals_grouped_form_for_one_group():
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(5, 8)), jnp.float32)
    w1, w3, w2 = (jnp.asarray(rng.normal(size=s), jnp.float32) for s in [(1, 12, 8), (1, 12, 8), (1, 8, 12)])
    single = moe.expert_ffn(x, w1[0], w3[0], w2[0])
    grouped = moe.grouped_expert_ffn(x, jnp.array([5], jnp.int32), w1, w3, w2)
    np.testing.assert_allclose(np.asarray(single), np.asarray(grouped), rtol=1e-5, atol=1e-5)


def test_load_balancing_loss_is_one_when_uniform_and_larger_when_collapsed():
    uniform = jnp.zeros((64, 8)).at[jnp.arange(64), jnp.arange(64) % 8].set(1e-3)
    collapsed = jnp.zeros((64, 8)).at[:, 0].set(5.0).at[:, 1].set(4.0)
    assert abs(float(moe.load_balancing_loss(uniform, 2)) - 1.0) < 1e-2
    assert float(moe.load_balancing_loss(collapsed, 2)) > 3.0
    g = jax.grad(lambda z: moe.load_balancing_loss(z, 2))(collapsed)
    assert np.isfinite(np.asarray(g)).all()


@pytest.mark.parametrize("n", [1, 3, 40])
def test_sparse_mix_over_a_partial_stack_sums_to_the_whole(n):
    """Splitting the experts between two stacks (slot maps with -1 for absent experts) and adding the two
    partial mixes gives the full mix: the identity the hybrid runtime relies on."""
    rng = np.random.default_rng(n)
    e, h, f, k = 6, 16, 24, 2
    f32 = lambda a: jnp.asarray(a, jnp.float32)  # noqa: E731
    x = f32(rng.normal(size=(n, h)))
    w1, w3, w2 = f32(rng.normal(size=(e, f, h))), f32(rng.normal(size=(e, f, h))), f32(rng.normal(size=(e, h, f)))
    routing = moe.route(f32(rng.normal(size=(n, e))), k)
    full = np.asarray(moe.sparse_expert_mix(x, routing, w1, w3, w2))
    here = np.array([1, 4, 5])
    slot_a = np.full(e, -1, np.int32)
    slot_a[here] = np.arange(3)
    rest = np.setdiff1d(np.arange(e), here)
    slot_b = np.full(e, -1, np.int32)
    slot_b[rest[::-1]] = np.arange(3)  # any row order
    part_a = moe.sparse_expert_mix(x, routing, w1[here], w3[here], w2[here], jnp.asarray(slot_a))
    part_b = moe.sparse_expert_mix(x, routing, w1[rest[::-1]], w3[rest[::-1]], w2[rest[::-1]], jnp.asarray(slot_b))
    np.testing.assert_allclose(np.asarray(part_a + part_b), full, rtol=1e-5, atol=1e-5 * np.abs(full).max())
    assert np.abs(np.asarray(part_a)).max() > 0 and np.abs(np.asarray(part_b)).max() > 0


@pytest.mark.gpu
def test_rowwise_decode_form_copies_no_expert():
    """On the GPU the row-wise form reads the chosen experts in place: XLA's temporaries stay far below one
    expert (at Mixtral's size the indexing form materialised every chosen expert: 672 MiB for two rows). XLA's CPU backend does not fuse the slice into
    the reduction, so this is a GPU property."""
    e, f, h = 4, 2048, 1024
    w1, w3, w2 = (jnp.ones((e, f, h), jnp.bfloat16), jnp.ones((e, f, h), jnp.bfloat16),
                  jnp.ones((e, h, f), jnp.bfloat16))
    x, ids = jnp.ones((2, h), jnp.bfloat16), jnp.array([1, 3], jnp.int32)
    one_weight = f * h * 2
    temps = {}
    for form in (moe.rowwise_expert_ffn, moe.gathered_expert_ffn):
        mem = jax.jit(form).lower(x, ids, w1, w3, w2).compile().memory_analysis()
        if mem is None:
            pytest.skip("this backend gives no memory analysis")
        temps[form.__name__] = mem.temp_size_in_bytes
    assert temps["rowwise_expert_ffn"] < one_weight // 2, temps
