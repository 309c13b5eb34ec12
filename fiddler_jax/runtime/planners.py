"""Planners: for one layer step, which lane runs each expert -- pure functions of (token counts, GPU residency,
latency model), outside jit, testable without JAX.

Lanes: ``GPU`` (weights resident or in the dynamic cache), ``CPU`` (activations go to the CPU kernel),
``TRANSFER`` (copy the weights into a GPU staging slot, then compute on the GPU), ``IDLE`` (no tokens).
Only active (s_e > 0) experts that are not on the GPU get a choice; resident/cached active experts are ``GPU``.

Cost model (latency model L; sync = L.sync_s is paid by every step the planner sees, since its counts came to
the host). Copies run on the PCIe lane one after another, in Johnson's order for a two-stage flow shop with equal
first stages -- longest GPU time first, then larger count, then lower id -- which minimises the GPU finish time
(exactly so while no copy waits for a staging slot).
Copy i goes into staging slot ``i % staging_slots`` and cannot start before the GPU has finished with the copy
that last used that slot.
  sequential (the paper: lanes one after another)
      sync + sum gpu(s_e) resident + sum cpu(s_e) CPU + sum (transfer_s + gpu(s_e)) TRANSFER
  concurrent (ours: CPU lane, PCIe lane and GPU at once)
      sync + max(sum cpu(s_e) over CPU, GPU finish), the GPU running resident experts first and each copied
      expert once its copy has landed; the CPU lane is one grouped call costing the sum of its experts (the
      cores share memory bandwidth).

Policies (registry ``POLICIES``; ``get_planner(name, **params)`` binds parameters):
  fiddler          Algorithm 1: TRANSFER iff transfer_s + gpu(s_e) < cpu(s_e), else CPU; beyond
                   ``max_transfers`` keep the largest savings. Sequential cost (``concurrent=True`` for ablation).
  fiddler_overlap  minimises the concurrent makespan over CPU/TRANSFER assignments with at most ``max_transfers``
                   copies: exhaustively for up to ``exact_limit`` candidates, else over the prefixes of the copy
                   order (largest counts first); Algorithm 1's assignment is always a candidate, so its makespan
                   never exceeds ``fiddler``'s. Ties go to fewer copies.
  cpu_only         llama.cpp-style: every non-resident expert on the CPU.
  transfer         DeepSpeed/accelerate-style: copy every non-resident expert; more copies than staging slots
                   reuse the slots, and the makespan counts the waits.
  gpu_only         every active expert must be resident; otherwise a PlannerError naming the fix.
  lru              Mixtral-offloading-style: ``transfer`` behind a dynamic cache of ``cache_slots`` experts.
Any policy can sit behind the dynamic cache (``cache_slots`` > 0, ``CachedPlanner``): cached experts count as
resident, and after each step ``CacheState.after`` records hits and inserts the copied experts (LRU eviction).

Prefetched experts (``staged_s``, fiddler_overlap only): the engine may have started copying some of this layer's
experts during the previous layer step (``plan_prefetch``). ``staged_s[e]`` is the time until expert e's copy
lands (0: landed; inf: not staged). A staged active expert is a candidate like the others, but its GPU option
needs no new copy: it runs at max(landed, GPU free) and takes no PCIe time; copies made in this step queue on the
PCIe lane behind the staged ones still in flight and use the staging slots the staged copies leave free. The
search space and the tie rule are unchanged, so a copy that lands too late to beat the CPU is left unused.

``plan_prefetch`` (pure): which experts of the next layer to start copying now, when this step leaves the PCIe
lane idle -- the next layer's predicted experts (its router applied to this layer's hidden state), most
predicted tokens first, that are not on the GPU, at most ``prefetch`` and at most the free staging slots.
"""
from __future__ import annotations

import dataclasses
import enum
import inspect
from collections.abc import Callable
from typing import Optional

import numpy as np

from fiddler_jax.errors import InvalidInputError
from fiddler_jax.runtime.latency import LatencyModel

