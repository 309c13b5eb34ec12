"""Prefetch: which experts of the next layer to start copying during this layer step, when this step leaves the
PCIe lane idle -- the next layer's predicted experts (its router applied to this layer's hidden state), most
predicted tokens first, that are not on the GPU, at most ``prefetch`` and at most the free staging slots. Pure.

Off by default (``DEFAULT_PREFETCH``): on the H100 machine the copies' DMA slows the CPU kernel by 18% (both read
the same DRAM), which ate the gain of the CPU-lane experts it moved to the GPU (decode at 24 GiB: 4.66 tok/s
with 1, 4.78 without; docs/notes/engine_lanes.md).
"""
from __future__ import annotations

import numpy as np

from fiddler_jax.runtime.latency import LatencyModel
from fiddler_jax.runtime.planning.plan import PlannerError

DEFAULT_PREFETCH = 0


def plan_prefetch(predicted_counts, on_gpu, staged, latency: LatencyModel, *, free_slots: int, prefetch: int,
                  step_s: float = 0.0, pcie_backlog_s: float = 0.0) -> np.ndarray:
    """The next layer's experts to start copying now (module docstring): int32 ids, most predicted tokens first
    (ties: lower id), only predicted (count > 0) ones not on the GPU and not already staged, at most
    min(prefetch, free_slots), and only copies that can still pay: the k-th lands after the lane's backlog and
    k copies, and must land within ``step_s`` (this step's predicted time, after which the next one plans) plus
    the CPU time of its predicted tokens (copies at ``transfer_busy_s``: they run beside this step's CPU lane) --
    later, the next step runs it on the CPU rather than wait, and a copy in the queue would only delay the copies
    behind it. The engine calls it only when this step's plan leaves the PCIe lane idle."""
    predicted_counts = np.asarray(predicted_counts)
    on_gpu, staged = np.asarray(on_gpu, bool), np.asarray(staged, bool)
    if not (predicted_counts.shape == on_gpu.shape == staged.shape) or predicted_counts.ndim != 1:
        raise PlannerError(f"plan_prefetch needs predicted counts, a GPU mask and a staged mask of one shape [E]; got "
                           f"{predicted_counts.shape}, {on_gpu.shape}, {staged.shape}")
    if int(prefetch) < 0:
        raise PlannerError(f"prefetch must be non-negative (experts copied ahead per layer step); got {prefetch}")
    ids = np.flatnonzero((predicted_counts > 0) & ~on_gpu & ~staged)
    ids = ids[np.lexsort((ids, -predicted_counts[ids]))][:max(min(int(prefetch), int(free_slots)), 0)]
    lands = pcie_backlog_s + latency.copy_beside_cpu_s * np.arange(1, len(ids) + 1)
    pays = lands <= step_s + latency.cpu(predicted_counts[ids])
    return ids[:int(np.argmin(pays)) if not pays.all() else len(ids)].astype(np.int32)


