"""The PCIe lane: offloaded experts copied from pinned host memory into a stacked GPU staging buffer, in batches.

``StagingPool`` owns the staging buffer: {"w1", "w3", "w2"} device arrays [slots, ...], made once, the
``slots`` experts' bytes that placement reserved. A batch of n experts is ONE jitted call
(:func:`~fiddler_jax.runtime.segments.stage_copy`): it DMAs the experts' pinned arrays to the device and writes
them into n free rows of the buffer (donated, so updated in place), and a batch's share of the layer's output is
ONE jitted call (:func:`~fiddler_jax.runtime.segments.staged_mix`) over the whole buffer with a slot map, summed
into the GPU output in the same call. Per batch that is two dispatches; one expert at a time would be five per
expert (three eager copies, a mix, an add): the copies alone held the host 0.5 ms on the H100 machine, where a
9 MB expert of Qwen3-30B-A3B copies in 0.18 ms at 51 GB/s. On the CI CPU a step copying 8 such experts (bf16)
returned to the host after 0.5-0.6 ms batched, against 2.6-6.5 ms one expert at a time.

Why a jitted copy and not eager ``device_put`` of a list (one batched C++ call, on XLA's host-to-device stream):
  * dispatch: on the CI CPU, for 8 Qwen3-sized experts, the jitted copy returned after 0.28 ms, one
    ``device_put`` of the 24-array list after 1.2 ms, 24 separate ones after 1.5 ms (three per expert on the H100
    machine held the thread 0.5 ms);
  * memory: eager copies land in fresh arrays, so mixing them from one stack needs a second, stacked copy
    (twice the staging bytes); the jitted copy writes into the reserved buffer;
  * speed: inside jit a pinned copy ran as fast as an eager one on the H100 machine (8.2 against 7.9 ms for a
    Mixtral expert).
The price: a jitted copy runs on the compute stream, so it does not overlap GPU work queued before or after it
(an eager copy does). The GPU work of a step with copies is the resident mix and the copied experts' mixes, which
for small experts take a fraction of the copies' time; a prefetch copy is queued while the GPU waits for the CPU
lane. XLA may land each copy in a temporary before the row update: up to one batch of transient bytes inside the
copy call.

The same stream order frees the rows. A row read by a queued mix may be rewritten by the next batch at once:
that copy runs on the device after the mix (both are programs on the device's one compute stream), so the host
never waits for a mix to free a slot. Bookkeeping (which (layer, expert) holds which row) is the host's.

Landing estimates: the lane copies one batch after another, n experts in n × the latency model's
``transfer_s``, so a batch issued at t lands at max(t, previous batch's landing) + n × transfer_s; a batch
whose small output (the copied arrays' first elements) is ready has landed. The planners read them as
``left_s`` / ``backlog_s``.
Prefetches (copies for the next layer) are dispatched from the lane's own thread, so the dispatch does not
delay the step's CPU lane; every other use of the buffer first waits for that dispatch to return.

``PcieLane`` runs a plan's copies over the pool: the plan's ``transfer_order`` in batches of the free rows, each
batch mixed once (the first batch's mix also takes the prefetched copies the plan uses).
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import time
from collections.abc import Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from fiddler_jax.errors import FiddlerError
from fiddler_jax.memory_kinds import DEVICE
from fiddler_jax.runtime.host_experts import HostExperts
from fiddler_jax.runtime.planning import PlannerError
from fiddler_jax.runtime.segments import stage_copy, staged_mix


@dataclasses.dataclass
class CopyBatch:
    """One ``stage_copy`` call: its rows, its estimated landing time (``time.perf_counter`` clock) and its small
    output (or the future of the dispatch that makes it), ready once the batch has landed."""

    rows: tuple[int, ...]
    lands_at: float
    done: jax.Array | concurrent.futures.Future

    def resolve(self) -> jax.Array:
        if isinstance(self.done, concurrent.futures.Future):
            self.done = self.done.result()
        return self.done

    def landed(self) -> bool:
        if isinstance(self.done, concurrent.futures.Future) and not self.done.done():
            return False
        return self.resolve().is_ready()


@dataclasses.dataclass
class StagedCopy:
    """One expert's copy: the buffer row it holds and the batch that wrote it."""

    layer: int
    expert: int
    row: int
    batch: CopyBatch
    prefetched: bool

    def left_s(self, now: float) -> float:
        """Seconds until it lands: 0 once its batch has landed, else the estimate (at least 0)."""
        return 0.0 if self.batch.landed() else max(self.batch.lands_at - now, 0.0)


