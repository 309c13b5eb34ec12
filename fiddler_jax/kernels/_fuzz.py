"""Fuzz the kernel entry points with random shapes, dtypes, values, output buffers and runtime knobs, valid and
invalid.

Run as ``python -m fiddler_jax.kernels._fuzz --cases N --seed S`` (tests/test_kernel_errors.py runs it in a
subprocess, so a crash shows up as a non-zero exit code). What it draws, and what it expects:

- the single-expert op and the grouped op, alternately through XLA (``validate=False``: the C++ handler's
  checks) and through the numpy entry points (``expert_ffn_numpy``, ``grouped_expert_ffn_numpy``);
- shapes that are right or off by a dimension, matrices of the wrong dtype;
- index arrays of every kind a caller might hand in: int32, int64/uint64 in range and beyond int32 (2**32 would
  wrap to 0), int8/int16/uint8, floats, bools, Python lists; routing weights in float32, float16, bfloat16,
  float64, Python lists; out-of-range, negative, NaN and inf routing values;
- NaN and inf in the activations or the expert matrices (valid: they propagate; the output must be non-finite
  exactly where the float64 reference is, and match it elsewhere);
- ``out`` buffers (numpy entry points) that are right (float32 or bfloat16, NaN-poisoned) or wrong: read-only
  arrays and read-only ``np.memmap`` files, the wrong shape or dtype, non-contiguous or misaligned views, lists;
- between calls, the runtime knobs: ``set_num_threads`` (valid counts, counts beyond ``max_threads()``, floats,
  bools, strings), ``set_kernel_path`` (supported, unsupported, unknown), ``set_pool`` (spin in and out of range),
  ``set_amx_min_tokens``, ``set_tuning``; and, once per 100 cases (``--env-every``), a subprocess started with random
  FIDDLER_KERNEL_THREADS / FIDDLER_KERNEL_PATH / FIDDLER_KERNEL_SPIN_US values, which must compute or refuse
  with a KernelError, never die by a signal.

Valid input must match the float64 reference; invalid input must raise (a ``KernelError`` with a one-line
message from the numpy entry points and the knobs; any exception from the XLA path). Prints "fuzz ok" at the
end, else the failing cases (each with its case number, so ``--only N`` replays one) and exits 1."""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

import fiddler_jax.kernels as K
from fiddler_jax.kernels._lib import MAX_SPIN_US
from fiddler_jax.kernels._testing import BF16, expert_ref, grouped_ref

MAT_DTYPES = [BF16, BF16, BF16, np.float32, np.int32, np.float16]
TOL = 1e-2


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


def poison(rng, a):
    """Sometimes put NaN or +-inf into a bf16 activation or weight array (valid input: it propagates)."""
    if a.size == 0 or a.dtype != BF16 or rng.random() >= 0.08:
        return a
    a = a.copy()
    flat = a.reshape(-1)
    for _ in range(int(rng.integers(1, 3))):
        flat[rng.integers(flat.size)] = rng.choice([np.nan, np.inf, -np.inf])
    return a


def expert_scale(x, w1, w3, w2) -> np.ndarray:
    """Σ_j |h_j w2_ij| per output: what the kernel's bf16 rounding of h (and of a bf16 output) is relative to. When
    the terms cancel, the result is small next to it and its relative error alone says nothing."""
    x, w1, w3, w2 = (np.asarray(a, dtype=np.float64) for a in (x, w1, w3, w2))
    g, u = x @ w1.T, x @ w3.T
    return np.abs(g / (1.0 + np.exp(-g)) * u) @ np.abs(w2.T)


def grouped_scale(x, tok, exp, wts, w1, w3, w2) -> np.ndarray:
    out = np.zeros(x.shape, np.float64)
    for t, e, w in zip(tok, exp, wts):
        out[t] += abs(float(w)) * expert_scale(x[t:t + 1], w1[e], w3[e], w2[e])[0]
    return out


def compare(y, ref, scale) -> str | None:
    """None if y matches the float64 reference: non-finite exactly where it is and, elsewhere, within TOL of it
    relatively, or within 2.5 bf16 roundings (h, then a bf16 output: 2**-8 of ``scale``) of it absolutely."""
    y = np.asarray(y, dtype=np.float64)
    if y.shape != ref.shape:
        return f"shape {y.shape} != {ref.shape}"
    fy, fr = np.isfinite(y), np.isfinite(ref)
    if not np.array_equal(fy, fr):
        return f"non-finite at {int((fy != fr).sum())} elements where the reference is not (or vice versa)"
    d, r, sc = (y - ref)[fr], ref[fr], scale[fr]
    err = np.linalg.norm(d)
    if d.size and err > TOL * max(np.linalg.norm(r), 1e-30) and err > 0.01 * np.linalg.norm(sc):
        return (f"relative error {err / max(np.linalg.norm(r), 1e-30):.3g} (error / scale "
                f"{err / max(np.linalg.norm(sc), 1e-30):.3g})")
    return None


