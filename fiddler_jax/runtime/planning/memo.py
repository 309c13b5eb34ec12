"""Plans remembered per (layer, token counts, prefetched copies' landing times).

A planner is a pure function of the counts, the layer's residency, the latency model and the staged copies'
landing times, and the residency and the latency model are fixed for an engine. Decode sees few distinct keys,
so most small steps skip the planner's search (0.2 ms on the H100 machine's host). Landing times are rounded up
to quarter milliseconds so that a key repeats; steps with more than ``max_tokens`` routed tokens are planned
afresh (their keys rarely repeat).
"""
from __future__ import annotations

import numpy as np

from fiddler_jax.runtime.latency import LatencyModel
from fiddler_jax.runtime.planning.plan import Plan

MEMO_MAX_TOKENS = 64
MEMO_MAX_PLANS = 1 << 14


class PlanMemo:
    """``memo(counts, layer, staged_s=None) -> Plan``: the planner's plan for the layer's residency, remembered
    (module docstring). ``resident``: bool [layers, E]."""

    def __init__(self, planner, resident: np.ndarray, latency: LatencyModel, max_tokens: int = MEMO_MAX_TOKENS,
                 max_plans: int = MEMO_MAX_PLANS):
        self.planner, self.resident, self.latency = planner, resident, latency
        self.max_tokens, self.max_plans = max_tokens, max_plans
        self._plans: dict = {}

    def __call__(self, counts: np.ndarray, layer: int, staged_s: np.ndarray | None = None) -> Plan:
        staged = {}
        if staged_s is not None:  # only planners that prefetch are given it
            staged = {"staged_s": np.where(np.isfinite(staged_s), np.ceil(staged_s * 4e3) / 4e3, np.inf)}
        if counts.sum() > self.max_tokens:
            return self.planner(counts, self.resident[layer], self.latency, layer=layer, **staged)
        key = (layer, counts.tobytes(), staged["staged_s"].tobytes() if staged else None)
        plan = self._plans.get(key)
        if plan is None:
            if len(self._plans) >= self.max_plans:
                self._plans.clear()
            plan = self._plans[key] = self.planner(counts, self.resident[layer], self.latency, layer=layer,
                                                    **staged)
        return plan
