"""The CPU lane's activations across PCIe through pinned host memory, for large steps (prefill).

A layer step's CPU lane reads the MoE input, bfloat16 [tokens, hidden], from the GPU, and hands back a float32
[tokens, hidden] output: 16 KB in decode, 32 MB in and 64 MB out in a 4096-token prefill of Mixtral-8x7B.
Fetched with ``np.asarray`` and handed back as numpy, both cross PCIe through pageable memory (a host copy
through a staging buffer each way), once per layer. That is about 3 GB per 4096-token prefill, and on the H100
machine it added 0.36 s to the time to first token above the traced layer steps. Through pinned memory, each is one DMA at the pinned
rate (~54 GB/s on the H100 machine):
  * in: ``fetch`` copies the input with ``jax.device_put`` into ``pinned_host`` memory, and ``np.asarray`` of
    that is a zero-copy view;
  * out: the kernel writes the output straight into a pinned buffer (a writable view of a JAX array's memory),
    and ``to_device`` starts one eager ``device_put`` of it on XLA's host-to-device stream. The next jitted call
    waits for that copy on the device.

``PinnedActivations`` keeps a ring of ``depth`` output buffers per shape, for at most ``max_shapes`` shapes. A
buffer is written again only after the copy made from it has landed (its device array is ready); a device copy
is fresh GPU memory, so depth 2 only lets one step's copy overlap the next step's kernel. The engine lets go of
the copies at the end of each forward pass (``settle``), so they never hold GPU memory between passes.
Activations smaller than ``min_bytes`` (decode) keep the numpy path; ``min_bytes=None`` turns the path off.
"""
from __future__ import annotations

import collections
import ctypes
import math

import jax
import numpy as np

from fiddler_jax.errors import InvalidInputError
from fiddler_jax.memory_kinds import DEVICE, PINNED_HOST



class _Buffer:
    """One pinned output buffer: the JAX array that owns the memory, a writable float32 view of it, and the device
    copy last made from it (None before the first)."""

    def __init__(self, shape: tuple[int, ...], device: jax.Device):
        sharding = jax.sharding.SingleDeviceSharding(device, memory_kind=PINNED_HOST)
        self.owner = jax.device_put(np.zeros(shape, np.float32), sharding)
        self.owner.block_until_ready()
        nbytes = math.prod(shape) * 4
        raw = (ctypes.c_char * nbytes).from_address(self.owner.unsafe_buffer_pointer())
        self.view = np.frombuffer(raw, np.float32).reshape(shape)
        self.copy: jax.Array | None = None

    def settle(self) -> None:
        """Wait for the last copy made from this buffer to land, and let go of it (its GPU memory is the next
        jitted call's to free, not ours to hold)."""
        if self.copy is not None:
            self.copy.block_until_ready()
            self.copy = None


class PinnedActivations:
    """Pinned fetches of large CPU-lane inputs and rings of pinned output buffers per shape (module docstring)."""

    def __init__(self, device: jax.Device, min_bytes: int | None, depth: int = 2, max_shapes: int = 2):
        if depth < 2:
            raise InvalidInputError(f"PinnedActivations needs depth >= 2 (a buffer must outlive the step that reads "
                                    f"it), got {depth}")
        if PINNED_HOST not in {m.kind for m in device.addressable_memories()}:
            min_bytes = None  # nothing to pin into: every activation keeps the numpy path
        self.device, self.min_bytes, self.depth = device, min_bytes, depth
        self._pinned = jax.sharding.SingleDeviceSharding(device, memory_kind=PINNED_HOST)
        self._target = jax.sharding.SingleDeviceSharding(device, memory_kind=DEVICE)
        # The rings by shape, least recently used first; at most ``max_shapes`` (the pinned pool has ~2 GiB of
        # slack beyond the experts, and a run over many prompt lengths would otherwise keep a ring for each).
        self.max_shapes = max_shapes
        self._rings: collections.OrderedDict[tuple[int, ...], list[_Buffer]] = collections.OrderedDict()
        self._next: dict[tuple[int, ...], int] = {}

    def wants(self, shape: tuple[int, ...], itemsize: int = 4) -> bool:
        """Whether an activation of ``shape`` (float32 unless ``itemsize`` says otherwise) takes the pinned path."""
        return self.min_bytes is not None and math.prod(shape) * itemsize >= self.min_bytes

    def fetch(self, x) -> np.ndarray:
        """``x`` on the host as numpy: a device array that ``wants`` the pinned path through one DMA into pinned
        memory (a zero-copy view of it), anything else with ``np.asarray``."""
        if isinstance(x, jax.Array) and self.wants(x.shape, x.dtype.itemsize):
            return np.asarray(jax.device_put(x, self._pinned))
        return np.asarray(x)

    def take(self, shape: tuple[int, ...]) -> _Buffer:
        """The next output buffer of the ring for ``shape``, free to be written: its last copy has landed. A new
        shape beyond ``max_shapes`` drops the least recently used ring (after its copies have landed)."""
        shape = tuple(int(d) for d in shape)
        if shape not in self._rings:
            while len(self._rings) >= self.max_shapes:
                old, ring = self._rings.popitem(last=False)
                for buffer in ring:
                    buffer.settle()
                self._next.pop(old, None)
            self._rings[shape] = []
        self._rings.move_to_end(shape)
        ring, i = self._rings[shape], self._next.get(shape, 0)
        if i == len(ring):
            ring.append(_Buffer(shape, self.device))  # may raise (pinned pool full): the ring stays consistent
        self._next[shape] = (i + 1) % self.depth
        buffer = ring[i]
        buffer.settle()
        return buffer

    def settle(self) -> None:
        """Wait for every copy still in flight from the buffers and let go of them (the end of a forward pass)."""
        for ring in self._rings.values():
            for buffer in ring:
                buffer.settle()

    def to_device(self, buffer: _Buffer) -> jax.Array:
        """Start the DMA of a written buffer into a fresh device array (returned; the copy is remembered so the
        buffer is not written again before it has landed)."""
        buffer.copy = jax.device_put(buffer.owner, self._target)
        return buffer.copy

    @property
    def nbytes(self) -> int:
        """Bytes of pinned output buffers held."""
        return sum(b.view.nbytes for ring in self._rings.values() for b in ring)
