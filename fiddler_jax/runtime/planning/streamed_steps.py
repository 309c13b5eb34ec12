"""Which layer steps may skip the host sync: those whose plan the routing cannot change.

The engine syncs once per layer step because the planner needs the step's per-expert token counts. For a step
of T tokens with top-k routing, the counts range over the vectors c with 0 ≤ c[e] ≤ T and Σ c = T·k (every such
vector is some routing's: each token picks k distinct experts). If, for every one of them, the plan runs every
active non-resident expert on the CPU, every active resident expert on the GPU, copies nothing and runs its lanes
concurrently (:func:`plan_is_all_cpu`), then the plan is known before the routing is: the step can run as queued
device work -- the resident mix and the streamed CPU lane (:mod:`fiddler_jax.kernels.streamed_lane`) -- with no
sync at all. Single-token decode is such a step on Mixtral wherever one copy takes longer than the CPU's work on
one token (the H100 machine: 7 ms against 3 ms).

**Symmetry classes.** There are too many count vectors to ask the planner about each (C(128, 8) ≈ 1.4e12 for one
token of a 128-expert top-8 layer), so the check asks about one vector per *class*. The class of c is the pair
(multiset of c over the resident experts, multiset of c over the offloaded ones); two vectors share a class
exactly when a relabeling of the experts that keeps every expert's residency turns one into the other. The
planners are equivariant under such relabelings up to ties: the plan of a relabeled vector is the plan of the
original with its experts relabeled the same way, except that experts equal in residency and count may trade
places. They read an expert's id only to break ties between experts that are equal in residency and count (copy
order: longest GPU time, then larger count, then lower id -- :func:`~fiddler_jax.runtime.planning.cost.step_costs`;
Algorithm 1's savings: ties go to the earlier expert in copy order --
:func:`~fiddler_jax.runtime.planning.policies.fiddler_choice`), and everything else they compute is a sum or a
search over those per-expert costs in copy order. :func:`plan_is_all_cpu` reads the plan only per residency
(every active offloaded expert on the CPU, every active resident one on the GPU, no copies, no prefetched copy,
concurrent), so it is one value for the whole class, and a representative decides it. A ``plan_of`` passed here
must have the same property (tests/test_symmetry_classes.py checks every planner of the registry against full
enumeration).

With R resident and O offloaded experts, the classes are the pairs (A, B): A a multiset of R counts in [0, T], B
of O counts in [0, T], ΣA + ΣB = T·k. For T = 1 a class is how many of the k chosen experts are resident: at most
k + 1 of them. Their number grows quickly with T, so the check looks at most at ``limit`` classes and refuses to
stream a step with more. Pure Python: testable without JAX.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator
from functools import cache

import numpy as np

from fiddler_jax.runtime.planning.plan import Lane, Plan

DEFAULT_LIMIT = 512  # symmetry classes examined per (layer, tokens) at most


@cache
def _number_of_vectors(parts: int, total: int, cap: int) -> int:
    """How many vectors of ``parts`` integers in [0, cap] sum to ``total``."""
    if parts == 0:
        return int(total == 0)
    return sum(_number_of_vectors(parts - 1, total - c, cap) for c in range(min(cap, total) + 1))


def count_vectors(num_experts: int, tokens: int, top_k: int) -> Iterator[np.ndarray]:
    """Every per-expert count vector a step of ``tokens`` tokens with top-``top_k`` routing can produce (the full
    enumeration the classes stand for; tests compare against it)."""
    total = tokens * top_k
    counts = np.zeros(num_experts, np.int64)

    def fill(e: int, left: int):
        if e == num_experts - 1:
            if left <= tokens:
                counts[e] = left
                yield counts.copy()
            return
        for c in range(min(tokens, left) + 1):
            if left - c <= tokens * (num_experts - 1 - e):
                counts[e] = c
                yield from fill(e + 1, left - c)

    if top_k <= num_experts:
        yield from fill(0, total)


def routing_class(counts: np.ndarray, resident: np.ndarray) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The symmetry class of ``counts`` (module docstring): its resident experts' counts and its offloaded
    experts' counts, each sorted in decreasing order."""
    counts, resident = np.asarray(counts), np.asarray(resident, bool)
    return (tuple(sorted(counts[resident].tolist(), reverse=True)),
            tuple(sorted(counts[~resident].tolist(), reverse=True)))


