"""Planners by name: a policy (:mod:`.policies`) with its parameters bound, checked once.

``get_planner(name, **params)`` returns a :class:`BoundPlanner`: ``planner(counts, resident, latency, layer=l,
staged_s=None, streamable=False) -> Plan``, a pure function (``streamable``: an all-CPU plan of the step would run
on the streamed lane without a sync; policies that weigh that -- ``fiddler_overlap`` -- are told, the others
ignore it). ``cache_slots`` > 0 puts the policy behind a dynamic cache (the cache
lane holds the state and the buffers; :mod:`.cache_policy` is the rule); ``lru`` is ``transfer`` behind a cache of
2 slots. ``prefetch``: next-layer experts the engine copies ahead per layer step (only ``fiddler_overlap``
without a cache plans with prefetched copies).
"""
from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable

import numpy as np

from fiddler_jax.runtime.latency import LatencyModel
from fiddler_jax.runtime.planning.plan import Plan, PlannerError
from fiddler_jax.runtime.planning.policies import POLICIES
from fiddler_jax.runtime.planning.prefetch import DEFAULT_PREFETCH

DEFAULT_LRU_CACHE_SLOTS = 2
PLANNER_NAMES = (*POLICIES, "lru")  # lru = the transfer policy behind the dynamic cache


@dataclasses.dataclass(frozen=True)
class BoundPlanner:
    """A policy with its parameters bound (module docstring). Holds no state: the same call gives the same plan."""

    name: str
    policy: Callable[..., Plan]
    params: dict
    prefetch: int = 0
    cache_slots: int = 0

    def __call__(self, counts, resident, latency: LatencyModel, layer: int = 0, staged_s=None,
                 streamable: bool = False) -> Plan:
        if staged_s is not None and self.cache_slots:
            raise PlannerError("a planner behind the dynamic cache does not plan with prefetched copies")
        params = self.params if staged_s is None else {**self.params, "staged_s": staged_s}
        if streamable and "streamable" in inspect.signature(self.policy).parameters:
            params = {**params, "streamable": True}
        return dataclasses.replace(self.policy(counts, np.asarray(resident, bool), latency, **params),
                                   planner=self.name)



def policy_of(name: str) -> Callable[..., Plan]:
    """The policy function a planner name runs (``lru`` runs ``transfer``)."""
    if name not in PLANNER_NAMES:
        raise PlannerError(f"unknown planner {name!r}; valid names: {', '.join(PLANNER_NAMES)}")
    return POLICIES["transfer" if name == "lru" else name]


def get_planner(name: str, **params) -> BoundPlanner:
    """The planner called ``name`` with ``params`` bound; ``None`` values mean the default. ``cache_slots`` > 0
    puts any planner behind the dynamic cache (``lru`` defaults to 2 slots)."""
    policy = policy_of(name)
    params = {k: v for k, v in params.items() if v is not None}
    default_cache = DEFAULT_LRU_CACHE_SLOTS if name == "lru" else 0
    cache_slots = int(params.pop("cache_slots", default_cache))
    accepted = [p for p, spec in inspect.signature(policy).parameters.items()
                if spec.kind == spec.KEYWORD_ONLY and p not in ("staged_s", "streamable")]
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
    shown = name if not cache_slots or name == "lru" else f"{name}+cache"
    return BoundPlanner(shown, policy, params, int(prefetch), cache_slots)
