"""The streamed CPU lane (``xla_ffi/streamed_lane.cc``): one layer step's CPU-lane experts as an XLA custom call
that the GPU stream runs by itself, so a decode step needs no host sync.

``streamed_cpu_mix(x, experts, weights, tables=id)``: float32 [T, hidden] = Σ over the routing's (token, expert)
pairs whose expert the registered layer ``id`` holds on the host of weight · FFN_expert(x[token]); experts the
layer does not hold (GPU-resident) are skipped, their share is the GPU's. On the CPU platform it runs in place;
on CUDA the call copies its inputs into pinned staging, queues a host function that runs the kernel when the
stream reaches it, and queues the copy of the output back: the stream orders attention → CPU experts → the
next layer, and the Python thread queues tokens ahead of it. A host function cannot fail its XLA call: its
first error is kept and :func:`raise_pending_error` raises it (the engine's streamed lane calls it when it drains
the records: at the start of each forward pass and after each logits or generate call).

Each call leaves a record (:func:`drain_records`) with the tokens routed to each of the layer's experts; the C
record holds ``STREAMED_MAX_EXPERTS`` (256) counts, so a layer with more experts is refused at registration.
"""
from __future__ import annotations

import functools
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np

from fiddler_jax.kernels._lib import ExpertTables, KernelError, _ffi, _lib

STREAMED_LANE_TARGET = "fiddler_streamed_cpu_mix"
_registered_platforms: set[str] = set()
_lock = threading.Lock()
_held: dict[int, ExpertTables] = {}  # id -> the tables whose addresses C++ holds (kept alive here)
STREAMED_MAX_EXPERTS = len(_ffi.new("FjStreamedRecord *").counts)  # the C record's counts (256)


def _register_target(platform: str) -> None:
    """Register the custom-call target for ``platform`` ("cpu" or "gpu"), once."""
    with _lock:
        if platform in _registered_platforms:
            return
        symbol, xla_platform = {"cpu": ("FiddlerStreamedLaneCpu", "cpu"),
                                "gpu": ("FiddlerStreamedLaneCuda", "CUDA")}.get(platform, (None, None))
        if symbol is None:
            raise KernelError(f"the streamed CPU lane runs on cpu and CUDA devices, not on {platform!r}")
        address = int(_ffi.cast("uintptr_t", _ffi.addressof(_lib, symbol)))
        jax.ffi.register_ffi_target(STREAMED_LANE_TARGET, jax.ffi.pycapsule(address), platform=xla_platform)
        _registered_platforms.add(platform)


def register_layer(tables: ExpertTables, device: jax.Device) -> int:
    """Register one layer's host experts (``tables``; experts it does not hold are GPU-resident) for calls on
    ``device``; returns the id :func:`streamed_cpu_mix` names. The tables stay alive until
    :func:`unregister_layers`. A layer of more than ``STREAMED_MAX_EXPERTS`` experts is refused."""
    if not 1 <= tables.num_experts <= STREAMED_MAX_EXPERTS:
        raise KernelError(f"register_layer: the streamed CPU lane takes layers of 1 to {STREAMED_MAX_EXPERTS} "
                          f"experts (its records count tokens per expert); this layer has {tables.num_experts}")
    _register_target(device.platform)
    w1, w3, w2 = tables.pointers
    tid = int(_lib.fj_streamed_lane_register(tables.num_experts, tables.hidden, tables.ffn, w1, w3, w2))
    if tid == -2:
        raise KernelError(f"register_layer: the kernel library takes layers of 1 to {STREAMED_MAX_EXPERTS} experts; "
                          f"this layer has {tables.num_experts}")
    if tid < 0:
        raise KernelError("register_layer: an expert holds some but not all of w1, w3, w2 on the host")
    _held[tid] = tables
    return tid


def unregister_layers(ids) -> None:
    """Forget registered layers (their tables and the references that kept their host memory alive). Call it
    when no queued call names them any more: the engine does when its host experts are freed."""
    for tid in list(ids):
        _lib.fj_streamed_lane_unregister(int(tid))
        _held.pop(int(tid), None)


def streamed_cpu_mix(x, experts, weights, *, tables: int) -> jax.Array:
    """The module docstring's call. x: [T, hidden] bfloat16; experts [T, k] int32; weights [T, k] float32
    (a step's routing); ``tables``: an id from :func:`register_layer`. Shapes are checked again in C++; other
    dtypes are refused (not cast: an int64 expert index or a float16 weight would be wrapped or rounded)."""
    for name, a, want in (("x", x, jnp.bfloat16), ("experts", experts, jnp.int32), ("weights", weights, jnp.float32)):
        dtype = getattr(a, "dtype", None)
        if dtype is None or np.dtype(dtype) != np.dtype(want):
            raise KernelError(f"streamed_cpu_mix: {name} must be a {np.dtype(want).name} array, got "
                              f"{dtype if dtype is not None else type(a).__name__}")
    return _streamed_cpu_mix(x, experts, weights, tables=tables)


@functools.partial(jax.jit, static_argnames="tables")
def _streamed_cpu_mix(x, experts, weights, *, tables: int) -> jax.Array:
    if x.ndim != 2:
        raise KernelError(f"streamed_cpu_mix: x must be a bfloat16 [tokens, hidden] array, got {x.dtype} "
                          f"{tuple(x.shape)}")
    if experts.shape != weights.shape or experts.ndim != 2 or experts.shape[0] != x.shape[0]:
        raise KernelError(f"streamed_cpu_mix: experts {tuple(experts.shape)} and weights {tuple(weights.shape)} "
                          f"must both be [tokens, k] with the {x.shape[0]} tokens of x")
    out = jax.ShapeDtypeStruct(x.shape, jnp.float32)
    return jax.ffi.ffi_call(STREAMED_LANE_TARGET, out)(x, experts, weights, tables=np.int64(tables))


def raise_pending_error() -> None:
    """Raise the first error a host function met since the last check (its output was zero), if any."""
    err = _ffi.new("char[512]")
    if _lib.fj_streamed_lane_error(err, 512) != 0:
        raise KernelError(_ffi.string(err).decode())


# perf_counter and the records' CLOCK_MONOTONIC differ by a constant (equal on Linux); measured once.
_CLOCK_OFFSET_S = time.perf_counter() - _lib.fj_monotonic_ns() * 1e-9


def drain_records(max_records: int = 8192) -> tuple[list[dict], int]:
    """The calls run since the last drain, oldest first: {"tables", "tokens", "assignments" (those the CPU ran),
    "counts" (int64 [E]: tokens routed to each of the layer's E experts, saturating at 65535), "start", "end"
    (``time.perf_counter`` seconds)}, and how many older records were dropped (the C++ ring holds 8192)."""
    buf = _ffi.new("FjStreamedRecord[]", max_records)
    dropped = _ffi.new("int64_t*")
    n = int(_lib.fj_streamed_lane_records(buf, max_records, dropped))
    out = []
    for r in buf[0:n]:
        out.append({"tables": int(r.tables), "tokens": int(r.tokens), "assignments": int(r.assignments),
                    "counts": np.frombuffer(_ffi.buffer(r.counts), np.uint16)[:int(r.experts)].astype(np.int64),
                    "start": r.start_ns * 1e-9 + _CLOCK_OFFSET_S, "end": r.end_ns * 1e-9 + _CLOCK_OFFSET_S})
    return out, int(dropped[0])
