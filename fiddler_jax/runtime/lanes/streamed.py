"""The streamed CPU lane: layer steps whose plan no routing can change run with no host sync.

Which steps qualify is pure planning (:mod:`fiddler_jax.runtime.planning.streamed_steps`, asked once per (layer,
tokens)): the C++ kernel on bfloat16 host experts, no dynamic cache, a layer of at most ``STREAMED_MAX_EXPERTS``
(256) experts, and every count vector's plan puts every active offloaded expert on the CPU -- decided on one count
vector per symmetry class, for steps of at most ``DEFAULT_LIMIT`` classes, or proved from the planner's rule for
any number of tokens (``all_cpu_by_bound``: cpu_only always), the planner told the step is
streamable (an all-CPU plan skips the sync, so a copy must save more than the sync). Such a step queues the resident mix and
the CPU lane as a custom call the device's stream runs by itself (:mod:`fiddler_jax.kernels.streamed_lane`), so
the host queues whole tokens ahead.

The lane registers each layer's host experts with the kernel library once (the registrations live as long as
the host experts and are shared by every engine over them) and turns the calls' records into trace records
(:meth:`StreamedLane.drain`): the counts, the plan's lanes and the CPU span as the host function saw it. A host
function's error is raised at the next drain.
"""
from __future__ import annotations

import weakref

import jax
import numpy as np

from fiddler_jax.runtime.host_experts import HostExperts
from fiddler_jax.runtime.planning.streamed_steps import all_cpu_for_any_routing
from fiddler_jax.runtime.trace import StepRecord, Trace


class StreamedRegistrations:
    """Layer -> registered tables id for one set of host experts; unregistered when the host experts are freed."""

    def __init__(self, host: HostExperts, device: jax.Device):
        self.host, self.device = host, device
        self.ids: dict[int, int] = {}

    def id_of(self, layer: int) -> int:
        if layer not in self.ids:
            from fiddler_jax.kernels import streamed_lane

            if not self.ids:
                weakref.finalize(self.host, streamed_lane.unregister_layers, self.ids.values())
            self.ids[layer] = streamed_lane.register_layer(self.host.kernel_tables(layer), self.device)
        return self.ids[layer]


