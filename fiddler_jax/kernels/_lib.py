"""Loading of the compiled kernel library, registration of its XLA FFI targets, runtime configuration, and
direct (non-XLA) entry points on numpy buffers."""
from __future__ import annotations

import os
from typing import Any

import jax
import ml_dtypes
import numpy as np

from fiddler_jax.errors import FiddlerError
from fiddler_jax.timing import median_of

try:
    from fiddler_jax.kernels._fiddler_ffi import ffi as _ffi, lib as _lib
except ImportError as e:  # pragma: no cover - only without a build
    raise ImportError(
        "fiddler_jax.kernels: the compiled extension _fiddler_ffi is missing; reinstall the package "
        "(pip install --no-build-isolation -e .), which builds xla_ffi/*.cc through cffi"
    ) from e

EXPERT_FFN_TARGET = "fiddler_expert_ffn"
GROUPED_EXPERT_FFN_TARGET = "fiddler_grouped_expert_ffn"

PATHS = ("auto", "generic", "avx2", "avx512_bf16", "amx")
_PATH_ID = {name: i for i, name in enumerate(PATHS)}
_FEATURE_BITS = (
    "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_bf16", "amx_tile",
    "amx_bf16", "os_avx", "os_avx512", "amx_permitted",
)


def _register() -> None:
    for name, symbol in ((EXPERT_FFN_TARGET, "FiddlerExpertFfn"),
                         (GROUPED_EXPERT_FFN_TARGET, "FiddlerGroupedExpertFfn")):
        address = int(_ffi.cast("uintptr_t", _ffi.addressof(_lib, symbol)))
        jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(address), platform="cpu")


_register()


def path_supported(path: str) -> bool:
    """Whether this CPU can run a path ("auto", "generic", "avx2", "avx512_bf16", "amx")."""
    return bool(_lib.fj_path_supported(_path_id(path)))


def _path_id(path: str) -> int:
    if path not in _PATH_ID:
        raise KernelError(f"unknown kernel path {path!r}; valid: {', '.join(PATHS)}")
    return _PATH_ID[path]


def set_kernel_path(path: str) -> None:
    """Force a path for all later calls ("auto" restores the choice by CPU and token count).

    The environment variable FIDDLER_KERNEL_PATH sets the initial value."""
    if _lib.fj_set_path(_path_id(path)) != 0:
        flags = [k for k, v in cpu_features()["flags"].items() if v]
        raise UnsupportedPathError(f"kernel path {path!r} is not supported by this CPU (it has {', '.join(flags)}; "
                                   f"supported paths: {', '.join(cpu_features()['supported_paths'])}); use "
                                   "kernel=auto or one of those")


def get_kernel_path() -> str:
    """The forced path, or "auto"."""
    return PATHS[_lib.fj_get_path()]


def path_for_tokens(n: int) -> str:
    """The path a call with n tokens uses now."""
    return PATHS[_lib.fj_path_for_tokens(int(n))]


_INT64 = (-(2 ** 63), 2 ** 63 - 1)
_INT32 = (-(2 ** 31), 2 ** 31 - 1)


