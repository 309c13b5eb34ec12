"""Plans remembered per canonical step: the counts relabeled into a canonical order of the experts, with the
prefetched copies' landing times.

A planner is a pure function of the counts, the layer's residency, the latency model and the staged copies'
landing times, and the residency and the latency model are fixed for an engine. It is also equivariant under
relabelings of the experts that keep residency (:mod:`.streamed_steps` states why): the plan of relabeled inputs
is the plan of the originals, relabeled. The memo therefore plans each step in a canonical labeling and relabels
the plan back, so steps that differ only by which experts carry which counts share one plan -- with 128 experts
raw count vectors almost never repeat, their canonical forms often do.

Canonical labeling of a step (``src[j]``: the real expert at canonical position j): the layer's R resident
experts take positions 0..R-1 in increasing count, the offloaded ones positions R..E-1 by increasing landing time
(not staged: last) and, among those not staged, increasing count; remaining ties keep id order. The planner sees
the canonical counts ``counts[src]``, landing times ``staged_s[src]`` and the mask of R leading resident experts;
its plan's per-expert arrays (``counts``, ``lanes``, ``cached``, ``staged``) are scattered back through ``src`` and
its ``transfer_order`` mapped through it. Because ties keep id order, the canonical labeling keeps every order
the planners break ties by (copy order among equal counts; staged copies by landing time, then id), so the
relabeled plan is the plan the planner gives the real step -- not only one as good (tests/test_planners.py). The
key is (R, canonical counts, canonical landing times, streamable): layers with equally many resident experts share plans, so
``planner`` must not depend on ``layer`` (the registry's planners do not).

Landing times are rounded up to quarter milliseconds so that a key repeats; steps with more than ``max_tokens``
routed tokens, and counts the planner would refuse, are planned afresh (their keys rarely repeat).
"""
from __future__ import annotations

import dataclasses

import numpy as np

from fiddler_jax.runtime.latency import LatencyModel
from fiddler_jax.runtime.planning.plan import Plan

MEMO_MAX_TOKENS = 64
MEMO_MAX_PLANS = 1 << 14


def canonical_order(counts: np.ndarray, resident: np.ndarray, staged_s: np.ndarray | None = None) -> np.ndarray:
    """``src`` (int64 [E]) of the module docstring's canonical labeling: resident experts by count, then
    offloaded ones by landing time (``staged_s``, inf: not staged) and, when not staged, count; ties by id."""
    counts, resident = np.asarray(counts, np.int64), np.asarray(resident, bool)
    if staged_s is None:  # one stable sort: resident experts' counts, then offloaded ones' shifted past them
        return np.argsort(counts + ~resident * (int(counts.max(initial=0)) + 1), kind="stable")
    on, off = np.flatnonzero(resident), np.flatnonzero(~resident)
    on = on[np.argsort(counts[on], kind="stable")]
    lands = np.asarray(staged_s, np.float64)[off]
    off = off[np.lexsort((off, np.where(np.isfinite(lands), 0, counts[off]), lands))]
    return np.concatenate([on, off])


def relabel(plan: Plan, src: np.ndarray) -> Plan:
    """``plan`` (made for the canonical step) for the real experts: canonical expert j is real expert ``src[j]``."""
    def back(a):
        out = np.empty_like(a)
        out[src] = a
        return out

    return dataclasses.replace(plan, counts=back(plan.counts), lanes=back(plan.lanes), cached=back(plan.cached),
                               staged=back(plan.staged), transfer_order=src[plan.transfer_order].astype(np.int32))


class PlanMemo:
    """``memo(counts, layer, staged_s=None, streamable=False) -> Plan``: the planner's plan for the layer's
    residency, remembered per canonical step (module docstring). ``resident``: bool [layers, E]."""

    def __init__(self, planner, resident: np.ndarray, latency: LatencyModel, max_tokens: int = MEMO_MAX_TOKENS,
                 max_plans: int = MEMO_MAX_PLANS):
        self.planner, self.resident, self.latency = planner, np.asarray(resident, bool), latency
        self.max_tokens, self.max_plans = max_tokens, max_plans
        self._plans: dict = {}
        self._masks: dict[int, np.ndarray] = {}  # R -> the canonical mask (R leading resident experts)

    def _plan(self, counts, resident, layer: int, staged_s, streamable: bool) -> Plan:
        extra = {} if staged_s is None else {"staged_s": staged_s}  # only planners that prefetch are given it
        if streamable:
            extra["streamable"] = True
        return self.planner(counts, resident, self.latency, layer=layer, **extra)

    def __call__(self, counts: np.ndarray, layer: int, staged_s: np.ndarray | None = None,
                 streamable: bool = False) -> Plan:
        resident = self.resident[layer]
        if staged_s is not None:
            staged_s = np.asarray(staged_s, np.float64)
            staged_s = np.where(np.isfinite(staged_s) & ~resident, np.ceil(np.maximum(staged_s, 0.0) * 4e3) / 4e3,
                                np.inf)
        counts = np.asarray(counts)
        if (counts.shape != resident.shape or counts.dtype.kind not in "iu" or counts.sum() > self.max_tokens
                or (counts < 0).any()):
            return self._plan(counts, resident, layer, staged_s, streamable)
        src = canonical_order(counts, resident, staged_s)
        canon = counts[src].astype(np.int32)
        canon_staged = None if staged_s is None else staged_s[src]
        on = int(resident.sum())
        key = (on, canon.tobytes(), None if canon_staged is None else canon_staged.tobytes(), bool(streamable))
        plan = self._plans.get(key)
        if plan is None:
            if len(self._plans) >= self.max_plans:
                self._plans.clear()
            mask = self._masks.get(on)
            if mask is None:
                mask = self._masks[on] = np.arange(len(resident)) < on
            plan = self._plans[key] = self._plan(canon, mask, layer, canon_staged, streamable)
        return relabel(plan, src)
