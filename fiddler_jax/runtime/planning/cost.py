"""The cost model of one layer step: what each lane's work costs under a latency model L, and the makespan of an
assignment of the step's candidate experts to the CPU lane or the PCIe lane.

``sync = L.sync_s`` is paid by every step a planner sees, since its counts came to the host -- except, on a
*streamable* step (the engine would run an all-CPU plan of it on the streamed lane, with no sync:
:mod:`.streamed_steps`), by a plan that copies nothing. Copies run on the
PCIe lane one after another, in Johnson's order for a two-stage flow shop with equal first stages -- longest GPU
time first, then larger count, then lower id -- which minimises the GPU finish time (exactly so while no copy
waits for a staging slot). Copy i goes into staging slot ``i % staging_slots`` and cannot start before the GPU
has finished with the copy that last used that slot.
  sequential (the paper: lanes one after another)
      sync + sum gpu(s_e) resident + sum cpu(s_e) CPU + sum (transfer_s + gpu(s_e)) TRANSFER
  concurrent (CPU lane, PCIe lane and GPU at once)
      sync + max(sum cpu(s_e) over CPU, GPU finish), the GPU running resident experts first and each copied
      expert once its copy has landed; the CPU lane is one grouped call costing the sum of its experts (the
      cores share memory bandwidth). A copy takes ``transfer_busy_s`` when the plan gives the CPU lane work (the
      two lanes share host DRAM; ``LatencyModel.copy_s``), ``transfer_s`` when it does not.

Prefetched experts (``staged_s``): ``staged_s[e]`` is the time until a copy of expert e started during the
previous layer step lands (0: landed; inf: not staged). Its GPU option needs no new copy: it runs at
max(landed, GPU free) and takes no PCIe time; copies made in this step queue on the PCIe lane behind the staged
ones still in flight and use the staging slots the staged copies leave free.
Pure numpy: testable without JAX.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from fiddler_jax.runtime.latency import LatencyModel
from fiddler_jax.runtime.planning.plan import CPU, GPU, IDLE, TRANSFER, Plan, PlannerError


@dataclasses.dataclass(frozen=True)
class StepCosts:
    """The per-expert costs of one layer step (zero for idle experts)."""

    counts: np.ndarray
    active: np.ndarray
    on_gpu: np.ndarray
    cpu_s: np.ndarray
    gpu_s: np.ndarray
    candidates: np.ndarray  # active experts not on the GPU: staged ones by landing time, then the rest in copy
    latency: LatencyModel   # order (Johnson: longest GPU time first)
    staged_s: np.ndarray    # float [E]: until a prefetched copy lands (inf: none)

    @property
    def staged(self) -> np.ndarray:
        return np.isfinite(self.staged_s)

    @property
    def pcie_backlog_s(self) -> float:
        """Until the PCIe lane has landed every staged copy (new copies queue behind them)."""
        return float(self.staged_s[self.staged].max(initial=0.0))

    def free_slots(self, staging_slots: int) -> int:
        """Staging slots left for this step's copies: the staged copies hold theirs until the step ends."""
        return max(int(staging_slots) - int(self.staged.sum()), 0)


def step_costs(counts, on_gpu, latency: LatencyModel, staged_s=None) -> StepCosts:
    counts = np.asarray(counts)
    on_gpu = np.asarray(on_gpu)
    if counts.ndim != 1 or on_gpu.shape != counts.shape or on_gpu.dtype != np.bool_:
        raise PlannerError(f"a planner needs token counts [E] and a boolean GPU mask [E]; got shapes {counts.shape} "
                           f"and {on_gpu.shape} ({on_gpu.dtype})")
    if counts.dtype.kind not in "iu" and not (counts.dtype.kind == "f" and np.all(counts == np.round(counts))):
        raise PlannerError(f"token counts must be integers; got {counts.dtype} {counts.tolist()}")
    if counts.size and counts.min() < 0:
        raise PlannerError(f"token counts must be non-negative; got {counts.tolist()}")
    counts = counts.astype(np.int32)
    staged_s = np.full(counts.shape, np.inf) if staged_s is None else np.asarray(staged_s, np.float64)
    if staged_s.shape != counts.shape or np.isnan(staged_s).any():
        raise PlannerError(f"staged_s must be seconds [E] (inf: not staged); got {staged_s.tolist()}")
    staged_s = np.where(on_gpu, np.inf, np.maximum(staged_s, 0.0))
    active = counts > 0
    gpu_s = np.where(active, latency.gpu(counts), 0.0)
    ids = np.flatnonzero(active & ~on_gpu & ~np.isfinite(staged_s))
    ids = ids[np.lexsort((ids, -counts[ids], -gpu_s[ids]))] if len(ids) > 1 else ids
    staged = np.flatnonzero(active & np.isfinite(staged_s))
    staged = staged[np.lexsort((staged, staged_s[staged]))] if len(staged) > 1 else staged
    return StepCosts(counts, active, on_gpu, np.where(active, latency.cpu(counts), 0.0), gpu_s,
                 np.concatenate([staged, ids]).astype(np.int64), latency, staged_s)


