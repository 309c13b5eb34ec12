"""Shared helpers for the kernel tests and benchmark: random bf16 expert inputs and the float64 numpy reference."""
from __future__ import annotations

import ml_dtypes
import numpy as np

from fiddler_jax.random_bits import random_bf16

BF16 = ml_dtypes.bfloat16


def expert_inputs(rng: np.random.Generator, n: int, hidden: int, ffn: int):
    """x, w1, w3, w2 with scales that keep activations O(1) (like a trained FFN)."""
    x = random_bf16(rng, (n, hidden), std=1.0)
    w1 = random_bf16(rng, (ffn, hidden), std=hidden ** -0.5)
    w3 = random_bf16(rng, (ffn, hidden), std=hidden ** -0.5)
    w2 = random_bf16(rng, (hidden, ffn), std=ffn ** -0.5)
    return x, w1, w3, w2


def expert_ref(x, w1, w3, w2) -> np.ndarray:
    x, w1, w3, w2 = (np.asarray(a, dtype=np.float64) for a in (x, w1, w3, w2))
    g = x @ w1.T
    u = x @ w3.T
    return (g / (1.0 + np.exp(-g)) * u) @ w2.T


def grouped_ref(hidden, token_idx, expert_idx, weights, w1, w3, w2) -> np.ndarray:
    out = np.zeros(hidden.shape, np.float64)
    for t, e, w in zip(token_idx, expert_idx, weights):
        out[t] += float(w) * expert_ref(hidden[t:t + 1], w1[e], w3[e], w2[e])[0]
    return out


def rel_err(y, ref) -> float:
    y = np.asarray(y, dtype=np.float64)
    assert np.all(np.isfinite(y)), "output has NaN/inf (unwritten or poisoned elements)"
    return float(np.linalg.norm(y - ref) / max(np.linalg.norm(ref), 1e-30))