class StagingPool:
    """The PCIe lane's staging buffer and the copies it holds (module docstring)."""

    def __init__(self, host: HostExperts, device: jax.Device, slots: int, transfer_s: float):
        self.host, self.slots, self.transfer_s = host, int(slots), float(transfer_s)
        self._target = jax.sharding.SingleDeviceSharding(device, memory_kind=DEVICE)
        self._copies: dict[tuple[int, int], StagedCopy] = {}
        self._free_rows = list(range(self.slots))
        self._lane_free_at = 0.0
        self._dispatcher = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="fiddler-pcie-lane")
        self._pending: concurrent.futures.Future | None = None  # the last dispatch made on the lane's thread
        self._stack = self._allocate()

    def _allocate(self) -> dict | None:
        """Zeroed device arrays {"w1", "w3", "w2"} [slots, ...] in the held experts' shapes and dtype (None with
        no slots or no host experts)."""
        if self.slots < 1 or not self.host.held.any():
            return None
        return {w: jnp.zeros((self.slots, *shape), dtype, device=self._target)
                for w, (shape, dtype) in self.host.staged.items()}

    @property
    def nbytes(self) -> int:
        """Bytes of the staging buffer: ``slots`` experts."""
        return 0 if self._stack is None else sum(a.nbytes for a in self._stack.values())

    def __len__(self) -> int:
        return len(self._copies)

    def __contains__(self, key: tuple[int, int]) -> bool:
        """Whether (layer, expert) has a copy in the pool."""
        return key in self._copies

    def free(self) -> int:
        return len(self._free_rows)

    def stack(self) -> dict:
        """The staging buffer {"w1", "w3", "w2"} [slots, ...] as it stands after every copy dispatched so far."""
        self._settle()
        return self._stack

    def _settle(self) -> None:
        """Wait until a dispatch made on the lane's thread has returned (not until its copies have landed)."""
        if self._pending is not None:
            pending, self._pending = self._pending, None
            pending.result()

    def copy(self, layer: int, experts: int | Sequence[int], *, ahead: bool = False):
        """Start copying ``experts`` (one id or several) of ``layer`` into free rows, as one batch; experts
        already held are not copied again. ``ahead``: a prefetch, dispatched from the lane's thread. Returns the
        :class:`StagedCopy` (one id) or the list of them (several)."""
        one = np.ndim(experts) == 0
        ids = [int(experts)] if one else [int(e) for e in experts]
        new = list(dict.fromkeys(e for e in ids if (layer, e) not in self._copies))
        if len(new) > self.free():
            raise FiddlerError(f"the PCIe lane has no free staging slot for experts {new} of layer {layer} "
                               f"({self.slots} slots, {self.free()} free); this is an engine bug")
        if new:
            pinned = tuple(self.host.arrays(layer, e) for e in new)
            rows = tuple(self._free_rows.pop(0) for _ in new)
            self._lane_free_at = max(time.perf_counter(), self._lane_free_at) + len(new) * self.transfer_s
            if ahead:
                self._pending = self._dispatcher.submit(self._dispatch, rows, pinned)
                batch = CopyBatch(rows, self._lane_free_at, self._pending)
            else:
                self._settle()
                batch = CopyBatch(rows, self._lane_free_at, self._dispatch(rows, pinned))
            for e, row in zip(new, rows):
                self._copies[layer, e] = StagedCopy(layer, e, row, batch, ahead)
        staged = [self._copies[layer, e] for e in ids]
        return staged[0] if one else staged

    def _dispatch(self, rows: tuple[int, ...], pinned: tuple) -> jax.Array:
        """One ``stage_copy`` call (on the lane's thread, dispatches run in submission order)."""
        self._stack, done = stage_copy(self._stack, np.asarray(rows, np.int32), pinned, target=self._target)
        return done

    def slot_of(self, layer: int, experts: Iterable[int], num_experts: int) -> np.ndarray:
        """int32 [E]: the row of each of ``experts`` (held copies of ``layer``), -1 for every other expert."""
        slot_of = np.full(num_experts, -1, np.int32)
        for e in experts:
            slot_of[int(e)] = self._copies[layer, int(e)].row
        return slot_of

    def arrays(self, layer: int, expert: int) -> dict:
        """The expert's copy: its row of each staging array (a device slice)."""
        row = self._copies[layer, expert].row
        return {w: a[row] for w, a in self.stack().items()}

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

    def release(self, layer: int, experts: Iterable[int] | None = None) -> None:
        """Free the rows of ``layer``'s copies (or of ``experts`` of it) once every GPU read of them is queued: a
        later copy into a freed row runs after those reads on the device (module docstring)."""
        keep = None if experts is None else {int(e) for e in experts}
        for key in [k for k in self._copies if k[0] == layer and (keep is None or k[1] in keep)]:
            self._free_rows.append(self._copies.pop(key).row)

    def clear(self) -> None:
        """Drop every copy (the start of a forward pass: none may be left from one that raised). The buffer is
        made anew if a failed copy call consumed it; a failed prefetch dispatch is raised here, once."""
        self._copies.clear()
        self._free_rows = list(range(self.slots))
        try:
            self._settle()
        except Exception:
            self._stack = self._allocate()
            raise
        if self._stack is not None and any(a.is_deleted() for a in self._stack.values()):
            self._stack = self._allocate()  # donated to a copy call that failed

    def wait(self, layer: int) -> None:
        """Block until every copy of ``layer`` has landed."""
        batches = {id(c.batch): c.batch for (l, _), c in self._copies.items() if l == layer}
        jax.block_until_ready([b.resolve() for b in batches.values()])


