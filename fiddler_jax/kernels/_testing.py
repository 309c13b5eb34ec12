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


def at_offset(a: np.ndarray, offset: int) -> np.ndarray:
    """A copy of ``a`` whose data starts ``offset`` bytes past a 64-byte boundary."""
    raw = np.empty(a.nbytes + 128, np.uint8)
    start = (-raw.ctypes.data) % 64 + offset
    out = raw[start:start + a.nbytes].view(a.dtype).reshape(a.shape)
    out[...] = a
    return out


def grouped_inputs(rng: np.random.Generator, T: int = 4, E: int = 3, hidden: int = 24, ffn: int = 40) -> list:
    """A small valid ``grouped_expert_ffn`` call: [x, token_idx, expert_idx, weights, w1, w3, w2] (five
    assignments over tokens 0..3 and experts 0..2), for the tests that damage one argument at a time."""
    x = random_bf16(rng, (T, hidden), std=1.0)
    w1 = random_bf16(rng, (E, ffn, hidden), std=0.2)
    w3 = random_bf16(rng, (E, ffn, hidden), std=0.2)
    w2 = random_bf16(rng, (E, hidden, ffn), std=0.2)
    tok = np.array([0, 1, 2, 3, 0], np.int32)
    exp = np.array([0, 1, 2, 0, 2], np.int32)
    wts = np.array([0.5, 0.5, 1.0, 0.25, 0.1], np.float32)
    return [x, tok, exp, wts, w1, w3, w2]


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
