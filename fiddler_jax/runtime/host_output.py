"""The CPU lane's output on its way to the GPU: pinned host buffers the kernel writes into, moved by one DMA.

A layer step's CPU-lane output is float32 [tokens, hidden]: 16 KB in decode, 64 MB in a 4096-token prefill.
Handed to the next jitted call as numpy, it is copied from pageable memory (a host copy into a staging buffer,
then the transfer), once per layer: about 2 GB per 4096-token prefill of Mixtral-8x7B. Session 6 measured TTFT
0.36 s above the traced layer steps there. Written by the kernel straight into a ``pinned_host`` buffer (a
writable view of a JAX array's memory), it moves with one eager ``device_put``: a DMA on XLA's host-to-device
stream (the pinned H2D rate, ~54 GB/s on the H100 machine), which the next jitted call waits for on the device.

``PinnedOutputs`` keeps a ring of ``depth`` buffers per output shape. A buffer is written again only after the
copy made from it has landed (its device array is ready) -- and, since each layer step's sync waits for the
jitted call that read the previous step's output, the copy from ``depth - 1`` steps ago has been consumed too.
Outputs smaller than ``min_bytes`` (decode) keep the numpy path; ``min_bytes=None`` turns the path off.
"""
from __future__ import annotations

import ctypes

import jax
import numpy as np

from fiddler_jax.errors import InvalidInputError

PINNED = "pinned_host"


class _Buffer:
    """One pinned buffer: the JAX array that owns the memory, a writable float32 view of it, and the device copy
    last made from it (None before the first)."""

    def __init__(self, shape: tuple[int, ...], device: jax.Device):
        sharding = jax.sharding.SingleDeviceSharding(device, memory_kind=PINNED)
        self.owner = jax.device_put(np.zeros(shape, np.float32), sharding)
        self.owner.block_until_ready()
        nbytes = int(np.prod(shape)) * 4
        raw = (ctypes.c_char * nbytes).from_address(self.owner.unsafe_buffer_pointer())
        self.view = np.frombuffer(raw, np.float32).reshape(shape)
        self.copy: jax.Array | None = None


class PinnedOutputs:
    """Rings of pinned output buffers per shape (module docstring)."""

    def __init__(self, device: jax.Device, min_bytes: int | None, depth: int = 2):
        if depth < 2:
            raise InvalidInputError(f"PinnedOutputs needs depth >= 2 (a buffer must outlive the step that reads it), "
                                    f"got {depth}")
        if PINNED not in {m.kind for m in device.addressable_memories()}:
            min_bytes = None  # nothing to pin into: every output keeps the numpy path
        self.device, self.min_bytes, self.depth = device, min_bytes, depth
        self._target = jax.sharding.SingleDeviceSharding(device, memory_kind="device")
        self._rings: dict[tuple[int, ...], list[_Buffer]] = {}
        self._next: dict[tuple[int, ...], int] = {}

    def wants(self, shape: tuple[int, ...]) -> bool:
        """Whether a float32 output of ``shape`` takes the pinned path."""
        return self.min_bytes is not None and int(np.prod(shape)) * 4 >= self.min_bytes

    def take(self, shape: tuple[int, ...]) -> _Buffer:
        """The next buffer of the ring for ``shape``, free to be written: its last copy has landed."""
        shape = tuple(int(d) for d in shape)
        ring = self._rings.setdefault(shape, [])
        i = self._next.get(shape, 0)
        self._next[shape] = (i + 1) % self.depth
        if i == len(ring):
            ring.append(_Buffer(shape, self.device))
        buffer = ring[i]
        if buffer.copy is not None:
            buffer.copy.block_until_ready()
        return buffer

    def to_device(self, buffer: _Buffer) -> jax.Array:
        """Start the DMA of a written buffer into a fresh device array (returned; the copy is remembered so the
        buffer is not written again before it has landed)."""
        buffer.copy = jax.device_put(buffer.owner, self._target)
        return buffer.copy

    @property
    def nbytes(self) -> int:
        return sum(b.view.nbytes for ring in self._rings.values() for b in ring)