def _int_arg(name: str, value, lo: int, hi: int, accepted: str) -> int:
    """``value`` as a Python int if it is an integer (not a bool, float or string) in [lo, hi], else KernelError."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise KernelError(f"{name} must be an integer ({accepted}), got {value!r} of type {type(value).__name__}")
    if not lo <= int(value) <= hi:
        raise KernelError(f"{name} = {int(value)} is out of range; use {accepted}")
    return int(value)


def _check_rc(rc: int, err) -> None:
    if rc < 0:
        raise KernelError(_ffi.string(err).decode())


def max_threads() -> int:
    """The most threads ``set_num_threads`` and FIDDLER_KERNEL_THREADS accept: max(64, 8 x logical CPUs)."""
    return int(_lib.fj_max_threads())


def set_num_threads(n: int = 0, pin: bool | None = False) -> None:
    """Size the persistent thread pool (n <= 0: one thread per physical core; FIDDLER_KERNEL_THREADS sets the
    initial value) and optionally pin its workers to one CPU per physical core (FIDDLER_KERNEL_PIN=1; None: the
    pinning as it is).

    The pool starts now. A count above :func:`max_threads`, a value that is not an integer, or threads the machine
    cannot start (a process or user thread limit, no memory for their stacks) raise KernelError and keep the
    previous settings."""
    n = _int_arg("set_num_threads: n", n, *_INT64, f"1..{max_threads()}, or 0 for one thread per physical core")
    err = _ffi.new("char[512]")
    _check_rc(_lib.fj_set_num_threads(n, -1 if pin is None else int(bool(pin)), err, 512), err)


def reset_num_threads() -> None:
    """The pool's thread count back to the start-up default (FIDDLER_KERNEL_THREADS, else one per physical core;
    a refused FIDDLER_KERNEL_THREADS then fails every call that needs the pool, as at start-up), its pinning as it
    is. Threads that cannot start raise KernelError and keep the previous settings."""
    err = _ffi.new("char[512]")
    _check_rc(_lib.fj_reset_num_threads(err, 512), err)


def get_num_threads() -> int:
    """The pool's thread count (the pool starts if it has not). KernelError if FIDDLER_KERNEL_THREADS was refused
    or the threads cannot start."""
    err = _ffi.new("char[512]")
    n = int(_lib.fj_get_num_threads(err, 512))
    _check_rc(n, err)
    return n


MAX_SPIN_US = 1_000_000


def set_pool(spin_us: int | None = None, wait_all: bool | None = None, streamed_spin_us: int | None = None) -> None:
    """The thread pool's spin before its workers sleep (FIDDLER_KERNEL_SPIN_US, default 50 µs, at most 1 s); the
    spin after a call of the streamed CPU lane, whose calls come one per layer (FIDDLER_KERNEL_STREAMED_SPIN_US;
    -1: the same as ``spin_us``, the default); and, for comparison only, the pool's old contract where every
    worker must join every phase (FIDDLER_KERNEL_POOL_WAIT_ALL=1; by default whoever is awake runs the phase's
    slots). None leaves a knob as it is; the pool is rebuilt now (KernelError if its threads cannot start)."""
    if spin_us is not None:
        spin_us = _int_arg("set_pool: spin_us", spin_us, 0, MAX_SPIN_US, f"0..{MAX_SPIN_US} microseconds")
    if streamed_spin_us is not None:
        streamed_spin_us = _int_arg("set_pool: streamed_spin_us", streamed_spin_us, -1, MAX_SPIN_US,
                                    f"0..{MAX_SPIN_US} microseconds, or -1 for spin_us")
    err = _ffi.new("char[512]")
    _check_rc(_lib.fj_set_pool(-1 if spin_us is None else spin_us, -1 if wait_all is None else int(bool(wait_all)),
                               -2 if streamed_spin_us is None else streamed_spin_us, err, 512), err)


def _read_pass(buffers, who: str):
    """``one_pass() -> checksum``: one call of the kernel pool's read probe over ``buffers`` (the pointer and
    size tables are built once)."""
    if not buffers or not all(isinstance(b, np.ndarray) and b.flags.c_contiguous for b in buffers):
        raise KernelError(f"{who} needs a non-empty list of C-contiguous numpy arrays")
    err, checksum = _ffi.new("char[512]"), _ffi.new("uint64_t*")
    pointers = np.array([b.ctypes.data for b in buffers], np.uint64)
    sizes = np.array([b.nbytes for b in buffers], np.int64)
    p_ptr, p_size = _ffi.cast("uint64_t*", pointers.ctypes.data), _ffi.cast("int64_t*", sizes.ctypes.data)

    def one_pass() -> int:
        _check_rc(_lib.fj_read_probe(p_ptr, p_size, len(buffers), checksum, err, 512), err)
        return int(checksum[0])

    one_pass.keep = (pointers, sizes, buffers)  # the tables and the buffers live as long as the pass
    return one_pass


def read_checksum(buffers) -> int:
    """The 64-bit checksum one pass of :func:`read_bandwidth` computes over ``buffers``: the sum (mod 2**64) of
    each buffer's own, so a pass that skipped a buffer or a slice of one would sum differently."""
    return _read_pass(buffers, "read_checksum")()