class StreamedLane:
    """Qualification per (layer, tokens), the custom call, and the drain of its records (module docstring).
    ``plan_for(counts, layer, streamable=...)``: the engine's (memoised) planner, asked with ``streamable=True``
    (an all-CPU plan would stream, so it skips the sync); ``overlap``: the step loop begins the CPU lane before the
    resident mix and ends it after (False: :meth:`mix`, one call after the mix); ``enabled``: False turns the lane
    off (every step syncs and plans, the ablation)."""

    def __init__(self, registrations: StreamedRegistrations, resident: np.ndarray, top_k: int, plan_for,
                 enabled: bool, eligible: bool, proved=None, overlap: bool = True):
        self.registrations, self.resident, self.top_k, self.overlap = registrations, resident, top_k, overlap
        self.plan_for, self.enabled, self.eligible = plan_for, enabled, eligible
        self.proved = proved  # (resident row, tokens) -> True when the planner's rule proves every plan all-CPU
        self.qualifies: dict[tuple[int, int], bool] = {}  # (layer, tokens) -> the step takes the streamed lane
        self.open: list = []  # the tickets of steps begun whose end is not queued yet
        self._ids_on_device: dict[int, jax.Array] = {}
        self.last_timed = None  # (layer, output landed on the trace clock) of the last timed record drained

    def tables_id(self, layer: int, rows: int) -> int | None:
        """The registered tables id when this layer step of ``rows`` tokens takes the streamed lane, else None."""
        key = (layer, rows)
        ok = self.qualifies.get(key)
        if not self.enabled:
            return None
        if ok is None:
            ok = self.qualifies[key] = (
                self.eligible and self.fits(layer)
                and ((self.proved is not None and self.proved(self.resident[layer], rows))
                     or all_cpu_for_any_routing(lambda counts: self.plan_for(counts, layer, streamable=True),
                                                self.resident[layer], rows, self.top_k)))
        if not ok:
            return None
        return self.registrations.id_of(layer)

    def fits(self, layer: int) -> bool:
        """Whether the layer's host experts can be registered: kernel tables, and no more experts than the
        records count."""
        from fiddler_jax.kernels.streamed_lane import STREAMED_MAX_EXPERTS

        tables = self.registrations.host.kernel_tables(layer)
        return tables is not None and tables.num_experts <= STREAMED_MAX_EXPERTS

    @staticmethod
    def mix(moe_in, routing, tables: int):
        """The step's CPU share as one queued call (begin and end back to back: ``streamed_overlap`` off)."""
        from fiddler_jax.kernels.streamed_lane import streamed_cpu_mix

        return streamed_cpu_mix(moe_in, routing.experts, routing.weights, tables=tables)

    def id_on_device(self, tables: int):
        """A registered layer's id as an int32 scalar on the device, made once (begin takes it as data: no
        host-to-device copy per step)."""
        found = self._ids_on_device.get(tables)
        if found is None:
            found = self._ids_on_device[tables] = jax.device_put(np.int32(tables), self.registrations.device)
        return found

    def end(self, ticket, shape):
        """The CPU share [N, hidden] float32 of the step begun as ``ticket`` (queued device work; the step loop
        keeps the begun steps' tickets in ``open`` until their end is queued)."""
        from fiddler_jax.kernels import streamed_lane

        out = streamed_lane.end(ticket, *shape)
        self.open = [t for t in self.open if t is not ticket]
        return out

    def abandon(self) -> None:
        """After a forward pass raised: forget the begun calls whose end was not queued, once they have run (a
        dispatched begin may not have reached the device yet). Asks the kernel library even when no ticket is
        known here (a begin can open a call and its program still fail, or an interrupt land before the ticket is
        kept)."""
        from fiddler_jax.kernels import streamed_lane

        for ticket in self.open:
            try:
                ticket.block_until_ready()
            except Exception:  # noqa: BLE001 - a begin that failed opened nothing
                pass
        self.open.clear()
        if self.registrations.ids:
            streamed_lane.abandon()

    def drain(self, trace: Trace, num_experts: int) -> None:
        """Raise the first error of a streamed call, and add a trace record for each streamed call that has run:
        its ``cpu`` span (the host's run of the experts) and, for a timed CUDA call
        (:func:`fiddler_jax.kernels.streamed_lane.set_timing`), its GPU spans from events on the stream:
        ``attention`` (the previous layer's CPU output landed -> this layer's CPU inputs ready: attention and
        router; only after a streamed step of the layer before), ``gpu`` (inputs copied to the host -> the end
        reached: the resident experts' mix, run beside the CPU) and ``cpu_wait`` (the stream held for the CPU
        lane's output and its copy back)."""
        ids = self.registrations.ids
        if not ids:
            return
        from fiddler_jax.kernels import streamed_lane

        streamed_lane.raise_pending_error()
        layer_of = {tid: layer for layer, tid in ids.items()}
        while True:
            records, _ = streamed_lane.drain_records(256)
            for r in records:
                layer = layer_of.get(r["tables"])
                if layer is None:
                    continue
                counts = r["counts"][:num_experts].astype(np.int32)  # the layer's experts
                plan = self.plan_for(counts, layer, streamable=True)
                spans = {"cpu": (r["start"] - trace.t0, r["end"] - trace.t0)}
                if r["gpu"] is not None:
                    before, copied, wait, landed = (t - trace.t0 for t in r["gpu"])
                    last = self.last_timed
                    if last is not None and last[0] == layer - 1 and last[1] <= before:
                        spans["attention"] = (last[1], before)
                    spans["gpu"], spans["cpu_wait"] = (copied, wait), (wait, landed)
                    self.last_timed = (layer, landed)
                trace.add(StepRecord(layer, counts, plan.lanes, plan.predicted_s, spans))
            if len(records) < 256:
                return
