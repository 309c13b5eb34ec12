"""The planning policies: for one layer step, which lane runs each expert -- pure functions of (token counts,
GPU residency, latency model), outside jit, testable without JAX. Only active (s_e > 0) experts that are not on
the GPU get a choice; resident active experts are ``GPU``. Costs: :mod:`.cost`.

  fiddler          Algorithm 1: TRANSFER iff transfer_s + gpu(s_e) < cpu(s_e), else CPU; beyond
                   ``max_transfers`` keep the largest savings (ties: earlier in copy order). Sequential cost
                   (``concurrent=True`` for ablation).
  fiddler_overlap  minimises the concurrent makespan over CPU/TRANSFER assignments with at most ``max_transfers``
                   copies: exhaustively for up to ``exact_limit`` candidates, else over the prefixes of the copy
                   order (largest counts first); Algorithm 1's assignment is always a candidate, so its makespan
                   never exceeds ``fiddler``'s. Ties go to fewer copies. On a streamable step (``streamable``:
                   an all-CPU plan would run on the streamed lane, with no sync) the assignments that copy
                   nothing do not pay ``sync_s``, so a copy must save more than the sync it brings back.
                   Plans with prefetched copies
                   (``staged_s``): a staged active expert is a candidate like the others whose GPU option needs no
                   new copy; a copy that lands too late to beat the CPU is left unused.
  cpu_only         llama.cpp-style: every non-resident expert on the CPU.
  transfer         DeepSpeed/accelerate-style: copy every non-resident expert; more copies than staging slots
                   reuse the slots, and the makespan counts the waits.
  gpu_only         every active expert must be resident; otherwise a PlannerError naming the fix.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Optional

import numpy as np

from fiddler_jax.runtime.latency import LatencyModel
from fiddler_jax.runtime.planning.cost import StepCosts, check_slots, gpu_finish, plan_of, step_costs
from fiddler_jax.runtime.planning.plan import Plan, PlannerError

EXACT_LIMIT = 10  # exhaustive search up to this many candidate experts (2**10 assignments)
DEFAULT_STAGING_SLOTS = 2


def fiddler_choice(step: StepCosts, cap: int) -> np.ndarray:
    """Algorithm 1's transfers: candidates where copying and computing on the GPU beats the CPU, largest saving
    first when more want it than ``cap`` allows; equal savings go to the earlier candidate in copy order (longest
    GPU time, larger count, lower id), so that which experts are chosen depends on their counts and ids only
    through that order (streamed_steps and the memo rely on it)."""
    ids = step.candidates[~step.staged[step.candidates]]  # copy order
    saving = step.cpu_s[ids] - (step.latency.transfer_s + step.gpu_s[ids])
    wants = saving > 0
    wanted = ids[wants][np.argsort(-saving[wants], kind="stable")][:cap]
    transfer = np.zeros(len(step.counts), bool)
    transfer[wanted] = True
    return transfer


def plan_fiddler(counts, on_gpu, latency: LatencyModel, *, staging_slots: int = DEFAULT_STAGING_SLOTS,
                 max_transfers: Optional[int] = None, concurrent: bool = False, streamable: bool = False) -> Plan:
    """The paper's Algorithm 1 (see the module docstring). ``streamable`` changes only the prediction of a
    concurrent plan that copies nothing (no sync): the choice is made expert by expert."""
    step = step_costs(counts, on_gpu, latency)
    transfer = fiddler_choice(step, check_slots(staging_slots, max_transfers))
    return plan_of("fiddler", step, transfer, int(staging_slots), concurrent, streamable)


def plan_fiddler_overlap(counts, on_gpu, latency: LatencyModel, *, staging_slots: int = DEFAULT_STAGING_SLOTS,
                         max_transfers: Optional[int] = None, exact_limit: int = EXACT_LIMIT,
                         staged_s=None, streamable: bool = False) -> Plan:
    """The assignment with the smallest concurrent makespan (see the module docstring); ``staged_s``: landing
    times of prefetched copies; ``streamable``: an all-CPU plan of this step skips the sync (module docstring)."""
    step = step_costs(counts, on_gpu, latency, staged_s)
    cap = check_slots(staging_slots, max_transfers)
    if not step.free_slots(staging_slots):  # the staged copies hold every slot
        cap = 0
    if not 0 <= int(exact_limit) <= 16:
        raise PlannerError(f"exact_limit must be in 0..16 (2**exact_limit assignments are searched); got {exact_limit}")
    ids = step.candidates
    n = len(ids)
    if n == 0:
        return plan_of("fiddler_overlap", step, np.zeros(len(step.counts), bool), int(staging_slots), True,
                       streamable)
    if n <= exact_limit:  # every assignment, fewest copies first
        chosen = ((np.arange(2 ** n)[:, None] >> np.arange(n)) & 1).astype(bool)
    else:  # use the staged copies, and copy the first k other candidates in copy order (largest counts), k = 0..n
        staged = step.staged[ids]
        chosen = np.tri(n + 1, n, -1, dtype=bool) | staged
    chosen = np.concatenate([chosen, (fiddler_choice(step, cap) | step.staged)[ids][None]])
    copies = chosen & ~step.staged[ids]
    chosen = chosen[copies.sum(1) <= cap]
    chosen = chosen[np.argsort(chosen.sum(1), kind="stable")]
    cpu_s = (~chosen * step.cpu_s[ids]).sum(1)
    resident_s = float(step.gpu_s[step.active & step.on_gpu].sum())
    n_staged = int(step.staged[ids].sum())
    makespan = np.maximum(cpu_s, gpu_finish(resident_s, step.gpu_s[ids], chosen, latency.copy_s(cpu_s > 0),
                                             step.free_slots(staging_slots), step.staged_s[ids[:n_staged]],
                                             step.pcie_backlog_s))
    if streamable:  # the assignments that copy nothing and use no staged copy run without the sync
        makespan = makespan + np.where(chosen.any(1), latency.sync_s, 0.0)
    best = chosen[np.flatnonzero(makespan <= makespan.min() + 1e-12)[0]]
    transfer = np.zeros(len(step.counts), bool)
    transfer[ids[best]] = True
    return plan_of("fiddler_overlap", step, transfer, int(staging_slots), True, streamable)


def plan_cpu_only(counts, on_gpu, latency: LatencyModel, *, concurrent: bool = True,
                  streamable: bool = False) -> Plan:
    """Every active expert that is not on the GPU runs on the CPU (on a ``streamable`` step, predicted without
    the sync)."""
    step = step_costs(counts, on_gpu, latency)
    return plan_of("cpu_only", step, np.zeros(len(step.counts), bool), 1, concurrent, streamable)


def plan_transfer(counts, on_gpu, latency: LatencyModel, *, staging_slots: int = DEFAULT_STAGING_SLOTS,
                  concurrent: bool = True) -> Plan:
    """Every active expert that is not on the GPU is copied, however many copies share the staging slots."""
    step = step_costs(counts, on_gpu, latency)
    check_slots(staging_slots, None)
    return plan_of("transfer", step, step.active & ~step.on_gpu, int(staging_slots), concurrent)


def plan_gpu_only(counts, on_gpu, latency: LatencyModel) -> Plan:
    """Every active expert on the GPU; a PlannerError when one is not there."""
    step = step_costs(counts, on_gpu, latency)
    missing = np.flatnonzero(step.active & ~step.on_gpu)
    if missing.size:
        raise PlannerError(f"planner gpu_only: experts {missing.tolist()} have tokens but are not on the GPU; "
                           f"raise gpu_budget until every expert is resident, or choose a hybrid planner "
                           f"(planner=fiddler_overlap)")
    return plan_of("gpu_only", step, np.zeros(len(step.counts), bool), 1, True)


POLICIES: dict[str, Callable[..., Plan]] = {
    "fiddler": plan_fiddler, "fiddler_overlap": plan_fiddler_overlap, "cpu_only": plan_cpu_only,
    "transfer": plan_transfer, "gpu_only": plan_gpu_only,
}