def read_bandwidth(buffers, reps: int = 5) -> float:
    """Bytes/s at which the kernel's thread pool reads ``buffers`` (C-contiguous numpy arrays): one pool call per
    pass, every thread reading its slice of each buffer in turn as 8 sequential streams, as a grouped expert call
    reads its experts' weight rows: the CPU lane's read ceiling, with the pool's start paid once per pass (on the
    H100 machine's Xeon a start costs 7-21 us, against about 30 us to read one 3 MB weight of a Qwen3-30B-A3B
    expert). Median of ``reps`` passes after one warm-up."""
    one_pass = _read_pass(buffers, "read_bandwidth")
    if reps < 1:
        raise KernelError(f"reps must be >= 1, got {reps}")
    return sum(b.nbytes for b in buffers) / median_of(one_pass, reps)


def set_amx_min_tokens(n: int) -> None:
    """Token count from which the automatic choice uses AMX (FIDDLER_AMX_MIN_N)."""
    _lib.fj_set_amx_min_tokens(_int_arg("set_amx_min_tokens: n", n, *_INT64, "an integer token count"))


def set_quant_dense_min_tokens(n: int | None) -> None:
    """Token count from which a quantised expert runs dense: its rows dequantised to bf16 blocks, then the bf16
    path the call would choose (AMX or AVX512_BF16) instead of the quantised AVX512_BF16 phases
    (FIDDLER_QUANT_DENSE_MIN_N). None: auto (the AMX threshold on an AMX CPU, else never)."""
    _lib.fj_set_quant_dense_min_tokens(-1 if n is None else _int_arg("set_quant_dense_min_tokens: n", n, 0,
                                                                     _INT64[1], "a token count >= 0 or None"))


def set_tuning(prefetch_bytes: int | None = None, amx_group_kib: int | None = None,
               amx_variant: int | None = None, amx_kc: int | None = None, amx_mb: int | None = None,
               amx_pass: int | None = None, amx_prefetch: bool | None = None,
               amx_blocked_from: int | None = None, amx_pipeline: bool | None = None) -> None:
    """Low-level knobs for benchmarking: software-prefetch distance of weight streams (AVX paths, 0 = off;
    FIDDLER_KERNEL_PREFETCH), the activation budget of the direct AMX variant (FIDDLER_AMX_GROUP_KIB), the
    AMX variant (0 auto, 1 direct, 2 k-chunked, 3 blocked; FIDDLER_AMX_VARIANT), and the blocked variant's
    k-blocks per chunk (0 = auto), weight rows per m-block, 16-token tiles per pass, weight-panel prefetch, and the
    token-tile count from which auto uses it, and the software-pipelined 2x2 micro-kernel (FIDDLER_AMX_KC, _MB,
    _PASS, _PREFETCH, _BLOCKED_FROM, _PIPELINE). The variant must be 0..3 and the others >= 0 (KernelError
    otherwise, and nothing changes); large values are clamped to what the kernel supports (kc <= 64,
    16 <= mb <= 1024, 1 <= pass <= 64)."""
    ranges = {"prefetch_bytes": (0, _INT32[1], "0..2**31-1 bytes"),
              "amx_group_kib": (0, _INT32[1], "0..2**31-1 KiB"),
              "amx_variant": (0, 3, "0 auto, 1 direct, 2 k-chunked or 3 blocked"),
              "amx_kc": (0, _INT32[1], "0 (auto) or more k-blocks"), "amx_mb": (0, _INT32[1], "0 or more rows"),
              "amx_pass": (0, _INT32[1], "0 or more token tiles"),
              "amx_blocked_from": (0, _INT32[1], "0 or more token tiles")}
    ints = {name: None if v is None else _int_arg(f"set_tuning: {name}", v, *ranges[name][:2], ranges[name][2])
            for name, v in (("prefetch_bytes", prefetch_bytes), ("amx_group_kib", amx_group_kib),
                            ("amx_variant", amx_variant), ("amx_kc", amx_kc), ("amx_mb", amx_mb),
                            ("amx_pass", amx_pass), ("amx_blocked_from", amx_blocked_from))}
    if ints["amx_variant"] is not None:
        _lib.fj_set_amx_variant(ints["amx_variant"])
    knobs = (ints["amx_kc"], ints["amx_mb"], ints["amx_pass"],
             None if amx_prefetch is None else int(bool(amx_prefetch)), ints["amx_blocked_from"],
             None if amx_pipeline is None else int(bool(amx_pipeline)))
    if any(k is not None for k in knobs):
        _lib.fj_set_amx_blocking(*(-1 if k is None else k for k in knobs))
    if ints["prefetch_bytes"] is not None:
        _lib.fj_set_prefetch_bytes(ints["prefetch_bytes"])
    if ints["amx_group_kib"] is not None:
        _lib.fj_set_amx_group_kib(ints["amx_group_kib"])


