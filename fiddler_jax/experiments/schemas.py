"""Typed schemas of the benchmark harness's config groups (``conf/bench.yaml`` and its groups). Hydra merges
every group file into these dataclasses, so a misspelt key or a wrong type fails at composition with Hydra's
own message, and an unknown group option lists the valid ones."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from hydra.core.config_store import ConfigStore

from fiddler_jax.runtime.planners import PlannerConfig


@dataclass
class ModelSchema:
    name: str = "tiny"
    path: Optional[str] = None  # HF folder; null = the bundled tiny model (unless random)
    dtype: str = "float32"
    random: bool = False  # seeded random weights in memory with `geometry` (no checkpoint)
    weight_seed: int = 0
    router_bias: float = 0.0
    geometry: Optional[dict[str, Any]] = None  # config.json keys of the random model


@dataclass
class PlacementSchema:
    policy: str = "popularity"
    resident_experts: Optional[int] = None
    profile: Optional[str] = None
    seed: int = 0


@dataclass
class HardwareSchema:
    name: str = "auto"
    gpu_budget: Optional[str] = None  # null = what this machine's GPU can hold


@dataclass
class ScenarioSchema:
    name: str = "decode"
    input_tokens: int = 128
    output_tokens: int = 128
    num_beams: int = 1
    length_penalty: float = 1.0
    early_stopping: bool = False


@dataclass
class KernelSchema:
    path: str = "auto"  # auto | avx512_bf16 | amx | avx2 | generic | xla
    spin_us: int = 50  # the kernel pool's spin before its workers sleep (kernels.set_pool; an ablation knob)
    pinned_activations: bool = True  # large CPU-lane activations cross PCIe through pinned memory
    #                                  (runtime/pinned_activations; false: the pageable numpy path, an ablation)
    streamed_lane: bool = True  # steps whose plan no routing can change skip the host sync (runtime/streamed_steps;
    #                             false: every step syncs and plans, an ablation)


@dataclass
class BenchConfig:
    model: ModelSchema = field(default_factory=ModelSchema)
    planner: PlannerConfig = field(default_factory=PlannerConfig)
    placement: PlacementSchema = field(default_factory=PlacementSchema)
    hardware: HardwareSchema = field(default_factory=HardwareSchema)
    scenario: ScenarioSchema = field(default_factory=ScenarioSchema)
    kernel: KernelSchema = field(default_factory=KernelSchema)
    baseline: Optional[str] = None
    repeats: int = 3
    warmup: int = 1
    warmup_tokens: Optional[int] = None
    prompts_file: Optional[str] = None
    latency: Optional[str] = None
    max_context: Optional[int] = None
    max_batch: Optional[int] = None
    trace: bool = False
    seed: int = 0


ConfigStore.instance().store(name="bench_schema", node=BenchConfig)
