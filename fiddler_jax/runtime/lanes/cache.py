"""The dynamic cache lane: ``slots`` GPU expert buffers per layer that keep copied experts for later steps, and
which expert sits in which slot (its state, :class:`~fiddler_jax.runtime.planning.CacheStates`; the LRU rule is
:mod:`fiddler_jax.runtime.planning.cache_policy`). It owns both: it plans a step behind the layer's cache, then
runs the hits from the buffers and writes the copies that the new state keeps into their slots, all of a step's
in one ``stage_copy`` call (after the hits were queued, so an evicted slot is read before it is overwritten).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from fiddler_jax.memory_kinds import DEVICE
from fiddler_jax.runtime.host_experts import HostExperts
from fiddler_jax.runtime.latency import LatencyModel
from fiddler_jax.runtime.planning import CacheStates, Plan
from fiddler_jax.runtime.segments import stack_mix, stage_copy


class DynamicCache:
    """The cache's buffers {"w1": [S, ffn, hidden], "w3", "w2"} per layer and its per-layer state."""

    def __init__(self, slots: int, num_layers: int, hidden: int, ffn: int, dtype, host: HostExperts):
        self.slots, self.host = int(slots), host
        shapes = {"w1": (slots, ffn, hidden), "w3": (slots, ffn, hidden), "w2": (slots, hidden, ffn)}
        self.buffers = [{k: jnp.zeros(s, dtype) for k, s in shapes.items()} for _ in range(num_layers)]
        self._target = jax.sharding.SingleDeviceSharding(jax.devices()[0], memory_kind=DEVICE)
        self.states = CacheStates(slots)
        self._before: dict[int, tuple[int, ...]] = {}  # layer -> the slots' experts before the step's plan

    def plan(self, planner, counts, resident, latency: LatencyModel, layer: int) -> Plan:
        """The planner's plan with the layer's cached experts counted as resident; moves the layer's state on."""
        self._before[layer] = self.states.get(layer).experts
        return self.states.plan(planner, counts, resident, latency, layer)

    def run(self, layer: int, moe_in, routing, plan: Plan, gpu_out, clock, spans: dict):
        """Queue the step's hits and its copies into the cache; returns the GPU sum and the copies left for the
        staging slots (those the new state does not keep). Sets ``spans["pcie"]``'s start when it copies."""
        hits = np.full(len(plan.lanes), -1, np.int32)
        for slot, e in enumerate(self._before.pop(layer, ())):
            if e >= 0 and plan.cached[e]:
                hits[e] = slot
        if (hits >= 0).any():
            gpu_out = gpu_out + self._mix(layer, moe_in, routing, hits)
        after = self.states.get(layer).experts
        into_cache = [(after.index(e), e) for e in plan.transfer_order.tolist() if e in after]
        if into_cache:
            t_copy = clock()
            placed = np.full(len(plan.lanes), -1, np.int32)
            slots = np.asarray([slot for slot, _ in into_cache], np.int32)
            self.buffers[layer], _ = stage_copy(self.buffers[layer], slots,
                                                tuple(self.host.arrays(layer, e) for _, e in into_cache),
                                                target=self._target)
            for slot, e in into_cache:
                placed[e] = slot
            gpu_out = gpu_out + self._mix(layer, moe_in, routing, placed)
            spans["pcie"] = (t_copy, t_copy)  # the end is set when the copies have landed
        cached = {e for _, e in into_cache}
        return gpu_out, np.asarray([e for e in plan.transfer_order.tolist() if e not in cached], np.int32)

    def wait(self, layer: int) -> None:
        jax.block_until_ready(self.buffers[layer])

    def reset(self) -> None:
        """Forget what the slots hold (a new planner over the same buffers starts cold)."""
        self.states.reset()
        self._before.clear()

    def _mix(self, layer: int, moe_in, routing, slot_of: np.ndarray):
        b = self.buffers[layer]
        return stack_mix(moe_in, routing, jnp.asarray(slot_of), b["w1"], b["w3"], b["w2"])
