"""The kernel's call dispatch: one parallel region per call (pack, phase-1, phase-2 and combine tasks with
per-expert dependencies), activations read in place only from 64-byte aligned rows, and the software prefetch
into L2. None of these may change a bit of the result: each case is compared with the 1-thread, packed,
prefetch-off result of the same call."""
from __future__ import annotations

import os

import numpy as np
import pytest

import fiddler_jax.kernels as K
from fiddler_jax.kernels._testing import BF16, at_offset
from fiddler_jax.random_bits import random_bf16

SUPPORTED = K.cpu_features()["supported_paths"]
ROW_PATHS = [p for p in ("avx2", "avx512_bf16") if p in SUPPORTED]  # the paths with the prefetch knob

pytestmark = pytest.mark.usefixtures("restore_kernel_settings")


@pytest.fixture(autouse=True)
def _restore_prefetch():
    yield
    K.set_tuning(prefetch_bytes=int(os.environ.get("FIDDLER_KERNEL_PREFETCH", "0") or 0))


def _experts(rng, E, hidden, ffn):
    w1 = random_bf16(rng, (E, ffn, hidden), std=hidden ** -0.5)
    w3 = random_bf16(rng, (E, ffn, hidden), std=hidden ** -0.5)
    return w1, w3, random_bf16(rng, (E, hidden, ffn), std=ffn ** -0.5)


# Decode-like calls (every token routed to the same k experts: each expert's tokens are consecutive rows of x, so
# they can be read in place) and scattered ones (they are packed).
CALLS = [
    ("decode k=1 n=1", 1, [[0]]),
    ("decode k=8 n=1", 1, [list(range(8))]),
    ("beams k=4 n=4", 4, [[0, 1, 2, 3]] * 4),
    ("scattered", 6, [[0, 5], [2], [5, 7, 1], [0, 3], [], [6, 2]]),
]


@pytest.mark.parametrize("path", ["auto"] + ROW_PATHS)
@pytest.mark.parametrize("name,T,routes", CALLS, ids=[c[0] for c in CALLS])
def test_alignment_threads_and_prefetch_keep_the_bits(path, name, T, routes):
    rng = np.random.default_rng(len(name))
    E, hidden, ffn = 8, 256, 96
    w1, w3, w2 = _experts(rng, E, hidden, ffn)
    x = random_bf16(rng, (T, hidden), std=1.0)
    tok = np.array([t for t, es in enumerate(routes) for _ in es], np.int32)
    exp = np.array([e for es in routes for e in es], np.int32)
    wts = rng.random(len(tok)).astype(np.float32)
    K.set_kernel_path(path)
    K.set_num_threads(1)
    K.set_tuning(prefetch_bytes=0)
    want = K.grouped_expert_ffn_numpy(at_offset(x, 16), tok, exp, wts, w1, w3, w2, np.zeros((T, hidden), np.float32))
    want1 = K.expert_ffn_numpy(at_offset(x, 16), w1[0], w3[0], w2[0], np.zeros((T, hidden), np.float32))
    for threads in (1, 2, 5):
        K.set_num_threads(threads)
        for prefetch in (0, 64, 1536, 16384, 1 << 20):
            K.set_tuning(prefetch_bytes=prefetch)
            for offset in (0, 2, 48):  # 0: rows read in place where the path can
                xo = at_offset(x, offset)
                got = K.grouped_expert_ffn_numpy(xo, tok, exp, wts, w1, w3, w2,
                                                 np.full((T, hidden), np.nan, np.float32))
                assert np.array_equal(got, want), (threads, prefetch, offset)
                got1 = K.expert_ffn_numpy(xo, w1[0], w3[0], w2[0], np.full((T, hidden), np.nan, np.float32))
                assert np.array_equal(got1, want1), (threads, prefetch, offset)


def test_bf16_out_and_unrouted_tokens_through_the_single_region():
    """Tokens no assignment touches come out zero and a bf16 out is the rounded float32 result, with the combine
    as the last tasks of the call's one parallel region."""
    rng = np.random.default_rng(1)
    E, T, hidden, ffn = 3, 5, 160, 64
    w1, w3, w2 = _experts(rng, E, hidden, ffn)
    x = random_bf16(rng, (T, hidden), std=1.0)
    tok = np.array([0, 2, 2, 4], np.int32)
    exp = np.array([1, 0, 2, 1], np.int32)
    wts = np.array([0.5, 0.25, 0.75, 1.0], np.float32)
    K.set_num_threads(3)
    f32 = K.grouped_expert_ffn_numpy(x, tok, exp, wts, w1, w3, w2, np.full((T, hidden), np.nan, np.float32))
    b16 = K.grouped_expert_ffn_numpy(x, tok, exp, wts, w1, w3, w2, np.full((T, hidden), np.nan, BF16))
    assert not f32[[1, 3]].any() and np.isfinite(f32).all()
    assert np.array_equal(b16, f32.astype(BF16))
