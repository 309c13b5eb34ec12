"""Typed schemas of the commands' config groups (``fiddler_jax/conf``). Hydra merges every group file into these
dataclasses, so a misspelt key or a wrong type fails at composition with Hydra's own message, and an unknown
group option lists the valid ones.

The ``model``, ``placement``, ``planner`` and ``kernel`` groups have one schema each, shared by ``generate`` and
``bench`` (and the engine they describe is built in one place, :func:`fiddler_jax.experiments.build.build_engine`);
``hardware`` and ``scenario`` are the benchmark's. :class:`ModelShape` is the size of a model made from scratch
(``init-random``, ``train-tiny``)."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Optional

from hydra.core.config_store import ConfigStore


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
class PlannerConfig:
    """The ``planner`` group (one flat schema; ``None`` = the planner's default)."""

    name: str = "fiddler_overlap"
    staging_slots: Optional[int] = None
    max_transfers: Optional[int] = None
    cache_slots: Optional[int] = None
    concurrent: Optional[bool] = None
    exact_limit: Optional[int] = None
    prefetch: Optional[int] = None


@dataclass
class KernelSchema:
    path: str = "auto"  # auto | avx512_bf16 | amx | avx2 | generic | xla
    spin_us: int = 50  # the kernel pool's spin before its workers sleep (kernels.set_pool; an ablation knob)
    pinned_activations: bool = True  # large CPU-lane activations cross PCIe through pinned memory
    #                                  (EngineOptions.pinned_activations; false: pageable numpy, an ablation)
    streamed_lane: bool = True  # steps whose plan no routing can change skip the host sync
    #                             (EngineOptions.streamed_cpu_lane; false: every step syncs and plans, an ablation)


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
class ModelShape:
    """A Mixtral's size as ``config.json`` keys, for a model made from scratch. null leaves a key to config.json's
    default (``head_dim`` = hidden_size / heads, ``rope_theta`` = 1e6) or, for ``vocab_size`` in train-tiny, to
    the tokenizer's (``train.vocab_size``)."""

    vocab_size: Optional[int] = None
    hidden_size: int = 128
    intermediate_size: int = 256
    num_hidden_layers: int = 4
    num_attention_heads: int = 8
    num_key_value_heads: int = 2
    head_dim: Optional[int] = None
    num_local_experts: int = 8
    num_experts_per_tok: int = 2
    max_position_embeddings: int = 2048
    rope_theta: Optional[float] = None
    sliding_window: Optional[int] = None
    tie_word_embeddings: bool = False


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


def _planner_options(planner) -> dict:
    """The planner group's options that are set (not None), without its name."""
    items = dataclasses.asdict(planner) if dataclasses.is_dataclass(planner) else dict(planner)
    return {k: v for k, v in items.items() if k != "name" and v is not None}


def planner_kwargs(planner) -> dict:
    """The ``planner`` group as the engine's keyword arguments (``Engine.from_pretrained``, ``from_random``,
    ``with_planner``): the name, the GPU buffers it needs (staging slots: the group's or the default; dynamic-cache
    slots: the group's or none) and the options it sets (unset options keep the planner's defaults)."""
    from fiddler_jax.runtime.planning import DEFAULT_STAGING_SLOTS

    options = _planner_options(planner)
    options.pop("staging_slots", None)
    options.pop("cache_slots", None)
    return dict(planner=planner.name, staging_slots=planner.staging_slots or DEFAULT_STAGING_SLOTS,
                cache_slots=planner.cache_slots or 0, **options)


def planner_from_config(planner):
    """The planner the group describes (``runtime.planning.get_planner``), without an engine: a
    ``PlannerConfig`` or any mapping with its keys (e.g. a Hydra DictConfig)."""
    from fiddler_jax.runtime.planning import get_planner

    name = planner.name if dataclasses.is_dataclass(planner) else dict(planner)["name"]
    return get_planner(name, **_planner_options(planner))