# ------------------------------------------------------------------------------------------------- out buffers

_TMP = tempfile.mkdtemp(prefix="fiddler_fuzz_")


def make_out(rng, shape, case: int):
    """A NaN-poisoned output buffer for the numpy entry points and whether it is acceptable."""
    dtype = np.float32 if rng.random() < 0.7 else BF16
    if rng.random() >= 0.25:
        return np.full(shape, np.nan, dtype), True
    kind = rng.choice(["readonly", "memmap_r", "shape", "dtype", "strided", "misaligned", "list", "none",
                       "memmap_rw", "fortran"])
    if kind == "readonly":
        out = np.full(shape, np.nan, dtype)
        out.flags.writeable = False
        return out, False
    if kind in ("memmap_r", "memmap_rw"):
        path = os.path.join(_TMP, f"out{case}.bin")
        np.full(shape, np.nan, dtype).tofile(path)
        if int(np.prod(shape)) == 0:  # numpy cannot map an empty file
            return np.full(shape, np.nan, dtype), True
        out = np.memmap(path, dtype=dtype, mode="r" if kind == "memmap_r" else "r+", shape=shape)
        return out, kind == "memmap_rw"
    if kind == "shape":
        bad = jitter(rng, shape, p=0.5)
        return np.full(bad, np.nan, dtype), bad == tuple(shape)
    if kind == "dtype":
        return np.full(shape, np.nan, rng.choice([np.float16, np.float64, np.int32])), False
    if kind == "strided":
        if len(shape) != 2 or shape[1] == 0 or shape[0] == 0:
            return np.full(shape, np.nan, dtype), True
        out = np.full((shape[0], 2 * shape[1]), np.nan, dtype)[:, ::2]
        return out, out.flags.c_contiguous  # one column: a contiguous view after all
    if kind == "fortran":
        out = np.asfortranarray(np.full(shape, np.nan, dtype))
        return out, out.flags.c_contiguous
    if kind == "misaligned":
        n = int(np.prod(shape))
        if n == 0:
            return np.full(shape, np.nan, dtype), True
        item = np.dtype(dtype).itemsize
        raw = np.zeros(n * item + 1, np.uint8)
        out = raw[1:].view(dtype).reshape(shape)
        out[...] = np.nan
        return out, out.flags.aligned
    if kind == "list":
        return np.full(shape, np.nan, np.float32).tolist(), False
    return None, False


# ------------------------------------------------------------------------------------------------- single op

def valid_single(x, w1, w3, w2):
    if any(a.dtype != BF16 or a.ndim != 2 for a in (x, w1, w3, w2)):
        return False
    (n, h), (f, h1) = x.shape, w1.shape
    return h1 == h and w3.shape == (f, h) and w2.shape == (h, f)


def one_single(rng, use_xla, case):
    n, h, f = int(rng.integers(0, 20)), int(rng.integers(1, 70)), int(rng.integers(0, 90))
    shapes = [(n, h), (f, h), (f, h), (h, f)]
    args = []
    clean = rng.random() < 0.5  # half the cases: right shapes and dtypes (the rest probe the checks)
    for s in shapes:
        dt = MAT_DTYPES[rng.integers(len(MAT_DTYPES))] if not clean and rng.random() < 0.2 else BF16
        args.append(poison(rng, rand(rng, s if clean else jitter(rng, s), dt, 0.3)))
    valid = valid_single(*args)
    out_ok = True
    try:
        if use_xla:
            y = np.asarray(K.expert_ffn(*args, validate=False))
        else:
            shape = (args[0].shape[0], args[0].shape[-1]) if args[0].ndim == 2 else (1,)
            out, out_ok = make_out(rng, shape, case)
            y = K.expert_ffn_numpy(*args, out=out)
    except Exception as e:  # noqa: BLE001 - the fuzzer classifies every exception
        return rejected(e, valid and out_ok, use_xla)
    if not (valid and out_ok):
        # XLA skips a custom call whose only output is empty, so nothing is read or checked: fine.
        return "skipped-empty" if use_xla and y.size == 0 else "FAIL: invalid input accepted"
    if y.size:
        bad = compare(y, expert_ref(*args), expert_scale(*args))
        if bad:
            return f"FAIL: wrong result ({bad})"
    return "ok"