def _multisets(parts: int, total: int, cap: int) -> Iterator[tuple[int, ...]]:
    """Every multiset of ``parts`` integers in [0, cap] summing to ``total``, each once, as a non-increasing
    tuple: the first part runs from min(cap, total) down to ⌈total / parts⌉, the rest is a multiset of
    ``parts`` - 1 integers no larger than the first."""
    if total == 0:
        yield (0,) * parts
        return
    if parts == 0 or total > parts * cap:
        return
    for first in range(min(cap, total), -(-total // parts) - 1, -1):
        for rest in _multisets(parts - 1, total - first, first):
            yield (first, *rest)


def class_representatives(resident: np.ndarray, tokens: int, top_k: int) -> Iterator[np.ndarray]:
    """One count vector for each symmetry class of a ``tokens``-token top-``top_k`` step over the layer's
    experts (``resident``: bool [E]): for each share s of the T·k assignments that the resident experts take,
    each multiset A of their counts summing to s and each multiset B of the offloaded experts' counts summing to
    T·k - s, the vector with A on the resident experts and B on the offloaded ones (both in ascending id order).
    Every class appears once; a step with ``top_k`` > E has none."""
    resident = np.asarray(resident, bool)
    on, off = np.flatnonzero(resident), np.flatnonzero(~resident)
    total = tokens * top_k
    if tokens < 1 or not 0 < top_k <= len(resident):
        return
    for share in range(min(total, len(on) * tokens) + 1):
        if total - share > len(off) * tokens:
            continue
        for a in _multisets(len(on), share, tokens):
            for b in _multisets(len(off), total - share, tokens):
                counts = np.zeros(len(resident), np.int64)
                counts[on], counts[off] = a, b
                yield counts


def plan_is_all_cpu(plan: Plan, counts: np.ndarray, resident: np.ndarray) -> bool:
    """Whether ``plan`` runs the active non-resident experts on the CPU and the active resident ones on the GPU,
    copies nothing, uses no prefetched copy, and runs its lanes at once."""
    active = counts > 0
    lanes = np.asarray(plan.lanes)
    return (bool(plan.concurrent) and len(plan.transfer_order) == 0
            and not (plan.staged is not None and np.asarray(plan.staged).any())
            and bool((lanes[active & ~resident] == Lane.CPU).all())
            and bool((lanes[active & resident] == Lane.GPU).all()))


def all_cpu_for_any_routing(plan_of: Callable[[np.ndarray], Plan], resident: np.ndarray, tokens: int,
                            top_k: int, limit: int = DEFAULT_LIMIT) -> bool:
    """Whether every routing of a ``tokens``-token step gives an all-CPU plan (:func:`plan_is_all_cpu`) under
    ``plan_of(counts)``, decided on one representative per symmetry class (module docstring) -- False as well
    when the step has more than ``limit`` classes (counted before any plan is asked for) or none at all."""
    resident = np.asarray(resident, bool)
    representatives = []
    for counts in class_representatives(resident, tokens, top_k):
        if len(representatives) == limit:
            return False
        representatives.append(counts)
    return bool(representatives) and all(plan_is_all_cpu(plan_of(c), c, resident) for c in representatives)


def _best_sum(values: np.ndarray, items: int, total: int) -> float:
    """The largest sum of ``values[c - 1]`` over at most ``items`` counts c in [1, len(values)] whose sum is at
    most ``total`` (a knapsack: the most CPU seconds that many offloaded experts can hold)."""
    cap = len(values)
    best = np.full(total + 1, -np.inf)
    best[0] = 0.0
    for _ in range(items):
        step = best.copy()
        for c in range(1, min(cap, total) + 1):
            step[c:] = np.maximum(step[c:], best[:-c] + values[c - 1])
        if np.array_equal(step, best):
            break
        best = step
    return float(best.max())


def all_cpu_by_bound(planner, latency, resident: np.ndarray, tokens: int, top_k: int) -> bool:
    """Whether every routing of a ``tokens``-token step is planned all-CPU (:func:`plan_is_all_cpu`), proved from
    the planner's rule and the latency model without looking at count vectors (a sufficient condition: False
    means "not proved", and the symmetry classes may still decide). ``planner``: a ``BoundPlanner`` asked with
    ``streamable=True``.

      * ``cpu_only`` (concurrent): always.
      * ``fiddler`` with ``concurrent=True``: Algorithm 1 copies an expert of count c iff transfer_s + gpu(c) <
        cpu(c), expert by expert, so never iff that fails for every c in [1, tokens].
      * ``fiddler_overlap``: a plan copying m experts X costs at least sync + max(S - cpu(X), G, m·t) (S: the
        offloaded experts' CPU seconds, G: the resident ones' GPU seconds; copies run one after another, each at
        least t = min(transfer_s, transfer_busy_s)),
        and the all-CPU plan of a streamable step costs max(S, G); ties go to fewer copies. So no copy is ever
        chosen if, for every m up to ``max_transfers``, either the most CPU seconds m experts can hold is at
        most sync_s, or m·t + sync_s is at least the most CPU seconds any routing can give S (both
        maxima over counts in [1, tokens] summing to at most tokens·top_k, :func:`_best_sum`).
    Other planners: False."""
    from fiddler_jax.runtime.planning.policies import plan_cpu_only, plan_fiddler, plan_fiddler_overlap

    resident = np.asarray(resident, bool)
    offloaded = int((~resident).sum())
    params = planner.params
    if planner.cache_slots or tokens < 1:
        return False
    if planner.policy is plan_cpu_only:
        return bool(params.get("concurrent", True))
    concurrent = planner.policy is plan_fiddler_overlap or (planner.policy is plan_fiddler
                                                            and bool(params.get("concurrent", False)))
    if offloaded == 0 or not concurrent:  # nothing to copy; a sequential plan never streams
        return concurrent
    counts = np.arange(1, tokens + 1)
    cpu, gpu = np.asarray(latency.cpu(counts), float), np.asarray(latency.gpu(counts), float)
    if planner.policy is plan_fiddler:
        return bool(np.all(latency.transfer_s + gpu >= cpu))
    total = tokens * top_k
    most = min(offloaded, total)
    cap = params.get("max_transfers")
    copies = most if cap is None else min(most, int(cap))
    busiest = _best_sum(cpu, most, total)  # the most CPU seconds any routing gives the offloaded experts
    copy = min(latency.transfer_s, latency.copy_beside_cpu_s)
    for m in range(1, copies + 1):
        if _best_sum(cpu, m, total) > latency.sync_s and m * copy + latency.sync_s < busiest:
            return False
    return True
