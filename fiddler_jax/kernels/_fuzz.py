"""Fuzz the kernel entry points with random shapes and dtypes, valid and invalid.

Run as ``python -m fiddler_jax.kernels._fuzz`` (tests/test_kernel_errors.py runs it in a subprocess, so a
crash shows up as a non-zero exit code). Valid inputs must match the float64 reference; invalid ones must
raise an exception. Prints "fuzz ok" at the end."""
from __future__ import annotations

import argparse
import sys

import numpy as np

import fiddler_jax.kernels as K
from fiddler_jax.kernels._testing import BF16, expert_ref, grouped_ref, rel_err

DTYPES = [BF16, BF16, BF16, np.float32, np.int32, np.float16]


def rand(rng, shape, dtype, scale=1.0):
    a = rng.standard_normal(shape) * scale
    if dtype == np.int32:
        return rng.integers(-3, 9, shape).astype(np.int32)
    return a.astype(dtype)


def jitter(rng, shape, p=0.15):
    """Sometimes change a dimension, drop one or add one."""
    shape = list(shape)
    r = rng.random()
    if r < p and shape:
        i = rng.integers(len(shape))
        shape[i] = max(0, shape[i] + int(rng.integers(-2, 3)))
    elif r < 1.5 * p and shape:
        shape.pop()
    elif r < 2 * p:
        shape.append(int(rng.integers(1, 3)))
    return tuple(shape)


def valid_single(x, w1, w3, w2):
    if any(a.dtype != BF16 or a.ndim != 2 for a in (x, w1, w3, w2)):
        return False
    (n, h), (f, h1) = x.shape, w1.shape
    return h1 == h and w3.shape == (f, h) and w2.shape == (h, f)


def valid_grouped(x, tok, exp, wts, w1, w3, w2):
    if x.dtype != BF16 or x.ndim != 2 or tok.dtype != np.int32 or exp.dtype != np.int32 or wts.dtype != np.float32:
        return False
    if any(a.dtype != BF16 or a.ndim != 3 for a in (w1, w3, w2)) or not (tok.ndim == exp.ndim == wts.ndim == 1):
        return False
    T, h = x.shape
    E, f, h1 = w1.shape
    if h1 != h or w3.shape != (E, f, h) or w2.shape != (E, h, f) or not (tok.shape == exp.shape == wts.shape):
        return False
    return bool(np.all((tok >= 0) & (tok < T)) and np.all((exp >= 0) & (exp < E))
                and np.all(np.isfinite(wts) & (wts >= 0)))


def one_single(rng, use_xla):
    n, h, f = int(rng.integers(0, 20)), int(rng.integers(1, 70)), int(rng.integers(0, 90))
    shapes = [(n, h), (f, h), (f, h), (h, f)]
    valid = True
    args = []
    for s in shapes:
        dt = DTYPES[rng.integers(len(DTYPES))] if rng.random() < 0.2 else BF16
        js = jitter(rng, s)
        valid &= dt == BF16 and js == s
        args.append(rand(rng, js, dt, 0.3))
    valid = valid_single(*args)
    try:
        if use_xla:
            y = np.asarray(K.expert_ffn(*args, validate=False))
        else:
            y = K.expert_ffn_numpy(*args, out=np.full((args[0].shape[0], args[0].shape[-1]), np.nan, np.float32)
                                   if args[0].ndim == 2 else np.zeros(1, np.float32))
    except Exception:
        return "rejected" if not valid else "FAIL: valid input rejected"
    if not valid:
        # XLA skips a custom call whose only output is empty, so nothing is read or checked: fine.
        return "skipped-empty" if use_xla and y.size == 0 else "FAIL: invalid input accepted"
    if y.size and rel_err(y, expert_ref(*args)) > 1e-2:
        return "FAIL: wrong result"
    return "ok"


def one_grouped(rng, use_xla):
    T, h, f, E = int(rng.integers(0, 12)), int(rng.integers(1, 50)), int(rng.integers(1, 60)), int(rng.integers(1, 5))
    A = int(rng.integers(0, 16))
    tok = rng.integers(0, max(T, 1), A).astype(np.int32)
    exp = rng.integers(0, E, A).astype(np.int32)
    wts = rng.uniform(0, 1, A).astype(np.float32)
    valid = T > 0 or A == 0
    r = rng.random()
    if A and r < 0.1:
        tok[rng.integers(A)] = int(rng.choice([-1, T, T + 5, 2**31 - 1]))
        valid = False
    elif A and r < 0.2:
        exp[rng.integers(A)] = int(rng.choice([-1, E, 1000]))
        valid = False
    elif A and r < 0.3:
        wts[rng.integers(A)] = float(rng.choice([np.nan, -1.0, np.inf]))
        valid = False
    args = [rand(rng, (T, h), BF16), tok, exp, wts, rand(rng, (E, f, h), BF16, 0.3), rand(rng, (E, f, h), BF16, 0.3),
            rand(rng, (E, h, f), BF16, 0.3)]
    if rng.random() < 0.3:
        i = int(rng.integers(len(args)))
        js = jitter(rng, args[i].shape, p=0.5)
        if js != args[i].shape:
            args[i] = rand(rng, js, args[i].dtype)
            valid = False
        elif rng.random() < 0.5:
            args[i] = args[i].astype(np.float16)
            valid = False
    valid = valid_grouped(*args)
    try:
        if use_xla:
            y = np.asarray(K.grouped_expert_ffn(*args, validate=False))
        else:
            x = args[0]
            out = np.full((x.shape[0], x.shape[-1]), np.nan, np.float32) if x.ndim == 2 else np.zeros(1, np.float32)
            y = K.grouped_expert_ffn_numpy(*args, out=out)
    except Exception:
        return "rejected" if not valid else "FAIL: valid input rejected"
    if not valid:
        return "skipped-empty" if use_xla and y.size == 0 else "FAIL: invalid input accepted"
    if y.size and A and rel_err(y, grouped_ref(*args)) > 1e-2:
        return "FAIL: wrong result"
    return "ok"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--cases", type=int, default=60)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    rng = np.random.default_rng(a.seed)
    counts = {}
    failures = []
    for i in range(a.cases):
        fn = one_single if i % 2 == 0 else one_grouped
        res = fn(rng, use_xla=(i // 2) % 2 == 0)
        counts[res.split(":")[0]] = counts.get(res.split(":")[0], 0) + 1
        if res.startswith("FAIL"):
            failures.append((i, fn.__name__, res))
    print(counts)
    if failures:
        print("failures:", failures)
        sys.exit(1)
    print("fuzz ok")


if __name__ == "__main__":
    main()