EXACT_LIMIT = 10  # exhaustive search up to this many candidate experts (2**10 assignments)
DEFAULT_STAGING_SLOTS = 2
DEFAULT_LRU_CACHE_SLOTS = 2
# fiddler_overlap: next-layer experts copied ahead per layer step (plan_prefetch). Off by default: on the H100
# machine the copies' DMA slows the CPU kernel by 18% (they read the same DRAM), which ate the gain of the 20% of
# CPU-lane experts it moved to the GPU (decode at 24 GiB: 4.66 tok/s with 1, 4.78 without; docs/benchmarks.md).
DEFAULT_PREFETCH = 0


class PlannerError(InvalidInputError):
    """A planner that cannot plan: unknown name or parameter, bad counts, or experts that do not fit its rule."""


class Lane(enum.IntEnum):
    IDLE = 0
    GPU = 1
    CPU = 2
    TRANSFER = 3


_IDLE, _GPU, _CPU, _TRANSFER = (int(lane) for lane in Lane)  # plain ints: enum lookups cost on the hot path


@dataclasses.dataclass(frozen=True, eq=False)
class Plan:
    """One layer step's decision. ``lanes`` (int8 [E]) is what the engine passes into jit; copy i of
    ``transfer_order`` uses staging slot ``i % staging_slots``; ``cached`` marks GPU experts served by the
    dynamic cache rather than static placement, ``staged`` those served by a prefetched copy."""

    planner: str
    counts: np.ndarray  # int32 [E]
    lanes: np.ndarray  # int8 [E], Lane codes
    transfer_order: np.ndarray  # int32 [copies], expert ids in copy order
    staging_slots: int
    concurrent: bool
    predicted_s: float
    lane_busy_s: dict  # "gpu", "cpu", "pcie": predicted seconds of work on each lane
    cached: np.ndarray  # bool [E]
    staged: np.ndarray = None  # bool [E]: GPU experts served by a prefetched copy (see plan_prefetch)

    def __post_init__(self):
        if self.staged is None:
            object.__setattr__(self, "staged", np.zeros(len(self.lanes), bool))

    def experts(self, lane: Lane) -> np.ndarray:
        return np.flatnonzero(self.lanes == lane)

    @property
    def transfer_slots(self) -> np.ndarray:
        return np.arange(len(self.transfer_order), dtype=np.int32) % max(self.staging_slots, 1)

    def __str__(self) -> str:
        def group(ids):
            return " ".join(f"{e}:{self.counts[e]}" for e in ids) or "-"

        busy = " ".join(f"{k} {v * 1e3:.2f}" for k, v in self.lane_busy_s.items())
        return (f"{self.planner} {self.predicted_s * 1e3:.2f} ms {'concurrent' if self.concurrent else 'sequential'}"
                f" | gpu {group(self.experts(Lane.GPU))} | cpu {group(self.experts(Lane.CPU))}"
                f" | transfer {group(self.transfer_order)} | busy ms {busy}")


@dataclasses.dataclass(frozen=True)
class _Step:
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


def _step(counts, on_gpu, latency: LatencyModel, staged_s=None) -> _Step:
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
    return _Step(counts, active, on_gpu, np.where(active, latency.cpu(counts), 0.0), gpu_s,
                 np.concatenate([staged, ids]).astype(np.int64), latency, staged_s)