# ------------------------------------------------------------------------------------------------ grouped op

def index_array(rng, values: np.ndarray, bound: int):
    """values (int64, in range unless made otherwise) in a random container and dtype, and whether the numpy
    entry / the XLA op must accept it."""
    r = rng.random()
    in_range = bool(np.all((values >= 0) & (values < bound)))
    if r < 0.7:
        return values.astype(np.int32), in_range, in_range
    kind = rng.choice(["int64", "int64_wrap", "uint64", "uint64_huge", "int16", "uint8", "float32", "float64",
                       "bool", "list", "list_wrap"])
    if kind in ("int64", "int16", "uint8") or (kind == "uint64" and np.all(values >= 0)):
        dt = {"int64": np.int64, "uint64": np.uint64, "int16": np.int16, "uint8": np.uint8}[kind]
        fits = bool(np.all((values >= np.iinfo(dt).min) & (values <= np.iinfo(dt).max)))
        a = values.astype(dt)
        return a, in_range and fits, False
    if kind == "int64_wrap" and values.size:  # 2**32 + i wraps to the valid index i
        a = values.astype(np.int64)
        a[rng.integers(a.size)] += 2 ** 32
        return a, False, False
    if kind == "uint64_huge" and values.size:
        a = np.abs(values).astype(np.uint64)
        a[rng.integers(a.size)] = np.uint64(2 ** 63 + 1)
        return a, False, False
    if kind in ("float32", "float64"):
        return values.astype(kind), values.size == 0 and False, False
    if kind == "bool":
        return values.astype(bool), False, False
    if kind == "list":  # jnp.asarray([]) is float32: the XLA op refuses an empty list
        return [int(v) for v in values], in_range, in_range and values.size > 0
    if kind == "list_wrap" and values.size:
        vals = [int(v) for v in values]
        vals[int(rng.integers(len(vals)))] += 2 ** 32
        return vals, False, False
    return values.astype(np.int32), in_range, in_range


def weights_array(rng, values: np.ndarray):
    """Routing weights in a random dtype/container, and whether the numpy entry / the XLA op accept them."""
    finite = bool(np.all(np.isfinite(values) & (values >= 0)))
    r = rng.random()
    if r < 0.75:
        return values.astype(np.float32), finite, finite
    kind = rng.choice(["float16", "bfloat16", "float64", "list", "int32"])
    if kind == "float16":
        return values.astype(np.float16), False, False
    if kind == "bfloat16":
        return values.astype(BF16), False, False
    if kind == "float64":
        return values.astype(np.float64), False, False
    if kind == "int32":
        return values.astype(np.int32), False, False
    return [float(v) for v in values], False, finite  # jnp.asarray makes a weak float32 array of a list


def shapes_match(x, w1, w3, w2) -> bool:
    if x.dtype != BF16 or x.ndim != 2 or any(a.dtype != BF16 or a.ndim != 3 for a in (w1, w3, w2)):
        return False
    E, f, h = w1.shape
    return h == x.shape[1] and w3.shape == (E, f, h) and w2.shape == (E, h, f)


