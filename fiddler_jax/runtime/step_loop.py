"""One forward pass of the hybrid engine: embed -> per layer one of three steps -> head. It owns the residual.

For each layer:
  * fused: every expert of the layer is resident (or the layer is a dense MLP) -- attention and MLP in one
    jitted call, no host round trip;
  * streamed: the step's plan is known before its routing (:mod:`fiddler_jax.runtime.lanes.streamed`) --
    attention with the CPU lane's begin, the resident mix, then the CPU lane's end are queued as device work, no
    sync: the host runs the offloaded experts while the GPU runs the resident ones;
  * synced: attention and the router run (:mod:`fiddler_jax.runtime.segments`), the resident experts' mix is
    queued at once with the shared expert's output as its base (it needs the routing, not a plan, so its
    dispatch overlaps the segment's run), the step's
    one sync brings the counts and the routing to the host (:mod:`fiddler_jax.runtime.routing_sync`), the plan
    comes from the memo (:class:`~fiddler_jax.runtime.planning.PlanMemo`) or from behind the dynamic cache, the
    executor runs it over the lanes (:mod:`fiddler_jax.runtime.executor`) and the step's record joins the trace.
The lanes' outputs join the residual at the start of the next jitted call. A pass whose every layer is fused or
streamed runs as one program instead (:mod:`fiddler_jax.runtime.token_program`; ``token_program=False``: the
per-layer dispatches above).
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from fiddler_jax.runtime import routing_sync
from fiddler_jax.runtime.executor import Executor
from fiddler_jax.runtime.lanes.streamed import StreamedLane
from fiddler_jax.runtime.planning import Plan
from fiddler_jax.runtime.segments import ModelSegments
from fiddler_jax.runtime.token_program import token_program
from fiddler_jax.runtime.trace import StepRecord, Trace


class StepLoop:
    """The forward pass over an engine's segments and lanes (module docstring). ``plan``: ``plan(counts, layer,
    staged_s=None) -> Plan`` (the memo, or the dynamic cache's planning)."""

    def __init__(self, config, segments: ModelSegments, resident: np.ndarray, device: jax.Device,
                 executor: Executor, streamed: StreamedLane, plan, trace: Trace, token_program: bool = True):
        self.config, self.segments, self.resident, self.device = config, segments, resident, device
        self.executor, self.streamed, self.plan, self.trace = executor, streamed, plan, trace
        self.all_resident = [bool(row.all()) for row in resident]
        self.token_program = token_program
        self._programs: dict[tuple, tuple] = {}  # the layers' table ids (None: fused) -> the program's arguments

    def forward(self, tokens, cache, start: int, *, last_only: bool = False):
        """Logits [B, T, V] float32 of ``tokens`` at absolute positions start.. ([B, V] of the last position with
        ``last_only``), and the updated KV cache."""
        start = jnp.int32(start)
        self.executor.pcie.pool.clear()  # copies left by a forward pass that raised
        rows = math.prod(np.shape(tokens))
        program = self.program_for(rows)
        if program is not None:
            return self._run_program(program, tokens, cache, start, last_only)
        pending = (self.segments.embed(jax.device_put(tokens, self.device)),)
        self._queued = pending
        try:
            pending, new_cache = self._layers(pending, cache, start, rows)
        except BaseException:
            # a streamed step may have begun without its end queued: once the pieces queued so far have run
            # (their begins and ends reached the device), forget the open calls
            try:
                jax.block_until_ready(self._queued)
            except Exception:  # noqa: BLE001 - the error being raised is the one that matters
                pass
            self.streamed.abandon()
            raise
        # the streamed steps run so far join the trace (and a streamed call's error surfaces) while the device works
        # through this pass, not before its first dispatch
        self.drain()
        logits = self.segments.head(pending, last_only)
        self.executor.cpu.settle()  # the CPU lane's output copies have landed; no GPU memory held between passes
        return logits, tuple(new_cache)

    def program_for(self, rows: int):
        """(streamed layers, resident mixes, residents, table ids on the device) when a pass of ``rows`` tokens runs
        as one program -- every layer fused or streamed (asked of the streamed lane each pass, as the per-layer
        path does), the CPU lane begun before the mix -- else None."""
        if not (self.token_program and self.streamed.overlap):
            return None
        tables = []
        for layer, fused in enumerate(self.all_resident):
            found = None if fused else self.streamed.tables_id(layer, rows)
            if not fused and found is None:
                return None
            tables.append(found)
        key = tuple(tables)
        if key not in self._programs:
            streamed = tuple(t is not None for t in tables)
            residents = [self.executor.gpu.resident_arrays(layer) if s else None for layer, s in enumerate(streamed)]
            ids = jax.device_put(np.asarray([t or 0 for t in tables], np.int32), self.device)
            self._programs[key] = (streamed, tuple(r is not None for r in residents), residents, ids)
        return self._programs[key]

    def _run_program(self, program, tokens, cache, start, last_only: bool):
        """The pass as one program (module docstring); the streamed calls' records join the trace after it is
        queued."""
        streamed, mixes, residents, ids = program
        seg = self.segments
        run = token_program(tuple(part.key for part in seg.layers), seg.embed_part.key, seg.norm_part.key,
                            None if seg.head_part is None else seg.head_part.key, streamed, mixes, last_only)
        try:
            logits, new_cache = run(seg.embed_part.leaves, seg.norm_part.leaves,
                                    None if seg.head_part is None else seg.head_part.leaves,
                                    [part.leaves for part in seg.layers], tuple(cache),
                                    jax.device_put(tokens, self.device), start, residents, ids)
        except BaseException:
            self.streamed.abandon()  # a program that failed to run may have begun calls no end followed
            raise
        self.drain()
        return logits, tuple(new_cache)

    def _layers(self, pending, cache, start, rows: int):
        prefetching = self.executor.prefetch > 0
        new_cache = []
        for layer, kv in enumerate(cache):
            if self.all_resident[layer]:
                x, kv = self.segments.fused_layer(layer, pending, kv, start)
                pending = (x,)
            elif (tables := self.streamed.tables_id(layer, rows)) is not None:
                if self.streamed.overlap:
                    h, moe_in, routing, shared, ticket, kv = self.segments.attention_and_cpu_begin(
                        layer, pending, kv, start, self.streamed.id_on_device(tables))
                    self.streamed.open.append(ticket)
                    resident = self.executor.gpu.resident_mix(layer, moe_in, routing, shared)
                    pending = (h, resident, self.streamed.end(ticket, moe_in.shape))
                else:
                    h, moe_in, routing, shared, _, kv = self.segments.attention_and_router(layer, pending, kv, start,
                                                                                           prefetching)
                    pending = (h, self.executor.gpu.resident_mix(layer, moe_in, routing, shared),
                               self.streamed.mix(moe_in, routing, tables))
            else:
                h, moe_in, routing, shared, sync, kv = self.segments.attention_and_router(layer, pending, kv, start,
                                                                                          prefetching)
                pending = (h,) + self._synced_moe(layer, moe_in, routing, shared, sync, prefetching)
            new_cache.append(kv)
            self._queued = pending
        return pending, new_cache

    def _synced_moe(self, layer: int, moe_in, routing, shared, sync, predicts: bool):
        clock = self.trace.now
        resident = (clock(), self.executor.gpu.resident_mix(layer, moe_in, routing, shared))
        t_plan = clock()
        step = routing_sync.unpack(np.asarray(sync), num_experts=self.config.num_experts,
                                   top_k=self.config.num_experts_per_tok, moe_in_shape=moe_in.shape,
                                   moe_in_dtype=moe_in.dtype, predicted=predicts)
        E = len(step.counts)
        pool = self.executor.pcie.pool
        staged = pool.staged(layer, E)
        plan: Plan = self.plan(step.counts, layer, pool.left_s(layer, E) if staged.any() else None)
        spans = {"plan": (t_plan, clock())}
        # the next layer has experts a prefetch could copy, and will plan them (a streamed step uses no copy)
        next_offloads = (layer + 1 < len(self.all_resident) and not self.all_resident[layer + 1]
                         and self.streamed.tables_id(layer + 1, moe_in.shape[0]) is None)
        gpu_out, cpu_out = self.executor.run(layer, plan, step, moe_in, routing, resident, spans, next_offloads)
        self.trace.add(StepRecord(layer, step.counts, plan.lanes, plan.predicted_s, spans, staged, plan.staged))
        return gpu_out, cpu_out

    def drain(self) -> None:
        """Bring the streamed steps that have run into the trace (and raise a streamed call's error)."""
        self.streamed.drain(self.trace, self.config.num_experts)