def _gpu_finish(resident_s: float, job_gpu_s: np.ndarray, chosen: np.ndarray, copy_s: float,
                staging_slots: int, staged_s=(), pcie_backlog_s: float = 0.0) -> np.ndarray:
    """GPU finish time for each row of ``chosen`` (bool [rows, jobs], jobs in copy order): resident work first,
    each chosen job's compute after its copy lands; a copy waits for the PCIe lane and for its staging slot.
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


def _gpu_finish_one(resident_s: float, job_gpu_s, copy_s: float, staging_slots: int, staged=(),
                    pcie_backlog_s: float = 0.0) -> float:
    """``_gpu_finish`` for one assignment that copies every job after running the ``staged`` (landing time, GPU
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


def _plan(planner: str, step: _Step, transfer: np.ndarray, staging_slots: int, concurrent: bool) -> Plan:
    """Build the plan that copies the experts marked in ``transfer`` (or, for staged experts, uses their
    prefetched copy) and puts the other candidates on the CPU."""
    lanes = np.where(step.active, np.where(step.on_gpu, _GPU, _CPU), _IDLE).astype(np.int8)
    use_staged = transfer & step.staged & step.active
    transfer = transfer & ~step.staged
    lanes[transfer] = _TRANSFER
    lanes[use_staged] = _GPU
    order = step.candidates[transfer[step.candidates]].astype(np.int32)
    staged_order = step.candidates[use_staged[step.candidates]]
    lat = step.latency
    resident_s = float(step.gpu_s[step.active & step.on_gpu].sum())
    cpu_s = float(step.cpu_s[lanes == _CPU].sum())
    copied_gpu_s = step.gpu_s[order].tolist()
    staged_gpu = [(float(step.staged_s[e]), float(step.gpu_s[e])) for e in staged_order]
    busy = {"gpu": resident_s + sum(copied_gpu_s) + sum(g for _, g in staged_gpu), "cpu": cpu_s,
            "pcie": len(order) * lat.transfer_s}
    if concurrent:
        gpu_done = _gpu_finish_one(resident_s, copied_gpu_s, lat.transfer_s, step.free_slots(staging_slots),
                                   staged_gpu, step.pcie_backlog_s)
        predicted = lat.sync_s + max(cpu_s, gpu_done)
    else:
        predicted = lat.sync_s + busy["gpu"] + busy["cpu"] + busy["pcie"]
    return Plan(planner, step.counts, lanes, order, staging_slots, concurrent, predicted, busy,
                np.zeros(len(lanes), bool), use_staged)


def _check_slots(staging_slots: int, max_transfers: int | None) -> int:
    if int(staging_slots) < 1:
        raise PlannerError(f"staging_slots must be at least 1; got {staging_slots}")
    cap = staging_slots if max_transfers is None else max_transfers
    if int(cap) < 0:
        raise PlannerError(f"max_transfers must be non-negative (or null: as many as staging_slots); got {cap}")
    return int(cap)


def _fiddler_choice(step: _Step, cap: int) -> np.ndarray:
    """Algorithm 1's transfers: candidates where copying and computing on the GPU beats the CPU, largest saving
    first when more want it than ``cap`` allows."""
    ids = step.candidates[~step.staged[step.candidates]]
    saving = step.cpu_s[ids] - (step.latency.transfer_s + step.gpu_s[ids])
    wanted = ids[saving > 0]
    wanted = wanted[np.lexsort((wanted, -(saving[saving > 0])))][:cap]
    transfer = np.zeros(len(step.counts), bool)
    transfer[wanted] = True
    return transfer


def plan_fiddler(counts, on_gpu, latency: LatencyModel, *, staging_slots: int = DEFAULT_STAGING_SLOTS,
                 max_transfers: Optional[int] = None, concurrent: bool = False) -> Plan:
    """The paper's Algorithm 1 (see the module docstring)."""
    step = _step(counts, on_gpu, latency)
    transfer = _fiddler_choice(step, _check_slots(staging_slots, max_transfers))
    return _plan("fiddler", step, transfer, int(staging_slots), concurrent)


def plan_fiddler_overlap(counts, on_gpu, latency: LatencyModel, *, staging_slots: int = DEFAULT_STAGING_SLOTS,
                         max_transfers: Optional[int] = None, exact_limit: int = EXACT_LIMIT,
                         staged_s=None) -> Plan:
    """The assignment with the smallest concurrent makespan (see the module docstring); ``staged_s``: landing
    times of prefetched copies (module docstring)."""
    step = _step(counts, on_gpu, latency, staged_s)
    cap = _check_slots(staging_slots, max_transfers)
    if not step.free_slots(staging_slots):  # the staged copies hold every slot
        cap = 0
    if not 0 <= int(exact_limit) <= 16:
        raise PlannerError(f"exact_limit must be in 0..16 (2**exact_limit assignments are searched); got {exact_limit}")
    ids = step.candidates
    n = len(ids)
    if n == 0:
        return _plan("fiddler_overlap", step, np.zeros(len(step.counts), bool), int(staging_slots), True)
    if n <= exact_limit:  # every assignment, fewest copies first
        chosen = ((np.arange(2 ** n)[:, None] >> np.arange(n)) & 1).astype(bool)
    else:  # use the staged copies, and copy the first k other candidates in copy order (largest counts), k = 0..n
        staged = step.staged[ids]
        chosen = np.tri(n + 1, n, -1, dtype=bool) | staged
    chosen = np.concatenate([chosen, (_fiddler_choice(step, cap) | step.staged)[ids][None]])
    copies = chosen & ~step.staged[ids]
    chosen = chosen[copies.sum(1) <= cap]
    chosen = chosen[np.argsort(chosen.sum(1), kind="stable")]
    cpu_s = (~chosen * step.cpu_s[ids]).sum(1)
    resident_s = float(step.gpu_s[step.active & step.on_gpu].sum())
    n_staged = int(step.staged[ids].sum())
    makespan = np.maximum(cpu_s, _gpu_finish(resident_s, step.gpu_s[ids], chosen, latency.transfer_s,
                                             step.free_slots(staging_slots), step.staged_s[ids[:n_staged]],
                                             step.pcie_backlog_s))
    best = chosen[np.flatnonzero(makespan <= makespan.min() + 1e-12)[0]]
    transfer = np.zeros(len(step.counts), bool)
    transfer[ids[best]] = True
    return _plan("fiddler_overlap", step, transfer, int(staging_slots), True)


def plan_prefetch(predicted_counts, on_gpu, staged, latency: LatencyModel, *, free_slots: int, prefetch: int,
                  step_s: float = 0.0, pcie_backlog_s: float = 0.0) -> np.ndarray:
    """The next layer's experts to start copying now (module docstring): int32 ids, most predicted tokens first
    (ties: lower id), only predicted (count > 0) ones not on the GPU and not already staged, at most
    min(prefetch, free_slots), and only copies that can still pay: the k-th lands after the lane's backlog and
    k copies, and must land within ``step_s`` (this step's predicted time, after which the next one plans) plus
    the CPU time of its predicted tokens -- later, the next step runs it on the CPU rather than wait, and a copy
    in the queue would only delay the copies behind it. The engine calls it only when this step's plan leaves
    the PCIe lane idle."""
    predicted_counts = np.asarray(predicted_counts)
    on_gpu, staged = np.asarray(on_gpu, bool), np.asarray(staged, bool)
    if not (predicted_counts.shape == on_gpu.shape == staged.shape) or predicted_counts.ndim != 1:
        raise PlannerError(f"plan_prefetch needs predicted counts, a GPU mask and a staged mask of one shape [E]; got "
                           f"{predicted_counts.shape}, {on_gpu.shape}, {staged.shape}")
    if int(prefetch) < 0:
        raise PlannerError(f"prefetch must be non-negative (experts copied ahead per layer step); got {prefetch}")
    ids = np.flatnonzero((predicted_counts > 0) & ~on_gpu & ~staged)
    ids = ids[np.lexsort((ids, -predicted_counts[ids]))][:max(min(int(prefetch), int(free_slots)), 0)]
    lands = pcie_backlog_s + latency.transfer_s * np.arange(1, len(ids) + 1)
    pays = lands <= step_s + latency.cpu(predicted_counts[ids])
    return ids[:int(np.argmin(pays)) if not pays.all() else len(ids)].astype(np.int32)


def plan_cpu_only(counts, on_gpu, latency: LatencyModel, *, concurrent: bool = True) -> Plan:
    """Every active expert that is not on the GPU runs on the CPU."""
    step = _step(counts, on_gpu, latency)
    return _plan("cpu_only", step, np.zeros(len(step.counts), bool), 1, concurrent)


def plan_transfer(counts, on_gpu, latency: LatencyModel, *, staging_slots: int = DEFAULT_STAGING_SLOTS,
                  concurrent: bool = True) -> Plan:
    """Every active expert that is not on the GPU is copied, however many copies share the staging slots."""
    step = _step(counts, on_gpu, latency)
    _check_slots(staging_slots, None)
    return _plan("transfer", step, step.active & ~step.on_gpu, int(staging_slots), concurrent)


def plan_gpu_only(counts, on_gpu, latency: LatencyModel) -> Plan:
    """Every active expert on the GPU; a PlannerError when one is not there."""
    step = _step(counts, on_gpu, latency)
    missing = np.flatnonzero(step.active & ~step.on_gpu)
    if missing.size:
        raise PlannerError(f"planner gpu_only: experts {missing.tolist()} have tokens but are not on the GPU; "
                           f"raise gpu_budget until every expert is resident, or choose a hybrid planner "
                           f"(planner=fiddler_overlap)")
    return _plan("gpu_only", step, np.zeros(len(step.counts), bool), 1, True)


POLICIES: dict[str, Callable[..., Plan]] = {
    "fiddler": plan_fiddler, "fiddler_overlap": plan_fiddler_overlap, "cpu_only": plan_cpu_only,
    "transfer": plan_transfer, "gpu_only": plan_gpu_only,
}
PLANNER_NAMES = (*POLICIES, "lru")  # lru = the transfer policy behind the dynamic cache


@dataclasses.dataclass(frozen=True)
class CacheState:
    """One layer's dynamic GPU cache: the expert in each slot (-1: empty) and each slot's last use on a clock
    that ticks once per use.

    After a step (``after``): the step's hits -- cached experts with tokens -- are used in ascending expert
    order, then the step's copies are inserted in copy order, each into the lowest empty slot or else the least
    recently used one. A step that copies more experts than there are slots keeps the last ones copied."""

    experts: tuple[int, ...]
    last_use: tuple[int, ...]
    clock: int = 0

    @classmethod
    def empty(cls, slots: int) -> CacheState:
        return cls((-1,) * slots, (-1,) * slots)

    def mask(self, num_experts: int) -> np.ndarray:
        mask = np.zeros(num_experts, bool)
        mask[[e for e in self.experts if 0 <= e < num_experts]] = True
        return mask

    def after(self, plan: Plan) -> CacheState:
        experts, last_use, clock = list(self.experts), list(self.last_use), self.clock
        for e in np.flatnonzero(plan.counts > 0):
            if e in experts:
                last_use[experts.index(e)], clock = clock, clock + 1
        for e in plan.transfer_order.tolist():
            slot = experts.index(-1) if -1 in experts else int(np.argmin(last_use)) if experts else None
            if slot is not None:
                experts[slot], last_use[slot], clock = e, clock, clock + 1
        return CacheState(tuple(experts), tuple(last_use), clock)


@dataclasses.dataclass
class StaticPlanner:
    """A policy with its parameters bound. Call: ``planner(counts, resident, latency, layer=l) -> Plan``;
    ``prefetch``: next-layer experts the engine copies ahead per layer step (policies that take ``staged_s``)."""

    name: str
    policy: Callable[..., Plan]
    params: dict
    prefetch: int = 0

    def __call__(self, counts, resident, latency: LatencyModel, layer: int = 0, staged_s=None) -> Plan:
        params = self.params if staged_s is None else {**self.params, "staged_s": staged_s}
        return dataclasses.replace(self.policy(counts, np.asarray(resident, bool), latency, **params),
                                   planner=self.name)

    def reset(self) -> None:
        pass


@dataclasses.dataclass
class CachedPlanner:
    """A planner behind a dynamic GPU cache of ``cache_slots`` experts per layer (state: ``caches[layer]``)."""

    name: str
    inner: StaticPlanner
    cache_slots: int
    caches: dict[int, CacheState] = dataclasses.field(default_factory=dict)

    def __call__(self, counts, resident, latency: LatencyModel, layer: int = 0, staged_s=None) -> Plan:
        if staged_s is not None:
            raise PlannerError("a planner behind the dynamic cache does not plan with prefetched copies")
        resident = np.asarray(resident, bool)
        cache = self.caches.get(layer, CacheState.empty(self.cache_slots))
        cached = cache.mask(len(resident)) & ~resident
        plan = self.inner(counts, resident | cached, latency)
        plan = dataclasses.replace(plan, planner=self.name, cached=cached & (plan.lanes == _GPU))
        self.caches[layer] = cache.after(plan)
        return plan

    def reset(self) -> None:
        self.caches.clear()


def get_planner(name: str, **params) -> StaticPlanner | CachedPlanner:
    """The planner called ``name`` with ``params`` bound; ``None`` values mean the default. ``cache_slots`` > 0
    puts any planner behind the dynamic cache (``lru`` defaults to 2 slots)."""
    if name not in PLANNER_NAMES:
        raise PlannerError(f"unknown planner {name!r}; valid names: {', '.join(PLANNER_NAMES)}")
    params = {k: v for k, v in params.items() if v is not None}
    default_cache = DEFAULT_LRU_CACHE_SLOTS if name == "lru" else 0
    cache_slots = int(params.pop("cache_slots", default_cache))
    policy = POLICIES["transfer" if name == "lru" else name]
    accepted = [p for p, spec in inspect.signature(policy).parameters.items()
                if spec.kind == spec.KEYWORD_ONLY and p != "staged_s"]
    prefetches = "staged_s" in inspect.signature(policy).parameters
    prefetch = params.pop("prefetch", DEFAULT_PREFETCH if prefetches and not cache_slots else 0)
    unknown = sorted(set(params) - set(accepted))
    if unknown:
        raise PlannerError(f"planner {name!r} takes no parameter {', '.join(unknown)}; it takes: "
                           f"{', '.join(accepted + ['cache_slots'] + (['prefetch'] if prefetches else []))}")
    if not isinstance(prefetch, (int, np.integer)) or isinstance(prefetch, bool) or prefetch < 0:
        raise PlannerError(f"prefetch must be a non-negative integer (next-layer experts copied ahead per layer "
                           f"step); got {prefetch!r}")
    if prefetch and (not prefetches or cache_slots):
        raise PlannerError(f"planner {name!r}{' with cache_slots' if cache_slots else ''} cannot prefetch: only "
                           f"fiddler_overlap without a dynamic cache plans with prefetched copies; set prefetch=0")
    if cache_slots < 0 or (name == "lru" and cache_slots < 1):
        raise PlannerError(f"cache_slots must be at least {1 if name == 'lru' else 0} for planner {name!r}; "
                           f"got {cache_slots}")
    inner = StaticPlanner(name, policy, params, int(prefetch))
    if not cache_slots:
        return inner
    return CachedPlanner(name if name == "lru" else f"{name}+cache", inner, cache_slots)


@dataclasses.dataclass
class PlannerConfig:
    """Typed schema of the ``conf/planner/`` group (one flat schema; ``None`` = the planner's default)."""

    name: str = "fiddler_overlap"
    staging_slots: Optional[int] = None
    max_transfers: Optional[int] = None
    cache_slots: Optional[int] = None
    concurrent: Optional[bool] = None
    exact_limit: Optional[int] = None
    prefetch: Optional[int] = None


def planner_from_config(cfg) -> StaticPlanner | CachedPlanner:
    """``get_planner`` from a ``PlannerConfig`` or any mapping with its keys (e.g. a Hydra DictConfig)."""
    items = dataclasses.asdict(cfg) if dataclasses.is_dataclass(cfg) else dict(cfg)
    return get_planner(**items)
