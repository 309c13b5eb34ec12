"""The dynamic cache's replacement rule, and planning behind it -- pure, testable without JAX. The cache's
buffers and its per-layer state belong to the cache lane (:mod:`fiddler_jax.runtime.lanes.cache`).

Any policy can sit behind a dynamic cache of ``slots`` copied experts per layer: cached experts count as
resident when the policy plans, and after the step ``CacheState.after`` records the hits and inserts the
step's copies (LRU eviction).
"""
from __future__ import annotations

import dataclasses

import numpy as np

from fiddler_jax.runtime.latency import LatencyModel
from fiddler_jax.runtime.planning.plan import GPU, Plan


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


def plan_with_cache(planner, state: CacheState, counts, resident, latency: LatencyModel,
                    layer: int = 0) -> tuple[Plan, CacheState]:
    """``planner``'s plan with the experts in ``state`` counted as resident (``plan.cached`` marks the GPU experts
    the cache serves), and the cache's state after the step."""
    resident = np.asarray(resident, bool)
    cached = state.mask(len(resident)) & ~resident
    plan = planner(counts, resident | cached, latency, layer=layer)
    plan = dataclasses.replace(plan, cached=cached & (plan.lanes == GPU))
    return plan, state.after(plan)


class CacheStates:
    """The per-layer states of one dynamic cache of ``slots`` experts (what the cache lane keeps beside its
    buffers): ``plan`` plans a step behind the layer's cache and moves the layer's state on."""

    def __init__(self, slots: int):
        self.slots = int(slots)
        self.layers: dict[int, CacheState] = {}

    def get(self, layer: int) -> CacheState:
        return self.layers.get(layer, CacheState.empty(self.slots))

    def plan(self, planner, counts, resident, latency: LatencyModel, layer: int = 0) -> Plan:
        plan, self.layers[layer] = plan_with_cache(planner, self.get(layer), counts, resident, latency, layer)
        return plan

    def reset(self) -> None:
        self.layers.clear()