def one_grouped(rng, use_xla, case):
    T, h, f, E = int(rng.integers(0, 12)), int(rng.integers(1, 50)), int(rng.integers(1, 60)), int(rng.integers(1, 5))
    A = int(rng.integers(0, 16))
    tok = rng.integers(0, max(T, 1), A).astype(np.int64)
    exp = rng.integers(0, E, A).astype(np.int64)
    wts = rng.uniform(0, 1, A).astype(np.float32)
    r = rng.random()
    if A and r < 0.1:
        tok[rng.integers(A)] = int(rng.choice([-1, T, T + 5, 2**31 - 1]))
    elif A and r < 0.2:
        exp[rng.integers(A)] = int(rng.choice([-1, E, 1000]))
    elif A and r < 0.3:
        wts[rng.integers(A)] = float(rng.choice([np.nan, -1.0, np.inf]))
    mats = [poison(rng, rand(rng, (T, h), BF16)), poison(rng, rand(rng, (E, f, h), BF16, 0.3)),
            poison(rng, rand(rng, (E, f, h), BF16, 0.3)), poison(rng, rand(rng, (E, h, f), BF16, 0.3))]
    if rng.random() < 0.2:
        i = int(rng.integers(len(mats)))
        js = jitter(rng, mats[i].shape, p=0.5)
        if js != mats[i].shape:
            mats[i] = rand(rng, js, mats[i].dtype)
        elif rng.random() < 0.5:
            mats[i] = mats[i].astype(np.float16)
    x, w1, w3, w2 = mats
    shapes_ok = shapes_match(x, w1, w3, w2)
    # Index bounds from the arrays as they are (a jittered x may still agree with everything else).
    T = x.shape[0] if shapes_ok else T
    E = w1.shape[0] if shapes_ok else E
    tok_a, tok_np, tok_xla = index_array(rng, tok, T)
    exp_a, exp_np, exp_xla = index_array(rng, exp, E)
    wts_a, wts_np, wts_xla = weights_array(rng, wts)
    shapes_ok = shapes_ok and np.shape(tok_a) == np.shape(exp_a) == np.shape(wts_a) == (A,)
    args = [x, tok_a, exp_a, wts_a, w1, w3, w2]
    valid = shapes_ok and (tok_xla and exp_xla and wts_xla if use_xla else tok_np and exp_np and wts_np)
    out_ok = True
    try:
        if use_xla:
            y = np.asarray(K.grouped_expert_ffn(*args, validate=False))
        else:
            shape = (x.shape[0], x.shape[-1]) if x.ndim == 2 else (1,)
            out, out_ok = make_out(rng, shape, case)
            y = K.grouped_expert_ffn_numpy(*args, out=out)
    except Exception as e:  # noqa: BLE001
        return rejected(e, valid and out_ok, use_xla)
    if not (valid and out_ok):
        return "skipped-empty" if use_xla and y.size == 0 else "FAIL: invalid input accepted"
    if y.size:
        ref_args = (x, np.asarray(tok, np.int64), np.asarray(exp, np.int64), wts, w1, w3, w2)
        bad = compare(y, grouped_ref(*ref_args), grouped_scale(*ref_args))
        if bad:
            return f"FAIL: wrong result ({bad})"
    return "ok"


def rejected(e: Exception, should_accept: bool, use_xla: bool) -> str:
    if should_accept:
        return f"FAIL: valid input rejected ({type(e).__name__}: {str(e)[:300]})"
    if not use_xla:
        if not isinstance(e, K.KernelError):
            return f"FAIL: numpy entry raised {type(e).__name__}, not KernelError: {str(e)[:300]}"
        if "\n" in str(e) or not str(e):
            return f"FAIL: message is not one line: {str(e)[:300]!r}"
    return "rejected"


# ----------------------------------------------------------------------------------------------------- knobs

def one_knob(rng) -> str:
    """Change one runtime knob, validly or not; the cases after it run under whatever it left."""
    cap = K.max_threads()
    knob = rng.choice(["threads", "threads", "path", "path", "pool", "amx_min", "tuning"])
    if knob == "threads":
        good = [0, 1, 2, 3, 5, -1]
        bad = [cap + 1, 10 ** 6, 2 ** 31 - 1, 2 ** 40, 10 ** 30, 1.5, "4", True, None]
        ok = rng.random() < 0.7
        pick = good[rng.integers(len(good))] if ok else bad[rng.integers(len(bad))]
        call = lambda: K.set_num_threads(pick, pin=bool(rng.random() < 0.2))  # noqa: E731
    elif knob == "path":
        pick = str(rng.choice(list(K.PATHS) + ["sse9", "AMX", ""]))
        ok = pick in K.PATHS and K.path_supported(pick)
        call = lambda: K.set_kernel_path(pick)  # noqa: E731
    elif knob == "pool":
        good = [0, 10, 50, 200]
        bad = [-1, MAX_SPIN_US + 1, 2 ** 40, 0.5]
        ok = rng.random() < 0.7
        pick = good[rng.integers(len(good))] if ok else bad[rng.integers(len(bad))]
        call = lambda: K.set_pool(spin_us=pick, wait_all=bool(rng.random() < 0.2))  # noqa: E731
    elif knob == "amx_min":
        ok = rng.random() < 0.8
        pick = int(rng.integers(1, 64)) if ok else [2 ** 70, 2.5, "8"][rng.integers(3)]
        call = lambda: K.set_amx_min_tokens(pick)  # noqa: E731
    else:
        ok = rng.random() < 0.7
        pick = int(rng.choice([0, 64, 256, 4096])) if ok else [-1, 2 ** 40, 1.5][rng.integers(3)]
        call = lambda: K.set_tuning(prefetch_bytes=pick)  # noqa: E731
    try:
        call()
    except K.KernelError as e:
        if ok:
            return f"FAIL: knob {knob}={pick!r} refused: {e}"
        return "knob-refused" if "\n" not in str(e) else f"FAIL: knob message is not one line: {e!r}"
    except Exception as e:  # noqa: BLE001
        return f"FAIL: knob {knob}={pick!r} raised {type(e).__name__}, not KernelError: {e}"
    return "knob-set" if ok else f"FAIL: knob {knob}={pick!r} accepted"