def cpu_features(token_counts=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512)) -> dict[str, Any]:
    """What the CPU offers and which path each token count uses.

    Returns a dict with "flags" (detected features), "physical_cores", "logical_cpus", "threads" (pool size),
    "supported_paths", "forced_path", "amx_min_tokens" and "path_for_n" ({n: path})."""
    bits = _lib.fj_cpu_feature_bits()
    return {
        "flags": {name: bool(bits >> i & 1) for i, name in enumerate(_FEATURE_BITS)},
        "physical_cores": int(_lib.fj_physical_cores()),
        "logical_cpus": int(_lib.fj_logical_cpus()),
        "threads": get_num_threads(),
        "supported_paths": [p for p in PATHS[1:] if path_supported(p)],
        "forced_path": get_kernel_path(),
        "amx_min_tokens": int(_lib.fj_get_amx_min_tokens()),
        "path_for_n": {int(n): path_for_tokens(n) for n in token_counts},
    }


# ----------------------------------------------------------------------------------------------------------
# Direct entry points on numpy buffers (no XLA): the same compute functions the FFI handlers call. Tests use
# them to hand in poisoned output buffers; tools can use them without jit.

class KernelError(FiddlerError, ValueError):
    """A kernel call rejected its input (the message names the argument)."""


class UnsupportedPathError(KernelError, RuntimeError):
    """A kernel path this CPU cannot run was forced."""


_BF16, _F32, _I32 = np.dtype(ml_dtypes.bfloat16), np.dtype(np.float32), np.dtype(np.int32)
_OUT_DTYPES = (_F32, _BF16)


def _describe(a) -> str:
    if isinstance(a, np.ndarray):
        return f"{type(a).__name__} of dtype {a.dtype} and shape {a.shape}"
    dtype = getattr(a, "dtype", None)
    return f"{type(a).__name__}" + (f" of dtype {dtype}" if dtype is not None else "")


def _bf16_buffer(name: str, a: np.ndarray, rank: int) -> np.ndarray:
    if not isinstance(a, np.ndarray) or a.dtype != _BF16:
        raise KernelError(f"{name} must be a numpy bfloat16 array, got {getattr(a, 'dtype', type(a))}"
                          + ("" if isinstance(a, np.ndarray) else f" ({_describe(a)})"))
    if a.ndim != rank:
        raise KernelError(f"{name} must have rank {rank}, got shape {a.shape}")
    return _contiguous(a)


def _contiguous(a: np.ndarray) -> np.ndarray:
    """``a`` itself when C-contiguous and aligned (the kernel reads it through its address), else a copy."""
    flags = a.flags
    return a if flags.c_contiguous and flags.aligned else np.require(a, requirements=["C", "A"])


def _ptr(ctype: str, a: np.ndarray):
    """``a``'s data address as a ``ctype`` pointer. Through the buffer protocol (about 0.3 µs), not ``a.ctypes``
    (about 1.5 µs, five times per kernel call); the caller keeps ``a`` alive for the call."""
    return _ffi.cast(ctype, _ffi.from_buffer(a))


def _check_out(out: np.ndarray, shape: tuple[int, ...]) -> None:
    """The kernel writes ``out`` in place through its address: anything it could not write correctly (or at all:
    a read-only np.memmap is mapped without write permission, a write segfaults) is refused here."""
    if isinstance(out, np.ndarray) and out.shape == shape and out.dtype in _OUT_DTYPES:
        flags = out.flags
        if flags.writeable and flags.c_contiguous and flags.aligned:
            return
    want = f"a writable, C-contiguous numpy float32 or bfloat16 array of shape {shape}"
    if not isinstance(out, np.ndarray):
        raise KernelError(f"out must be {want}, got {_describe(out)}")
    if out.dtype not in _OUT_DTYPES:
        raise KernelError(f"out must be {want}, got dtype {out.dtype}")
    if out.shape != shape:
        raise KernelError(f"out must be {want}, got shape {out.shape}")
    if not out.flags.writeable:
        raise KernelError(f"out must be {want}, got a read-only {type(out).__name__}")
    if not out.flags.c_contiguous:
        raise KernelError(f"out must be {want}, got a non-contiguous view with strides {out.strides}")
    if not out.flags.aligned:
        raise KernelError(f"out must be {want}, got a misaligned buffer at address {out.ctypes.data:#x}")