def gpu_finish(resident_s: float, job_gpu_s: np.ndarray, chosen: np.ndarray, copy_s,
                staging_slots: int, staged_s=(), pcie_backlog_s: float = 0.0) -> np.ndarray:
    """GPU finish time for each row of ``chosen`` (bool [rows, jobs], jobs in copy order): resident work first,
    each chosen job's compute after its copy lands; a copy waits for the PCIe lane and for its staging slot.
    ``copy_s``: one copy's seconds, for every row or per row ([rows]).
    The first ``len(staged_s)`` jobs are prefetched copies landing at ``staged_s`` (they need no new copy, and
    new copies queue behind them on the PCIe lane)."""
    rows = np.arange(chosen.shape[0])
    staged_s = np.asarray(staged_s, np.float64)
    gpu_free = np.full(len(rows), float(resident_s))
    for j, landed in enumerate(staged_s):
        gpu_free = np.where(chosen[:, j], np.maximum(landed, gpu_free) + job_gpu_s[j], gpu_free)
    pcie_free = np.full(len(rows), float(pcie_backlog_s))
    staging_slots = max(staging_slots, 1)  # 0 free slots: the caller allows no copies
    slot_free = np.zeros((len(rows), staging_slots))
    copies = np.zeros(len(rows), dtype=np.int64)
    for j in range(len(staged_s), chosen.shape[1]):
        take = chosen[:, j]
        slot = copies % staging_slots
        landed = np.maximum(pcie_free, slot_free[rows, slot]) + copy_s
        done = np.maximum(landed, gpu_free) + job_gpu_s[j]
        pcie_free = np.where(take, landed, pcie_free)
        gpu_free = np.where(take, done, gpu_free)
        slot_free[rows, slot] = np.where(take, done, slot_free[rows, slot])
        copies += take
    return gpu_free


def gpu_finish_one(resident_s: float, job_gpu_s, copy_s: float, staging_slots: int, staged=(),
                    pcie_backlog_s: float = 0.0) -> float:
    """``gpu_finish`` for one assignment that copies every job after running the ``staged`` (landing time, GPU
    time) pairs (plain floats: the per-step path)."""
    gpu_free = resident_s
    for landed, gpu_s in staged:
        gpu_free = max(landed, gpu_free) + gpu_s
    staging_slots = max(staging_slots, 1)
    pcie_free, slot_free = pcie_backlog_s, [0.0] * staging_slots
    for i, gpu_s in enumerate(job_gpu_s):
        pcie_free = max(pcie_free, slot_free[i % staging_slots]) + copy_s
        gpu_free = slot_free[i % staging_slots] = max(pcie_free, gpu_free) + gpu_s
    return gpu_free


def plan_of(planner: str, step: StepCosts, transfer: np.ndarray, staging_slots: int, concurrent: bool,
            streamable: bool = False) -> Plan:
    """Build the plan that copies the experts marked in ``transfer`` (or, for staged experts, uses their
    prefetched copy) and puts the other candidates on the CPU. ``streamable``: a concurrent plan that copies nothing
    and uses no prefetched copy would run on the streamed lane, without a sync (its prediction leaves ``sync_s``
    out); a sequential plan never streams."""
    lanes = np.where(step.active, np.where(step.on_gpu, GPU, CPU), IDLE).astype(np.int8)
    use_staged = transfer & step.staged & step.active
    transfer = transfer & ~step.staged
    lanes[transfer] = TRANSFER
    lanes[use_staged] = GPU
    order = step.candidates[transfer[step.candidates]].astype(np.int32)
    staged_order = step.candidates[use_staged[step.candidates]]
    lat = step.latency
    resident_s = float(step.gpu_s[step.active & step.on_gpu].sum())
    cpu_s = float(step.cpu_s[lanes == CPU].sum())
    copied_gpu_s = step.gpu_s[order].tolist()
    staged_gpu = [(float(step.staged_s[e]), float(step.gpu_s[e])) for e in staged_order]
    copy_s = lat.copy_s(cpu_s > 0) if concurrent else lat.transfer_s
    busy = {"gpu": resident_s + sum(copied_gpu_s) + sum(g for _, g in staged_gpu), "cpu": cpu_s,
            "pcie": len(order) * copy_s}
    streams = concurrent and streamable and not len(order) and not use_staged.any()  # on the streamed lane
    sync_s = 0.0 if streams else lat.sync_s
    if concurrent:
        gpu_done = gpu_finish_one(resident_s, copied_gpu_s, copy_s, step.free_slots(staging_slots),
                                   staged_gpu, step.pcie_backlog_s)
        predicted = sync_s + max(cpu_s, gpu_done)
    else:
        predicted = sync_s + busy["gpu"] + busy["cpu"] + busy["pcie"]
    return Plan(planner, step.counts, lanes, order, staging_slots, concurrent, predicted, busy,
                np.zeros(len(lanes), bool), use_staged)


def check_slots(staging_slots: int, max_transfers: int | None) -> int:
    if int(staging_slots) < 1:
        raise PlannerError(f"staging_slots must be at least 1; got {staging_slots}")
    cap = staging_slots if max_transfers is None else max_transfers
    if int(cap) < 0:
        raise PlannerError(f"max_transfers must be non-negative (or null: as many as staging_slots); got {cap}")
    return int(cap)