ENV_CHILD = """
import numpy as np, fiddler_jax.kernels as K
from fiddler_jax.kernels._testing import expert_inputs, expert_ref, rel_err
x, w1, w3, w2 = expert_inputs(np.random.default_rng(0), 3, 40, 56)
try:
    y = K.expert_ffn_numpy(x, w1, w3, w2, np.full((3, 40), np.nan, np.float32))
except K.KernelError as e:
    print("REFUSED", e)
else:
    print("COMPUTED", rel_err(y, expert_ref(x, w1, w3, w2)))
"""


def one_env(rng) -> str:
    """A fresh interpreter with random FIDDLER_KERNEL_* values: it computes correctly or refuses with a
    KernelError; it never dies by a signal."""
    cap = K.max_threads()
    threads = [None, "", "0", "1", "3", "-2", str(cap), str(cap + 1), "100000000", "99999999999999999999", "abc",
               "4x"]
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    for name, values in (("FIDDLER_KERNEL_THREADS", threads),
                         ("FIDDLER_KERNEL_PATH", [None, "auto", "generic", "avx2", "amx", "sse9"]),
                         ("FIDDLER_KERNEL_SPIN_US", [None, "0", "-5", "99999999999"]),
                         ("FIDDLER_AMX_KC", [None, "-3", "1000"])):
        v = values[rng.integers(len(values))]
        env.pop(name, None)
        if v is not None:
            env[name] = v
    proc = subprocess.run([sys.executable, "-c", ENV_CHILD], capture_output=True, text=True, env=env, timeout=300)
    desc = {k: v for k, v in env.items() if k.startswith("FIDDLER_")}
    if proc.returncode != 0:
        return f"FAIL: env {desc}: exit code {proc.returncode}: {proc.stderr[-500:]}"
    out = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else ""
    t = env.get("FIDDLER_KERNEL_THREADS", "")
    try:
        threads_ok = t.strip() == "" if not t else int(t) <= cap and t == str(int(t))
    except ValueError:
        threads_ok = False
    if out.startswith("COMPUTED"):
        if not threads_ok:
            return f"FAIL: env {desc}: a refused thread count was accepted"
        return "env-ok" if float(out.split()[1]) <= TOL else f"FAIL: env {desc}: wrong result {out}"
    if out.startswith("REFUSED"):
        return "env-refused" if not threads_ok else f"FAIL: env {desc}: refused: {out}"
    return f"FAIL: env {desc}: unexpected output {proc.stdout[-300:]!r} {proc.stderr[-300:]!r}"


def run_case(i: int, rng, env_every: int) -> tuple[str, str]:
    if env_every and i % env_every == env_every - 1:
        return "one_env", one_env(rng)
    if i % 7 == 6:
        return "one_knob", one_knob(rng)
    fn = one_single if i % 2 == 0 else one_grouped
    return fn.__name__, fn(rng, use_xla=(i // 2) % 2 == 0, case=i)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--cases", type=int, default=60)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--env-every", type=int, default=100,
                    help="one subprocess with random FIDDLER_KERNEL_* values per this many cases (0: none)")
    ap.add_argument("--only", type=int, default=None,
                    help="replay case N only (its random stream is its own; knobs set by earlier cases are not)")
    a = ap.parse_args()
    import jax

    np.seterr(all="ignore")  # NaN/inf inputs: the float64 reference warns on purpose

    counts: dict[str, int] = {}
    failures = []
    start = time.perf_counter()
    with jax.default_device(jax.devices("cpu")[0]):
        for i in range(a.cases) if a.only is None else [a.only]:
            rng = np.random.default_rng([a.seed, i])  # per case: a failure replays alone with --only
            name, res = run_case(i, rng, a.env_every)
            key = res.split(":")[0].split(" (")[0]
            counts[key] = counts.get(key, 0) + 1
            if res.startswith("FAIL"):
                failures.append((i, name, res))
    print(counts, f"{time.perf_counter() - start:.1f} s")
    if failures:
        print("failures:")
        for f in failures:
            print(" ", f)
        sys.exit(1)
    print("fuzz ok")


if __name__ == "__main__":
    main()