def _index_buffer(name: str, a, bound: int, what: str) -> np.ndarray:
    """token_idx / expert_idx as int32. int32 goes as it is (the C++ kernel checks every value against its bound);
    another integer dtype (int8..int64, uint8..uint64, or a list of ints) is accepted only when every value is in
    [0, bound) -- checked here, before the narrowing cast, so 2**32 cannot wrap to 0; floats and bools are refused."""
    if not isinstance(a, np.ndarray):
        a = np.asarray(a)
        if a.size == 0 and a.dtype == np.float64:  # an empty list
            a = a.astype(np.int32)
    if a.dtype == _I32:
        return _contiguous(a)
    if not np.issubdtype(a.dtype, np.integer):
        raise KernelError(f"{name} must be an integer array (int32, or another integer dtype whose values are in "
                          f"[0, {what})), got dtype {a.dtype}; cast it with .astype(np.int32) after checking it")
    bad = np.flatnonzero((a < 0) | (a >= bound))
    if bad.size:
        i = int(bad[0])
        raise KernelError(f"{name}[{i}] = {a.reshape(-1)[i]} is out of range [0, {bound}) ({what}; dtype {a.dtype})")
    return np.ascontiguousarray(a, dtype=np.int32)


def _weights_buffer(weights) -> np.ndarray:
    """Routing weights: float32 only (a float16 or bfloat16 weight would have been rounded already, a float64 one
    would be rounded here); the C++ kernel refuses NaN, inf and negative values."""
    if not isinstance(weights, np.ndarray) or weights.dtype != _F32:
        raise KernelError(f"weights must be a numpy float32 array, got {_describe(weights)}; cast it with "
                          ".astype(np.float32)")
    return _contiguous(weights)


def expert_ffn_numpy(x, w1, w3, w2, out: np.ndarray) -> np.ndarray:
    """out[:] = expert FFN of x (numpy, bf16), computed in place by the C++ kernel.

    ``out``: a writable, C-contiguous, aligned numpy float32 or bfloat16 array of shape [n, hidden] (anything else,
    a read-only memmap included, is a KernelError). NaN or inf in x or the weights propagates to the outputs that
    depend on it; nothing scans for them."""
    x = _bf16_buffer("x", x, 2)
    w1, w3, w2 = (_bf16_buffer(n, a, 2) for n, a in (("w1", w1), ("w3", w3), ("w2", w2)))
    n, hidden = x.shape
    ffn = w1.shape[0]
    if w1.shape != (ffn, hidden) or w3.shape != (ffn, hidden) or w2.shape != (hidden, ffn):
        raise KernelError(f"weight shapes w1 {w1.shape}, w3 {w3.shape}, w2 {w2.shape} do not match x {x.shape}")
    _check_out(out, (n, hidden))
    err = _ffi.new("char[512]")
    rc = _lib.fj_expert_ffn(_ptr("uint16_t*", x), n, hidden, ffn, _ptr("uint16_t*", w1), _ptr("uint16_t*", w3),
                            _ptr("uint16_t*", w2), _ptr("void*", out), int(out.dtype == np.float32), err, 512)
    if rc != 0:
        raise KernelError(_ffi.string(err).decode())
    return out


# Weight formats as the C++ kernel numbers them (xla_ffi/kernels.h: WeightFormat).
WEIGHT_FORMATS = {"bf16": 0, "int8": 1, "int4": 2}


