"""The PCIe lane: offloaded experts copied from pinned host memory into fresh GPU arrays, beside compute.

A copy is an eager ``jax.device_put`` of an expert's three pinned arrays into device memory. XLA runs it on its
host-to-device stream, not on the stream it computes on, so a copy never delays the layer steps queued after it
(on the H100 machine a 9.5 ms computation took 10.0 ms with a 6.9 ms expert copy dispatched before it, and
15.6 ms behind a jitted copy). A jit that reads the copy waits for it on the device, not on the host.

``StagingPool`` holds the copies by (layer, expert), at most ``slots`` at once: placement reserved that many
experts' bytes for them, and a copy is freed only after the GPU work reading it is done (so the memory is free
again when the next copy is made). It estimates when each copy lands: the lane copies one expert after
another, each in the latency model's ``transfer_s``, so copy i lands at max(issued_i, landed_{i-1}) + transfer_s,
and a copy whose arrays are ready has landed. Copies made ahead of their layer step (prefetches) are dispatched
from the lane's own thread: the dispatch holds the calling thread for about 0.5 ms (three arrays), which would
otherwise delay the step's CPU lane.

``PcieLane`` runs a plan's copies over the pool: in the plan's order, each mixed on the GPU once it lands; when
every slot is held, the next copy waits until the GPU has finished with the oldest copy of the step (double
buffering with two slots).
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import time

import jax
import numpy as np

from fiddler_jax.errors import FiddlerError
from fiddler_jax.memory_kinds import DEVICE
from fiddler_jax.runtime.planning import PlannerError
from fiddler_jax.runtime.segments import expert_mix
from fiddler_jax.runtime.host_experts import HostExperts, WEIGHTS


@dataclasses.dataclass
class StagedCopy:
    """One expert's copy: its device arrays (or the future of the dispatch that makes them) and the estimated
    landing time on the ``time.perf_counter`` clock."""

    layer: int
    expert: int
    arrays: dict | concurrent.futures.Future
    lands_at: float
    prefetched: bool

    def resolve(self) -> dict:
        if isinstance(self.arrays, concurrent.futures.Future):
            self.arrays = self.arrays.result()
        return self.arrays

    def left_s(self, now: float) -> float:
        """Seconds until it lands: 0 once its arrays are ready, else the estimate (at least 0)."""
        if not isinstance(self.arrays, concurrent.futures.Future) or self.arrays.done():
            if all(a.is_ready() for a in self.resolve().values()):
                return 0.0
        return max(self.lands_at - now, 0.0)


class StagingPool:
    """The live copies of the PCIe lane (module docstring)."""

    def __init__(self, host: HostExperts, device: jax.Device, slots: int, transfer_s: float):
        self.host, self.slots, self.transfer_s = host, int(slots), float(transfer_s)
        self._target = jax.sharding.SingleDeviceSharding(device, memory_kind=DEVICE)
        self._copies: dict[tuple[int, int], StagedCopy] = {}
        self._lane_free_at = 0.0
        self._dispatcher = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="fiddler-pcie-lane")

    def __len__(self) -> int:
        return len(self._copies)

    def free(self) -> int:
        return self.slots - len(self._copies)

    def copy(self, layer: int, expert: int, *, ahead: bool = False) -> StagedCopy:
        """Start copying expert (layer, expert) into a free slot; ``ahead``: a prefetch, dispatched from the lane's
        thread."""
        if (layer, expert) in self._copies:
            return self._copies[layer, expert]
        if self.free() < 1:
            raise FiddlerError(f"the PCIe lane has no free staging slot for expert {expert} of layer {layer} "
                               f"({self.slots} held); this is an engine bug")
        now = time.perf_counter()
        self._lane_free_at = max(now, self._lane_free_at) + self.transfer_s
        pinned = self.host.arrays(layer, expert)
        move = lambda: {w: jax.device_put(pinned[w], self._target) for w in WEIGHTS}  # noqa: E731
        arrays = self._dispatcher.submit(move) if ahead else move()
        staged = self._copies[layer, expert] = StagedCopy(layer, expert, arrays, self._lane_free_at, ahead)
        return staged

    def arrays(self, layer: int, expert: int) -> dict:
        return self._copies[layer, expert].resolve()

    def staged(self, layer: int, num_experts: int) -> np.ndarray:
        """bool [E]: experts of ``layer`` with a copy in the pool."""
        mask = np.zeros(num_experts, bool)
        for (l, e) in self._copies:
            if l == layer:
                mask[e] = True
        return mask

    def left_s(self, layer: int, num_experts: int) -> np.ndarray:
        """float [E]: seconds until each copy of ``layer`` lands (inf: no copy) -- the planners' ``staged_s``."""
        now = time.perf_counter()
        left = np.full(num_experts, np.inf)
        for (l, e), staged in self._copies.items():
            if l == layer:
                left[e] = staged.left_s(now)
        return left

    def backlog_s(self) -> float:
        """Seconds until the lane has landed every copy in the pool (0 when all are ready)."""
        now = time.perf_counter()
        return max((c.left_s(now) for c in self._copies.values()), default=0.0)

    def release(self, layer: int, expert: int | None = None) -> None:
        """Drop the copies of ``layer`` (or one expert's). Only once the GPU work reading them is done: the
        memory is then free for the next copy at once."""
        for key in [k for k in self._copies if k[0] == layer and expert in (None, k[1])]:
            self._copies.pop(key).resolve()

    def clear(self) -> None:
        """Drop every copy (the start of a forward pass: none may be left from one that raised)."""
        for staged in self._copies.values():
            staged.resolve()
        self._copies.clear()

    def wait(self, layer: int) -> None:
        """Block until every copy of ``layer`` has landed."""
        jax.block_until_ready([c.resolve() for (l, _), c in self._copies.items() if l == layer])


class PcieLane:
    """A plan's copies over the staging pool (module docstring)."""

    def __init__(self, pool: StagingPool, num_experts: int):
        self.pool, self.num_experts = pool, num_experts

    def copy_and_mix(self, layer: int, moe_in, routing, order: np.ndarray, gpu_out):
        """Copy the experts of ``order`` one after another, adding each one's share to ``gpu_out`` once it has
        landed; returns the GPU sum."""
        mine: list[tuple[int, jax.Array]] = []  # (expert, GPU sum after its mix)
        for e in order.tolist():
            if self.pool.free() < 1:
                if not mine:
                    raise PlannerError(f"layer {layer}: the plan copies experts but prefetched copies hold all "
                                       f"{self.pool.slots} staging slots; this is an engine bug")
                oldest, done = mine.pop(0)
                done.block_until_ready()
                self.pool.release(layer, oldest)
            self.pool.copy(layer, e)
            gpu_out = gpu_out + self.mix(layer, e, moe_in, routing)
            mine.append((e, gpu_out))
        return gpu_out

    def mix(self, layer: int, expert: int, moe_in, routing):
        """One staged copy's share of the layer's MoE output (the mix waits for the copy on the device)."""
        return expert_mix(moe_in, routing, np.int32(expert), **self.pool.arrays(layer, int(expert)),
                          num_experts=self.num_experts)

    def prefetch(self, layer: int, experts) -> None:
        """Start copying ``experts`` of ``layer`` ahead of its step, from the lane's thread."""
        for e in experts:
            self.pool.copy(layer, int(e), ahead=True)
