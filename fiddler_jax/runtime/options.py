"""Every engine knob that changes how a layer step runs but not what it computes: the CPU lane's backend and the
ablations of the lanes' transport. Frozen, filled from the ``kernel`` config group (``fiddler_jax/conf/kernel/``) by the
commands, or passed to ``Engine.from_pretrained(..., options=EngineOptions(...))``; nothing is read from the
environment. Every combination gives the same logits (tests assert it); only the time differs."""
from __future__ import annotations

import dataclasses

from fiddler_jax.errors import InvalidInputError

CPU_BACKENDS = ("kernel", "xla")


@dataclasses.dataclass(frozen=True)
class EngineOptions:
    """How the engine's lanes run (module docstring).

    ``cpu_backend``: "kernel" (our C++ kernel over the pinned experts) or "xla" (XLA's own CPU dot over the same
    weights: the ablation baseline). ``streamed_cpu_lane``: steps whose plan no routing can change skip the host
    sync and run the CPU lane as a custom call on the device's stream (False: every step syncs and plans).
    ``streamed_overlap``: such a step begins the CPU lane as soon as the router has run and ends it after the
    resident experts' mix, so the host and the GPU work at once (False: the mix, then the CPU lane as one call).
    ``token_program``: a pass whose every layer step is fused or streamed (single-token decode, typically) runs as
    one jitted program, not a dispatch or three per layer (:mod:`fiddler_jax.runtime.token_program`; False: the
    per-layer dispatches). ``pinned_activations``: large CPU-lane activations cross PCIe through pinned memory
    (False: pageable numpy).
    ``cpu_lane_thread``: the CPU lane always runs on its worker thread, so the kernel starts before the GPU
    calls are queued (False: decode steps run it on the calling thread after queuing the GPU work)."""

    cpu_backend: str = "kernel"
    streamed_cpu_lane: bool = True
    streamed_overlap: bool = True
    token_program: bool = True
    pinned_activations: bool = True
    cpu_lane_thread: bool = False

    def __post_init__(self):
        if self.cpu_backend not in CPU_BACKENDS:
            raise InvalidInputError(f"unknown cpu_backend {self.cpu_backend!r}; valid: {', '.join(CPU_BACKENDS)}")
        for name in ("streamed_cpu_lane", "streamed_overlap", "token_program", "pinned_activations",
                     "cpu_lane_thread"):
            if not isinstance(getattr(self, name), bool):
                raise InvalidInputError(f"EngineOptions.{name} must be true or false; got {getattr(self, name)!r}")

    def replace(self, **changes) -> EngineOptions:
        return dataclasses.replace(self, **changes)
