"""Offloaded experts, held once in pinned host memory and shared by the CPU lane and the PCIe lane.

Every offloaded (layer, expert) is three JAX arrays (w1, w3, w2) in the ``pinned_host`` memory of the GPU
device (on a CPU-only JAX, of the CPU device: the same code runs in CI):
  * the PCIe lane (and the dynamic cache) copy a step's batch of them into rows of a stacked GPU buffer with
    one jitted call (:func:`fiddler_jax.runtime.segments.stage_copy`): DMAs from pinned memory, at the speed of an
    eager ``device_put`` of pinned arrays (6.9 ms for a Mixtral-8x7B expert of 352 MB on the H100 machine, against
    59 ms for pageable numpy; docs/notes/engine_lanes.md), on the compute stream;
  * the CPU lane reads the very same bytes: ``np.asarray`` of a pinned_host array is a zero-copy view (checked
    for every array at load; the kernel takes per-expert weight tables, so no stack is ever built).
Why one array per expert and not a stack per layer: slicing a pinned stack inside jit copies as fast, but its
dispatch blocked the Python thread for 5 ms (measured), which would serialise the lanes.

Loading pins one expert at a time from a source callable (a checkpoint's mmap reader, or random weights) and
drops the source arrays, so the host never holds a second full copy. At an ``expert_precision`` of int8 or int4
each expert is quantised on the way (on the default device, :mod:`fiddler_jax.models.quantized_experts`) and its
matrices are held as {"q", "scales"} pairs: both lanes read those bytes (the CPU kernel dequantises in registers,
the PCIe lane copies them and dequantises on the GPU into its staging stack). JAX's pinned allocator is capped by
``XLA_PJRT_GPU_HOST_MEMORY_LIMIT_GB`` (default 64 GiB); ``fiddler_jax`` raises that cap to the machine's RAM
at import, before JAX starts its GPU client.
"""
from __future__ import annotations

import os

from collections.abc import Callable

import jax
import numpy as np
from tqdm.auto import tqdm

from fiddler_jax.errors import FiddlerError
from fiddler_jax.memory_kinds import DEVICE, PINNED_HOST
from fiddler_jax.models.quantization import DEFAULT_INT4_GROUP, QuantizedMatrix, check_precision
from fiddler_jax.units import format_bytes

WEIGHTS = ("w1", "w3", "w2")
HOST_LIMIT_VAR = "XLA_PJRT_GPU_HOST_MEMORY_LIMIT_GB"


def size_pinned_pool(nbytes: int) -> bool:
    """Size XLA's pinned host pool for ``nbytes`` of experts (plus 2 GiB and 2% of slack) if JAX has not started
    and the user did not set the cap; returns whether it did.

    The pool grows by regions that double in size, each pinned (locked in RAM) as a whole: capped at the
    machine's RAM, Mixtral's 64 GiB of offloaded experts at a 24 GiB budget made it ask for a 61 GiB region on
    top of 63 GiB already pinned, and the kernel killed the process. Capped at what the experts need, the last
    region is only what is left."""
    import fiddler_jax
    from fiddler_jax.runtime.gpu_memory import jax_started

    if jax_started() or os.environ.get(HOST_LIMIT_VAR) != fiddler_jax.DEFAULT_HOST_LIMIT_GB:
        return False
    os.environ[HOST_LIMIT_VAR] = str(max(1, -(-(int(nbytes * 1.02) + (2 << 30)) >> 30)))
    return True


class HostMemoryError(FiddlerError, MemoryError):
    """The offloaded experts do not fit in pinned host memory."""


