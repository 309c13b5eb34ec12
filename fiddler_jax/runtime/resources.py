"""What an engine's steps run on, built once and shared by every engine over the same weights
(``Engine.with_planner``): the device, the model and its jitted segments, the placement, the pinned host experts,
the PCIe lane's staging pool and the dynamic cache (the GPU memory placement reserved for them), and the host
experts' registrations with the streamed CPU lane, and the lock that runs one forward pass at a time over them:
every engine over these resources takes it for each call, so threads sharing an engine (or engines made by
``with_planner``) queue behind each other instead of corrupting the staging pool, the cache or the KV buffers.
"""
from __future__ import annotations

import dataclasses
import threading

import jax

from fiddler_jax.runtime.host_experts import HostExperts
from fiddler_jax.runtime.lanes.cache import DynamicCache
from fiddler_jax.runtime.lanes.pcie import StagingPool
from fiddler_jax.runtime.lanes.streamed import StreamedRegistrations
from fiddler_jax.runtime.placement import Placement
from fiddler_jax.runtime.segments import ModelSegments


@dataclasses.dataclass(frozen=True)
class EngineResources:
    model: object  # models.causal_lm.MoeForCausalLM with only the resident experts' weights on the device
    placement: Placement
    host: HostExperts
    device: jax.Device
    segments: ModelSegments
    staging: StagingPool  # at most ``staging_slots`` live copies of the PCIe lane
    cache: DynamicCache | None  # ``cache_slots`` buffers per layer, or None
    streamed: StreamedRegistrations
    lock: threading.RLock = dataclasses.field(default_factory=threading.RLock, compare=False)

    @classmethod
    def build(cls, model, host: HostExperts, placement: Placement, *, staging_slots: int, cache_slots: int,
              transfer_s: float) -> EngineResources:
        device = jax.devices()[0]
        cfg = model.config
        cache = DynamicCache(cache_slots, cfg.num_hidden_layers, cfg.hidden_size, cfg.moe_intermediate_size,
                             model.dtype, host) if cache_slots else None
        return cls(model, placement, host, device, ModelSegments(model),
                   StagingPool(host, device, staging_slots, transfer_s), cache, StreamedRegistrations(host, device))

    @property
    def config(self):
        return self.model.config

    @property
    def staging_slots(self) -> int:
        return self.staging.slots

    @property
    def cache_slots(self) -> int:
        return 0 if self.cache is None else self.cache.slots
