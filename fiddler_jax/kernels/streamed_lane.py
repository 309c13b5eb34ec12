"""The streamed CPU lane (``xla_ffi/streamed_lane.cc``): one layer step's CPU-lane experts as a pair of XLA custom
calls that the GPU stream runs by itself, so a decode step needs no host sync and the resident experts' mix runs
on the GPU while the CPU runs the offloaded ones.

``streamed_cpu_begin(x, experts, weights, tables)`` -> ticket, then ``streamed_cpu_end(ticket, tokens, hidden)``
-> float32 [T, hidden] = Σ over the routing's (token, expert) pairs whose expert the registered layer ``tables``
holds on the host of weight · FFN_expert(x[token]); experts the layer does not hold (GPU-resident) are skipped,
their share is the GPU's. ``tables`` is data (an int32 scalar, traced or not): one compiled program serves every
layer. Begin packs the layer id, x and the routing into one byte buffer (one device-to-host copy); on CUDA it
queues that copy and a host function that hands the work to the lane's worker thread and returns, so the stream
goes on to whatever is queued next; end queues a host function that waits for the worker, then the copy of the
output back. Each begin pairs with the next end dispatched (dispatch them in order, every begin followed by its
end; :func:`abandon` forgets begun calls after an error between them). On the CPU platform begin runs the lane in
place and end copies the result; there the ticket names its call (XLA:CPU may run a program before an earlier one
whose inputs are not ready), on CUDA the stream keeps dispatch order. ``streamed_cpu_mix`` is the two back to back.

A host function cannot fail its XLA call: its first error is kept and :func:`raise_pending_error` raises it
(the engine's streamed lane calls it when it drains the records: once each forward pass has queued its layers,
and after each logits or generate call).

Each call leaves a record (:func:`drain_records`) with the tokens routed to each of the layer's experts; the C
record holds ``STREAMED_MAX_EXPERTS`` (256) counts, so a layer with more experts is refused at registration. With
:func:`set_timing` on, a CUDA call's record also carries four GPU times (events on the stream).
"""
from __future__ import annotations

import functools
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np

from fiddler_jax.kernels._lib import ExpertTables, KernelError, _ffi, _lib

BEGIN_TARGET, END_TARGET = "fiddler_streamed_cpu_begin", "fiddler_streamed_cpu_end"
_registered_platforms: set[str] = set()
_lock = threading.Lock()
_held: dict[int, ExpertTables] = {}  # id -> the tables whose addresses C++ holds (kept alive here)
STREAMED_MAX_EXPERTS = len(_ffi.new("FjStreamedRecord *").counts)  # the C record's counts (256)


def _register_target(platform: str) -> None:
    """Register the custom-call targets for ``platform`` ("cpu" or "gpu"), once."""
    with _lock:
        if platform in _registered_platforms:
            return
        suffix, xla_platform = {"cpu": ("Cpu", "cpu"), "gpu": ("Cuda", "CUDA")}.get(platform, (None, None))
        if suffix is None:
            raise KernelError(f"the streamed CPU lane runs on cpu and CUDA devices, not on {platform!r}")
        for target, symbol in ((BEGIN_TARGET, "FiddlerStreamedBegin"), (END_TARGET, "FiddlerStreamedEnd")):
            address = int(_ffi.cast("uintptr_t", _ffi.addressof(_lib, symbol + suffix)))
            jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(address), platform=xla_platform)
        _registered_platforms.add(platform)


def register_layer(tables: ExpertTables, device: jax.Device) -> int:
    """Register one layer's host experts (``tables``; experts it does not hold are GPU-resident) for calls on
    ``device``; returns the id :func:`streamed_cpu_mix` names. The tables stay alive until
    :func:`unregister_layers`. A layer of more than ``STREAMED_MAX_EXPERTS`` experts is refused."""
    if not 1 <= tables.num_experts <= STREAMED_MAX_EXPERTS:
        raise KernelError(f"register_layer: the streamed CPU lane takes layers of 1 to {STREAMED_MAX_EXPERTS} "
                          f"experts (its records count tokens per expert); this layer has {tables.num_experts}")
    _register_target(device.platform)
    tid = int(_lib.fj_streamed_lane_register(tables.num_experts, tables.hidden, tables.ffn, tables.format,
                                             tables.group1, tables.group2, *tables.pointers))
    if tid == -2:
        raise KernelError(f"register_layer: the kernel library takes layers of 1 to {STREAMED_MAX_EXPERTS} experts; "
                          f"this layer has {tables.num_experts}")
    if tid < 0:
        raise KernelError("register_layer: an expert holds some but not all of w1, w3, w2 (and their scales) on the "
                          "host")
    _held[tid] = tables
    return tid


def unregister_layers(ids) -> None:
    """Forget registered layers (their tables and the references that kept their host memory alive). Call it
    when no queued call names them any more: the engine does when its host experts are freed."""
    for tid in list(ids):
        _lib.fj_streamed_lane_unregister(int(tid))
        _held.pop(int(tid), None)


def _check_dtypes(op: str, x, experts, weights) -> None:
    for name, a, want in (("x", x, jnp.bfloat16), ("experts", experts, jnp.int32), ("weights", weights, jnp.float32)):
        dtype = getattr(a, "dtype", None)
        if dtype is None or np.dtype(dtype) != np.dtype(want):
            raise KernelError(f"{op}: {name} must be a {np.dtype(want).name} array, got "
                              f"{dtype if dtype is not None else type(a).__name__}")


