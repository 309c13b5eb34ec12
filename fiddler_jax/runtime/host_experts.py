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
drops the source arrays, so the host never holds a second full copy. JAX's pinned allocator is capped by
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


class HostExperts:
    """Pinned host copies of the offloaded experts: ``arrays(l, e)`` for the PCIe lane, ``tables(l)`` for the
    CPU kernel (per-expert numpy views, None for experts not held here)."""

    def __init__(self, arrays: dict[tuple[int, int], dict[str, jax.Array]], num_layers: int, num_experts: int):
        self._arrays = arrays
        self.held = np.zeros((num_layers, num_experts), bool)
        for layer, expert in arrays:
            self.held[layer, expert] = True
        views = {key: {w: _host_view(a[w]) for w in WEIGHTS} for key, a in arrays.items()}
        self._tables = [tuple([views[layer, e][w] if (layer, e) in views else None for e in range(num_experts)]
                              for w in WEIGHTS) for layer in range(num_layers)]
        self._kernel_tables = {}  # layer -> kernels.ExpertTables (bfloat16 experts), made on first use

    @classmethod
    def pin(cls, source: Callable[[int, int], dict[str, np.ndarray]], offloaded: np.ndarray,
            device: jax.Device | None = None, progress: bool = True) -> HostExperts:
        """Put every expert with ``offloaded[l, e]`` into pinned memory of ``device``, one at a time from
        ``source(l, e)`` → {"w1", "w3", "w2"} numpy arrays."""
        device = device or jax.devices()[0]
        kinds = {m.kind for m in device.addressable_memories()}
        if PINNED_HOST not in kinds:
            raise FiddlerError(f"device {device} has no pinned_host memory (it has {sorted(kinds)}); the engine "
                               "needs it to hold offloaded experts")
        sharding = jax.sharding.SingleDeviceSharding(device, memory_kind=PINNED_HOST)
        keys = [(int(l), int(e)) for l, e in zip(*np.nonzero(offloaded))]
        arrays: dict[tuple[int, int], dict[str, jax.Array]] = {}
        pinned_bytes = 0
        with tqdm(keys, desc="pinning offloaded experts", unit="expert", disable=not progress or not keys,
                  leave=False) as bar:
            for key in bar:
                weights = source(*key)
                try:
                    arrays[key] = {w: jax.device_put(np.ascontiguousarray(weights[w]), sharding) for w in WEIGHTS}
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
                pinned_bytes += sum(a.nbytes for a in arrays[key].values())
        return cls(arrays, *offloaded.shape)

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for weights in self._arrays.values() for a in weights.values())

    def arrays(self, layer: int, expert: int) -> dict[str, jax.Array]:
        """The pinned JAX arrays of one expert (what the PCIe lane copies)."""
        try:
            return self._arrays[layer, expert]
        except KeyError:
            raise FiddlerError(f"expert {expert} of layer {layer} is not held in host memory") from None

    def tables(self, layer: int) -> tuple[list, list, list]:
        """Per-expert numpy views of one layer, (w1s, w3s, w2s), None where the expert is not held here."""
        return self._tables[layer]

    def kernel_tables(self, layer: int):
        """The C++ kernel's checked tables of one layer's bfloat16 experts (``kernels.ExpertTables``, made once),
        or None when the layer holds no bfloat16 experts (float32 parity runs take the numpy path)."""
        if layer not in self._kernel_tables:
            w1s, w3s, w2s = self._tables[layer]
            first = next((w for w in w1s if w is not None), None)
            prepared = None
            if first is not None and first.dtype != np.float32:
                from fiddler_jax.kernels import ExpertTables

                prepared = ExpertTables(w1s, w3s, w2s, hidden=first.shape[1])
            self._kernel_tables[layer] = prepared
        return self._kernel_tables[layer]