def _held_buffer(name: str, w, dtype: np.dtype, shape: tuple[int, ...]) -> int:
    """The address of one held buffer after checking its dtype, shape and layout (read in place: never copied)."""
    if not isinstance(w, np.ndarray) or w.dtype != dtype or w.shape != shape:
        raise KernelError(f"{name} must be a numpy {dtype} array of shape {shape}, got "
                          f"{getattr(w, 'dtype', type(w))} {getattr(w, 'shape', '')}")
    if not w.flags.c_contiguous:
        raise KernelError(f"{name} must be C-contiguous (a copy would defeat holding experts once)")
    if not w.flags.aligned:
        raise KernelError(f"{name} must be aligned to {dtype.itemsize} bytes, got address {w.ctypes.data:#x} (a "
                          "copy would defeat holding experts once)")
    return w.ctypes.data


def _matrix_format(w) -> tuple[str, int]:
    """(precision, group) of a table entry: a numpy bfloat16 matrix, or a ``QuantizedMatrix``."""
    from fiddler_jax.models.quantization import QuantizedMatrix

    if isinstance(w, QuantizedMatrix):
        return w.precision, int(w.group or 0)
    return "bf16", 0


def _expert_table(name: str, experts, shape: tuple[int, int], precision: str,
                  group: int) -> tuple[np.ndarray, np.ndarray]:
    """Addresses of per-expert matrices and of their scales (0 for None; scales 0 for bf16), after checking each
    one's format, dtype, shape and layout."""
    from fiddler_jax.models.quantization import QuantizedMatrix, int4_group_fits

    data, scales = np.zeros(len(experts), np.uint64), np.zeros(len(experts), np.uint64)
    out, inp = shape
    for e, w in enumerate(experts):
        if w is None:
            continue
        if _matrix_format(w) != (precision, group if precision == "int4" else 0):
            raise KernelError(f"{name}[{e}] is {_matrix_format(w)[0]} (group {_matrix_format(w)[1]}), but the "
                              f"tables hold {precision} experts (group {group}): every expert of a call has one "
                              "format")
        if precision == "bf16":
            data[e] = _held_buffer(f"{name}[{e}]", w, _BF16, shape)
            continue
        assert isinstance(w, QuantizedMatrix)
        if tuple(w.shape) != shape:
            raise KernelError(f"{name}[{e}] is a quantised matrix of shape {tuple(w.shape)}, expected {shape}")
        if precision == "int8":
            data[e] = _held_buffer(f"{name}[{e}].q", w.q, np.dtype(np.int8), shape)
            scales[e] = _held_buffer(f"{name}[{e}].scales", w.scales, _F32, (out,))
        else:
            if group < 1 or group > inp or not int4_group_fits(inp, group):
                raise KernelError(f"{name}[{e}]: int4 group {group} does not fit rows of {inp} inputs (a group "
                                  "divides the row and is a multiple of 32, or is the whole row)")
            data[e] = _held_buffer(f"{name}[{e}].q", w.q, np.dtype(np.uint8), (out, inp // 2))
            scales[e] = _held_buffer(f"{name}[{e}].scales", w.scales, np.dtype(np.float16), (out, inp // group))
    return data, scales


class ExpertTables:
    """One call's per-expert matrices -- w1s, w3s [ffn, hidden] and w2s [hidden, ffn], sequences of E numpy bfloat16
    matrices or of E ``QuantizedMatrix`` (int8 / int4, :mod:`fiddler_jax.models.quantization`; one format for all),
    None for experts not held -- checked once, with their addresses ready for the kernel. Repeated calls over the
    same experts (the engine's CPU lane, every layer step) pass it as ``w1`` of :func:`grouped_expert_ffn_numpy`
    and skip the per-call checks (about 0.1 ms per call on the H100 machine's host). It keeps references to the
    matrices, so they live as long as it does. ``precision``, ``group1`` / ``group2`` (int4's inputs per scale of
    w1 / w3 and of w2) describe the format."""

    def __init__(self, w1s, w3s, w2s, *, hidden: int):
        E = len(w1s)
        if len(w3s) != E or len(w2s) != E:
            raise KernelError(f"weight tables have {len(w1s)}, {len(w3s)}, {len(w2s)} entries; they must be equal")
        first, first2 = (next((w for w in ws if w is not None), None) for ws in (w1s, w2s))
        self.hidden, self.num_experts = int(hidden), E
        shape = getattr(first, "shape", ())
        self.ffn = int(shape[0]) if len(shape) == 2 else 0
        self.precision, self.group1 = _matrix_format(first)
        self.group2 = _matrix_format(first2)[1]
        self._keep = (list(w1s), list(w3s), list(w2s))
        t1, s1 = _expert_table("w1", w1s, (self.ffn, self.hidden), self.precision, self.group1)
        t3, s3 = _expert_table("w3", w3s, (self.ffn, self.hidden), self.precision, self.group1)
        t2, s2 = _expert_table("w2", w2s, (self.hidden, self.ffn), self.precision, self.group2)
        self.format = WEIGHT_FORMATS[self.precision]
        self._addresses = (t1, s1, t3, s3, t2, s2)
        self.pointers = tuple(_ptr("uint64_t*", t) for t in self._addresses)


def grouped_expert_ffn_numpy(hidden, token_idx, expert_idx, weights, w1, w3, w2, out: np.ndarray) -> np.ndarray:
    """out[:] = grouped expert FFN (numpy), computed in place by the C++ kernel.

    w1, w3 [E, ffn, hidden] and w2 [E, hidden, ffn] are stacks, or sequences of E per-expert matrices (bfloat16, or
    quantised: :class:`ExpertTables`; None for experts that no assignment uses) — experts held in separate buffers
    are read where they are — or ``w1`` is an :class:`ExpertTables` of them made once (w3, w2 then None).

    token_idx, expert_idx: int32, or another integer dtype (or a list of ints) whose values are all in range --
    checked before the cast to int32, so 2**32 cannot wrap to 0; floats and bools are refused. weights: a numpy
    float32 array (float16/bfloat16/float64 are refused, not cast) of finite values >= 0. ``out`` as for
    :func:`expert_ffn_numpy`. NaN in hidden or the weights propagates; every refusal is a KernelError."""
    x = _bf16_buffer("hidden", hidden, 2)
    T, hdim = x.shape
    tables = None
    if isinstance(w1, np.ndarray):
        w1, w3, w2 = (_bf16_buffer(n, a, 3) for n, a in (("w1", w1), ("w3", w3), ("w2", w2)))
        E, ffn = w1.shape[:2]
        if w1.shape != (E, ffn, hdim) or w3.shape != w1.shape or w2.shape != (E, hdim, ffn):
            raise KernelError(f"weight shapes w1 {w1.shape}, w3 {w3.shape}, w2 {w2.shape} do not match hidden "
                              f"{x.shape}")
    else:
        tables = w1 if isinstance(w1, ExpertTables) else ExpertTables(w1, w3, w2, hidden=hdim)
        if tables.hidden != hdim:
            raise KernelError(f"the expert tables were made for hidden size {tables.hidden}, but hidden has shape "
                              f"{x.shape}")
        E = tables.num_experts
    tok = _index_buffer("token_idx", token_idx, T, f"{T} tokens")
    exp = _index_buffer("expert_idx", expert_idx, E, f"{E} experts")
    wts = _weights_buffer(weights)
    if not (tok.ndim == exp.ndim == wts.ndim == 1 and tok.shape == exp.shape == wts.shape):
        raise KernelError(f"token_idx {tok.shape}, expert_idx {exp.shape}, weights {wts.shape} must be equal 1-D")
    _check_out(out, (T, hdim))
    err = _ffi.new("char[512]")
    if tables is None:
        rc = _lib.fj_grouped_expert_ffn(
            _ptr("uint16_t*", x), T, hdim, ffn, E, _ptr("int32_t*", tok), _ptr("int32_t*", exp),
            _ptr("float*", wts), tok.shape[0], _ptr("uint16_t*", w1), _ptr("uint16_t*", w3), _ptr("uint16_t*", w2),
            _ptr("void*", out), int(out.dtype == np.float32), err, 512)
    else:
        rc = _lib.fj_grouped_expert_ffn_tables(
            _ptr("uint16_t*", x), T, hdim, tables.ffn, tables.num_experts, _ptr("int32_t*", tok),
            _ptr("int32_t*", exp), _ptr("float*", wts), tok.shape[0], tables.format, tables.group1, tables.group2,
            *tables.pointers, _ptr("void*", out), int(out.dtype == np.float32), err, 512)
    if rc != 0:
        raise KernelError(_ffi.string(err).decode())
    return out


if os.environ.get("FIDDLER_KERNEL_VERBOSE"):  # pragma: no cover
    print("fiddler_jax.kernels:", cpu_features())
