"""Which layer steps may skip the host sync: those whose plan the routing cannot change.

The engine syncs once per layer step because the planner needs the step's per-expert token counts. For a step
of T tokens with top-k routing, the counts range over the vectors c with 0 ≤ c[e] ≤ T and Σ c = T·k (every such
vector is some routing's: each token picks k distinct experts). If, for every one of them, the plan runs every
active non-resident expert on the CPU, every active resident expert on the GPU, copies nothing and runs its lanes
concurrently, then the plan is known before the routing is: the step can run as queued device work -- the
resident mix and the streamed CPU lane (:mod:`fiddler_jax.kernels.streamed_lane`) -- with no sync at all. Single-
token decode is such a step on Mixtral wherever one copy takes longer than the CPU's work on one token (the H100
machine: 7 ms against 3 ms). The check enumerates the vectors (28 for T = 1, 8 experts, top-2), so it is bounded
by ``limit`` vectors; beyond it a step is not streamed. Pure Python: testable without JAX.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator
from functools import cache

import numpy as np

from fiddler_jax.runtime.planning.plan import Lane, Plan

DEFAULT_LIMIT = 512  # count vectors examined per (layer, tokens) at most


@cache
def _number_of_vectors(parts: int, total: int, cap: int) -> int:
    """How many vectors of ``parts`` integers in [0, cap] sum to ``total``."""
    if parts == 0:
        return int(total == 0)
    return sum(_number_of_vectors(parts - 1, total - c, cap) for c in range(min(cap, total) + 1))


def count_vectors(num_experts: int, tokens: int, top_k: int) -> Iterator[np.ndarray]:
    """Every per-expert count vector a step of ``tokens`` tokens with top-``top_k`` routing can produce."""
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
    ``plan_of(counts)`` -- False as well when there are more than ``limit`` count vectors to examine."""
    resident = np.asarray(resident, bool)
    if tokens < 1 or _number_of_vectors(len(resident), tokens * top_k, tokens) > limit:
        return False
    return all(plan_is_all_cpu(plan_of(c), c, resident) for c in count_vectors(len(resident), tokens, top_k))