def available_host_memory() -> int | None:
    """Bytes of RAM the kernel says can be allocated without swapping (``MemAvailable``), or None if unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def check_host_memory(nbytes: int) -> None:
    """Refuse, before anything is loaded, offloaded experts that need more host memory than is available."""
    available = available_host_memory()
    if available is not None and nbytes > available:
        raise HostMemoryError(
            f"the offloaded experts need {format_bytes(nbytes)} of pinned host memory, but this machine has "
            f"{format_bytes(available)} available: raise gpu_budget so fewer experts are offloaded, free host "
            "memory, or use a machine with more RAM")


def _host_view(array: jax.Array) -> np.ndarray:
    """Zero-copy numpy view of a host-memory JAX array (an error if this JAX would copy)."""
    view = np.asarray(array)
    if view.ctypes.data != array.unsafe_buffer_pointer():
        raise FiddlerError("np.asarray of a pinned_host array copied instead of viewing; this JAX version breaks "
                           "the engine's hold-experts-once design (report it with your jax version)")
    return view


def _matrix_view(held) -> np.ndarray | QuantizedMatrix:
    """The zero-copy host view of one held matrix: a numpy array, or a ``QuantizedMatrix`` of views."""
    if not isinstance(held, dict):
        return _host_view(held)
    q, scales = _host_view(held["q"]), _host_view(held["scales"])
    if q.dtype == np.int8:
        return QuantizedMatrix(q, scales, "int8", q.shape)
    shape = (q.shape[0], 2 * q.shape[1])
    return QuantizedMatrix(q, scales, "int4", shape, shape[1] // scales.shape[1])


class HostExperts:
    """Pinned host copies of the offloaded experts: ``arrays(l, e)`` for the PCIe lane, ``tables(l)`` for the
    CPU kernel (per-expert numpy views -- or ``QuantizedMatrix`` of views -- None for experts not held here).
    ``precision``: how the experts are held ("bf16", "int8", "int4"); ``dtype``: the model's dtype, which the
    experts' weights W' have on every lane."""

    def __init__(self, arrays: dict[tuple[int, int], dict], num_layers: int, num_experts: int,
                 precision: str = "bf16", dtype=None):
        self._arrays = arrays
        self.precision = precision
        self.held = np.zeros((num_layers, num_experts), bool)
        for layer, expert in arrays:
            self.held[layer, expert] = True
        views = {key: {w: _matrix_view(a[w]) for w in WEIGHTS} for key, a in arrays.items()}
        self._tables = [tuple([views[layer, e][w] if (layer, e) in views else None for e in range(num_experts)]
                              for w in WEIGHTS) for layer in range(num_layers)]
        first = next(iter(views.values()), None)
        if dtype is None:
            dtype = first["w1"].dtype if first is not None and precision == "bf16" else np.float32
        self.dtype = np.dtype(dtype)
        # the bfloat16 matrices the PCIe lane stages each expert as: {w: (shape, dtype)}
        self.staged = {} if first is None else {w: (tuple(first[w].shape), self.dtype) for w in WEIGHTS}
        self._kernel_tables = {}  # layer -> kernels.ExpertTables (bfloat16 models), made on first use

    @classmethod
    def pin(cls, source: Callable[[int, int], dict[str, np.ndarray]], offloaded: np.ndarray,
            device: jax.Device | None = None, progress: bool = True, precision: str = "bf16",
            group: int = DEFAULT_INT4_GROUP) -> HostExperts:
        """Put every expert with ``offloaded[l, e]`` into pinned memory of ``device``, one at a time from
        ``source(l, e)`` → {"w1", "w3", "w2"} numpy arrays, quantised first at an int8 / int4 ``precision``."""
        from fiddler_jax.models.quantized_experts import quantize_expert

        check_precision(precision, group)
        device = device or jax.devices()[0]
        kinds = {m.kind for m in device.addressable_memories()}
        if PINNED_HOST not in kinds:
            raise FiddlerError(f"device {device} has no pinned_host memory (it has {sorted(kinds)}); the engine "
                               "needs it to hold offloaded experts")
        sharding = jax.sharding.SingleDeviceSharding(device, memory_kind=PINNED_HOST)
        keys = [(int(l), int(e)) for l, e in zip(*np.nonzero(offloaded))]
        arrays: dict[tuple[int, int], dict[str, jax.Array]] = {}
        pinned_bytes, dtype = 0, None
        desc = "pinning offloaded experts" + ("" if precision == "bf16" else f" ({precision})")
        with tqdm(keys, desc=desc, unit="expert", disable=not progress or not keys, leave=False) as bar:
            for key in bar:
                weights = source(*key)
                dtype = weights["w1"].dtype
                try:
                    if precision == "bf16":
                        arrays[key] = {w: jax.device_put(np.ascontiguousarray(weights[w]), sharding) for w in WEIGHTS}
                    else:
                        quantized = quantize_expert(weights, precision, group)
                        arrays[key] = {w: {"q": jax.device_put(q, sharding), "scales": jax.device_put(sc, sharding)}
                                       for w, (q, sc) in quantized.items()}
                    jax.block_until_ready(arrays[key])
                except Exception as exc:  # XlaRuntimeError: RESOURCE_EXHAUSTED from the pinned allocator
                    if "RESOURCE_EXHAUSTED" not in str(exc) and "out of memory" not in str(exc).lower():
                        raise
                    need = pinned_bytes * len(keys) // max(len(arrays), 1)
                    raise HostMemoryError(
                        f"pinned host memory ran out after {len(arrays)} of {len(keys)} offloaded experts "
                        f"({format_bytes(pinned_bytes)} pinned, about {format_bytes(need)} needed): raise "
                        f"{HOST_LIMIT_VAR} before JAX starts (fiddler_jax sets it to the machine's RAM unless it is "
                        "already set), free host memory, or give the GPU a larger gpu_budget") from exc
                pinned_bytes += sum(a.nbytes for a in jax.tree.leaves(arrays[key]))
        return cls(arrays, *offloaded.shape, precision=precision, dtype=dtype)

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in jax.tree.leaves(self._arrays))

    @property
    def expert_nbytes(self) -> int:
        """Bytes one held expert takes (what a lane reads or copies per expert: fewer when quantised); 0 when
        nothing is held."""
        first = next(iter(self._arrays.values()), None)
        return 0 if first is None else sum(a.nbytes for a in jax.tree.leaves(first))

    def arrays(self, layer: int, expert: int) -> dict:
        """The pinned JAX arrays of one expert (what the PCIe lane copies): {w: array}, or {w: {"q", "scales"}}
        for quantised experts."""
        try:
            return self._arrays[layer, expert]
        except KeyError:
            raise FiddlerError(f"expert {expert} of layer {layer} is not held in host memory") from None

    def tables(self, layer: int) -> tuple[list, list, list]:
        """Per-expert numpy views of one layer, (w1s, w3s, w2s), None where the expert is not held here."""
        return self._tables[layer]

    def buffers(self, layer: int, expert: int) -> list[np.ndarray]:
        """The host views of every buffer one expert holds (its matrices, or their q and scales)."""
        views = []
        for table in self._tables[layer]:
            m = table[expert]
            views += [m.q, m.scales] if isinstance(m, QuantizedMatrix) else [m]
        return views

    def kernel_tables(self, layer: int):
        """The C++ kernel's checked tables of one layer's experts (``kernels.ExpertTables``, made once) in a
        bfloat16 model, or None when the layer holds none or the model is float32 (parity runs take the numpy
        path, with W' in float32)."""
        if layer not in self._kernel_tables:
            w1s, w3s, w2s = self._tables[layer]
            first = next((w for w in w1s if w is not None), None)
            prepared = None
            if first is not None and self.dtype != np.float32:
                from fiddler_jax.kernels import ExpertTables

                prepared = ExpertTables(w1s, w3s, w2s, hidden=first.shape[1])
            self._kernel_tables[layer] = prepared
        return self._kernel_tables[layer]