class PcieLane:
    """A plan's copies over the staging pool (module docstring)."""

    def __init__(self, pool: StagingPool, num_experts: int):
        self.pool, self.num_experts = pool, num_experts

    def copy_and_mix(self, layer: int, moe_in, routing, order: np.ndarray, gpu_out, staged=()):
        """Copy the experts of ``order`` in batches of the free rows, each batch one ``stage_copy`` and one
        ``staged_mix`` into ``gpu_out``; ``staged``: prefetched copies of ``layer`` mixed with the first batch.
        A batch's rows are freed as soon as its mix is queued (the next batch's copy runs after it on the
        device). Returns the GPU sum."""
        mix_now = [int(e) for e in staged]
        todo = []
        for e in order.tolist():
            (mix_now if (layer, e) in self.pool else todo).append(e)
        mine: list[int] = []
        while todo:
            if not self.pool.free():
                if not mine:
                    raise PlannerError(f"layer {layer}: the plan copies experts but prefetched copies hold all "
                                       f"{self.pool.slots} staging slots; this is an engine bug")
                self.pool.release(layer, mine)
            n = self.pool.free()
            batch, todo = todo[:n], todo[n:]
            self.pool.copy(layer, batch)
            gpu_out = self.mix(layer, mix_now + batch, moe_in, routing, gpu_out)
            mix_now, mine = [], batch
        return self.mix(layer, mix_now, moe_in, routing, gpu_out) if mix_now else gpu_out

    def mix(self, layer: int, experts, moe_in, routing, gpu_out):
        """``gpu_out`` plus the share of ``experts`` (held copies of ``layer``): one ``staged_mix`` over the
        staging buffer (it waits for the copies on the device)."""
        stack = self.pool.stack()
        slot_of = self.pool.slot_of(layer, experts, self.num_experts)
        return staged_mix(moe_in, routing, slot_of, stack["w1"], stack["w3"], stack["w2"], gpu_out)

    def prefetch(self, layer: int, experts) -> None:
        """Start copying ``experts`` of ``layer`` ahead of its step, as one batch from the lane's thread."""
        experts = [int(e) for e in experts]
        if experts:
            self.pool.copy(layer, experts, ahead=True)