def _check_shapes(op: str, x, experts, weights) -> None:
    if x.ndim != 2:
        raise KernelError(f"{op}: x must be a bfloat16 [tokens, hidden] array, got {x.dtype} {tuple(x.shape)}")
    if experts.shape != weights.shape or experts.ndim != 2 or experts.shape[0] != x.shape[0]:
        raise KernelError(f"{op}: experts {tuple(experts.shape)} and weights {tuple(weights.shape)} "
                          f"must both be [tokens, k] with the {x.shape[0]} tokens of x")


def _bytes(a) -> jax.Array:
    return jax.lax.bitcast_convert_type(a, jnp.uint8).reshape(-1)


def streamed_cpu_begin(x, experts, weights, tables) -> jax.Array:
    """Start the module docstring's call (traceable: call it inside a jitted function). x: [T, hidden] bfloat16;
    experts [T, k] int32; weights [T, k] float32 (a step's routing); ``tables``: an id from
    :func:`register_layer` (int or int32 scalar). Returns the ticket :func:`streamed_cpu_end` takes. Shapes are
    checked again in C++; other dtypes are refused (not cast: an int64 expert index or a float16 weight would be
    wrapped or rounded)."""
    _check_dtypes("streamed_cpu_begin", x, experts, weights)
    _check_shapes("streamed_cpu_begin", x, experts, weights)
    T, k = experts.shape
    packed = jnp.concatenate([_bytes(x), _bytes(experts), _bytes(weights),
                              _bytes(jnp.asarray(tables, jnp.int32).reshape(1))])
    ticket = jax.ShapeDtypeStruct((2,), jnp.int32)  # on the CPU platform: the call's slot and use
    return jax.ffi.ffi_call(BEGIN_TARGET, ticket, has_side_effect=True)(
        packed, tokens=np.int64(T), top_k=np.int64(k), hidden=np.int64(x.shape[1]))


def streamed_cpu_end(ticket, tokens: int, hidden: int) -> jax.Array:
    """The output float32 [tokens, hidden] of the begun call ``ticket`` (traceable)."""
    out = jax.ShapeDtypeStruct((tokens, hidden), jnp.float32)
    return jax.ffi.ffi_call(END_TARGET, out, has_side_effect=True)(ticket)


def end(ticket, tokens: int, hidden: int) -> jax.Array:
    """:func:`streamed_cpu_end` as its own dispatch (the engine queues it after the resident experts' mix)."""
    return _end_jit(tokens, hidden)(ticket)


@functools.cache
def _end_jit(tokens: int, hidden: int):
    return jax.jit(lambda ticket: streamed_cpu_end(ticket, tokens, hidden))


def streamed_cpu_mix(x, experts, weights, *, tables: int) -> jax.Array:
    """Begin and end back to back, one dispatch: the CPU experts' share of one step (the module docstring's call).
    ``tables`` is checked here against the registered layers (on a GPU the host function would only find it later,
    when nothing can raise)."""
    _check_dtypes("streamed_cpu_mix", x, experts, weights)
    held = _held.get(int(tables))
    if held is None:
        raise KernelError(f"streamed_cpu_mix: no layer tables registered under id {int(tables)} (register_layer "
                          "gives the ids)")
    if held.hidden != x.shape[-1]:
        raise KernelError(f"streamed_cpu_mix: x has hidden size {x.shape[-1]}, but layer {int(tables)} was "
                          f"registered with hidden size {held.hidden}")
    return _streamed_cpu_mix(x, experts, weights, np.int32(tables))


@jax.jit
def _streamed_cpu_mix(x, experts, weights, tables) -> jax.Array:
    _check_shapes("streamed_cpu_mix", x, experts, weights)
    return streamed_cpu_end(streamed_cpu_begin(x, experts, weights, tables), *x.shape)


def abandon() -> int:
    """Forget begun calls that no end will follow (a dispatch between them raised): waits until each has run and
    frees its slot. Returns how many there were."""
    return int(_lib.fj_streamed_lane_abandon())


def set_timing(on: bool) -> None:
    """Record CUDA events around each call from now on, for the records' ``gpu`` times (see drain_records)."""
    _lib.fj_streamed_lane_set_timing(int(bool(on)))


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
    (the CPU's span, ``time.perf_counter`` seconds), "gpu" (a timed CUDA call's stream times: before and after its
    input copy, before end's wait, after the output copy; None untimed)}, and how many older records were dropped
    (the C++ ring holds 8192). A timed call whose end is still queued stays for a later drain."""
    buf = _ffi.new("FjStreamedRecord[]", max_records)
    dropped = _ffi.new("int64_t*")
    n = int(_lib.fj_streamed_lane_records(buf, max_records, dropped))
    out = []
    for r in buf[0:n]:
        out.append({"tables": int(r.tables), "tokens": int(r.tokens), "assignments": int(r.assignments),
                    "counts": np.frombuffer(_ffi.buffer(r.counts), np.uint16)[:int(r.experts)].astype(np.int64),
                    "start": r.start_ns * 1e-9 + _CLOCK_OFFSET_S, "end": r.end_ns * 1e-9 + _CLOCK_OFFSET_S,
                    "gpu": (tuple(t * 1e-9 + _CLOCK_OFFSET_S for t in r.gpu_ns) if r.gpu_ns[0] else None)})
    return out, int(dropped[0])
