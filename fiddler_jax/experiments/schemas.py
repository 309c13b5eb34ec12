"""Typed schemas of the commands' config groups (``fiddler_jax/conf``). Hydra merges every group file into these
dataclasses, so a misspelt key or a wrong type fails at composition with Hydra's own message, and an unknown
group option lists the valid ones.

The ``model``, ``placement``, ``planner`` and ``kernel`` groups have one schema each, shared by ``generate`` and
``bench`` (and the engine they describe is built in one place, :func:`fiddler_jax.experiments.build.build_engine`);
``hardware`` and ``scenario`` are the benchmark's. :class:`ModelShape` is the size of a model made from scratch
(``init-random``, ``train-tiny``)."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Optional

from omegaconf import OmegaConf

from hydra.core.config_store import ConfigStore

from fiddler_jax.errors import InvalidInputError


@dataclass
class ModelSchema:
    name: str = "tiny"
    path: Optional[str] = None  # HF folder; null = the bundled tiny model (unless random)
    dtype: str = "float32"
    random: bool = False  # seeded random weights in memory with `geometry` (no checkpoint)
    weight_seed: int = 0
    router_bias: float = 0.0
    geometry: Optional[dict[str, Any]] = None  # config.json keys of the random model
    expert_precision: str = "bf16"  # bf16 | int8 | int4: how the routed experts are held and computed
    int4_group: int = 64  # int4: inputs per scale (32, 64, 128)


@dataclass
class PlacementSchema:
    policy: str = "popularity"
    resident_experts: Optional[int] = None
    resident_fraction: Optional[float] = None
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
    sync_s: Any = None  # not the planner's option: the latency model's sync_s it plans with (seconds | measure)


@dataclass
class KernelSchema:
    path: str = "auto"  # auto | avx512_bf16 | amx | avx2 | generic | xla
    spin_us: int = 50  # the kernel pool's spin before its workers sleep (kernels.set_pool; an ablation knob)
    streamed_spin_us: Optional[int] = None  # its spin after a streamed-lane call (one per layer); null: spin_us
    threads: Optional[int] = None  # the kernel pool's threads; null: FIDDLER_KERNEL_THREADS, else physical cores
    pinned_activations: bool = True  # large CPU-lane activations cross PCIe through pinned memory
    #                                  (EngineOptions.pinned_activations; false: pageable numpy, an ablation)
    streamed_lane: bool = True  # steps whose plan no routing can change skip the host sync
    #                             (EngineOptions.streamed_cpu_lane; false: every step syncs and plans, an ablation)
    streamed_overlap: bool = True  # a streamed step's CPU lane runs beside its resident mix
    #                                (EngineOptions.streamed_overlap; false: after it, an ablation)
    token_program: bool = True  # a pass of only fused and streamed steps runs as one jitted program
    #                             (EngineOptions.token_program; false: per-layer dispatches, an ablation)


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
    batch_size: int = 1  # scenario=batch: independent prompts generated together
    input_spread: int = 0  # scenario=batch: prompt lengths drawn from input_tokens ± input_spread


@dataclass
class ModelShape:
    """A model's size as ``config.json`` keys, for a model made from scratch: ``model_type`` picks the family
    (mixtral | qwen3_moe | olmoe | qwen2_moe). null leaves a key to config.json's default (``head_dim`` =
    hidden_size / heads, ``rope_theta`` = 1e6; ``moe_intermediate_size`` is only read for the Qwen families, which
    require it: Mixtral's and OLMoE's experts are ``intermediate_size`` wide) or, for ``vocab_size`` in
    train-tiny, to the tokenizer's (``train.vocab_size``). The expert count is ``num_local_experts`` here for
    every family."""

    model_type: str = "mixtral"
    vocab_size: Optional[int] = None
    hidden_size: int = 128
    intermediate_size: int = 256
    moe_intermediate_size: Optional[int] = None
    num_hidden_layers: int = 4
    num_attention_heads: int = 8
    num_key_value_heads: int = 2
    head_dim: Optional[int] = None
    num_local_experts: int = 8
    num_experts_per_tok: int = 2
    norm_topk_prob: Optional[bool] = None
    decoder_sparse_step: Optional[int] = None
    mlp_only_layers: Optional[list[int]] = None
    shared_expert_intermediate_size: Optional[int] = None
    max_position_embeddings: int = 2048
    rope_theta: Optional[float] = None
    sliding_window: Optional[int] = None
    tie_word_embeddings: bool = False


def geometry_keys(geometry) -> dict:
    """A geometry (a ``ModelShape``, its DictConfig under Hydra, or a dict) as plain config.json keys: containers
    made plain lists and dicts, null keys dropped so that config.json's defaults apply."""
    if dataclasses.is_dataclass(geometry):
        geometry = dataclasses.asdict(geometry)
    elif OmegaConf.is_config(geometry):
        geometry = OmegaConf.to_container(geometry, resolve=True)
    return {k: v for k, v in dict(geometry).items() if v is not None}


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
    max_step_tokens: Optional[int] = None
    trace: bool = False
    seed: int = 0


ConfigStore.instance().store(name="bench_schema", node=BenchConfig)


def _planner_items(planner) -> dict:
    """The planner group's keys and values: a ``PlannerConfig`` or any mapping (e.g. a Hydra DictConfig)."""
    return dataclasses.asdict(planner) if dataclasses.is_dataclass(planner) else dict(planner)


def _planner_options(planner) -> dict:
    """The planner group's options that are set (not None), without its name and ``sync_s`` (a latency override,
    :func:`planner_sync_s`)."""
    return {k: v for k, v in _planner_items(planner).items() if k not in ("name", "sync_s") and v is not None}


def planner_sync_s(planner) -> float | str | None:
    """``planner.sync_s``: the seconds the planner charges a layer step that syncs with the host (the streamed
    lane's alternative), replacing the latency model's ``sync_s`` (calibrated as a tiny op's round trip, which
    leaves out the per-layer dispatches a synced step brings back); ``"measure"``: measured on the engine
    (:mod:`fiddler_jax.runtime.sync_penalty`); None = the latency model's. Checked: a finite non-negative number
    or ``measure``."""
    value = _planner_items(planner).get("sync_s")
    if value is None or value == "measure":
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < math.inf:
        raise InvalidInputError(f"planner.sync_s must be a finite non-negative number of seconds, measure or null; got "
                                f"{value!r}")
    return float(value)


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

    return get_planner(_planner_items(planner)["name"], **_planner_options(planner))


# -- help texts ------------------------------------------------------------------------------------------------
# `fiddler-jax <command> --help` (experiments.common.render_help) shows every option with what it does: the
# comment on the key in the command's YAML first, then the comment in the chosen group option's file, then these.

GROUP_HELP = {
    "model": "which weights (model.path=<HF folder> for a checkpoint of your own)",
    "placement": "which experts are GPU-resident (the hybrid engine only)",
    "planner": "how each layer step runs its offloaded experts: CPU lane, copy to the GPU, or both at once "
               "(the hybrid engine only)",
    "kernel": "the CPU lane's kernel (the hybrid engine only)",
    "hardware": "the GPU budget the engine is placed in",
    "scenario": "what is timed",
    "train": "the training recipe (geometry and optimisation)",
    "experiment": "a preset sweep reproducing a figure or an ablation (run with -m)",
    "table": "the jobs of one table of docs/benchmarks.md (its common overrides and one override list per job)",
}

OPTION_HELP = {
    "model.name": "the model option in use (set it with model=<option>)",
    "model.path": "HF Mixtral folder (config.json + safetensors)",
    "model.dtype": "weight and compute dtype: float32 | bfloat16",
    "model.random": "true: seeded random weights made in memory with model.geometry (no checkpoint)",
    "model.weight_seed": "seed of the random weights (model.random)",
    "model.router_bias": "random weights: > 0 skews routing towards some experts; 0 = near-uniform routing",
    "model.geometry": "the random model's config.json keys",
    "model.expert_precision": "the routed experts' precision: bf16 (as loaded) | int8 (per-row scales) | int4 "
                              "(group scales); quantised at load, offloaded experts held quantised",
    "model.int4_group": "int4: inputs per scale, 32 | 64 | 128",
    "placement.policy": "popularity (most-routed first by placement.profile) | first | random (set it with "
                        "placement=<option>)",
    "placement.resident_experts": "the number of GPU-resident experts; null = as many as the GPU budget holds",
    "placement.resident_fraction": "the share of the MoE layers' experts kept GPU-resident (0..1, rounded to whole "
                                   "experts; compares models of different expert counts at one budget fraction); "
                                   "null = resident_experts / the budget decides",
    "placement.profile": "routing profile file from `fiddler-jax profile` (placement=popularity); null = spread "
                         "order",
    "placement.seed": "seed of placement=random's shuffle",
    "planner.name": "the planner in use (set it with planner=<option>)",
    "planner.staging_slots": "GPU buffers for copied experts; null = 2",
    "planner.max_transfers": "copies per layer step; null = staging_slots",
    "planner.cache_slots": "> 0: a dynamic LRU cache of copied experts per layer on top of static placement; null or "
                           "0 = none",
    "planner.concurrent": "run the lanes at once (true) or one after another (false); null = the planner's default",
    "planner.exact_limit": "fiddler_overlap: exhaustive search up to this many candidate experts (2**10 "
                           "assignments), greedy beyond; null = 10",
    "planner.prefetch": "next-layer experts copied ahead per layer step; null = 0 (off)",
    "planner.sync_s": "seconds the planner charges a layer step that syncs with the host instead of streaming "
                      "(the latency model's calibrated sync_s is a tiny op's round trip); measure = the engine's own "
                      "synced-over-streamed step time (cpu_only decode both ways, once per engine and kernel "
                      "options); null = the latency model's",
    "kernel.path": "the CPU lane: auto | avx512_bf16 | amx | avx2 (our C++ kernel) | xla (XLA's CPU dot); set it "
                   "with kernel=<option>",
    "kernel.spin_us": "microseconds the kernel pool's workers spin before they sleep",
    "kernel.streamed_spin_us": "microseconds they spin after a streamed-lane call (the next layer's comes soon); "
                               "null = kernel.spin_us",
    "kernel.threads": "the CPU kernel's threads (fewer leave cores to the engine's Python and XLA threads); null = "
                      "FIDDLER_KERNEL_THREADS, else one per physical core",
    "kernel.pinned_activations": "large CPU-lane activations cross PCIe through pinned memory (false: pageable "
                                 "numpy, an ablation)",
    "kernel.streamed_lane": "decode steps whose plan no routing can change skip the host sync (false: every step "
                            "syncs and plans, an ablation)",
    "kernel.token_program": "a forward pass whose every layer step is fused or streamed (decode) runs as one jitted "
                            "program (false: a dispatch or three per layer, an ablation)",
    "kernel.streamed_overlap": "a streamed step's CPU lane runs beside its resident experts' mix on the GPU "
                               "(false: after it, an ablation)",
    "hardware.name": "the hardware option in use (set it with hardware=<option>)",
    "hardware.gpu_budget": "GPU memory the engine may use (XLA's allocator is capped at it); null = what this "
                           "machine's GPU can hold",
    "scenario.name": "the scenario in use (set it with scenario=<option>)",
    "scenario.input_tokens": "prompt tokens",
    "scenario.output_tokens": "new tokens generated",
    "scenario.num_beams": "beam width (1 = greedy)",
    "scenario.length_penalty": "beam search: exponent of the length normalisation (transformers' semantics)",
    "scenario.early_stopping": "beam search: stop when num_beams hypotheses are done (true | false | never)",
    "train.vocab_size": "byte-level BPE vocabulary size (≥ 259: 256 bytes + 3 special tokens)",
    "train.steps": "optimiser steps",
    "train.batch_size": "sequences per step",
    "train.seq_len": "tokens per sequence",
    "train.lr": "peak learning rate (AdamW)",
    "train.warmup_steps": "linear warm-up steps before the cosine decay",
    "train.final_lr_fraction": "the cosine decay ends at lr × this",
    "train.weight_decay": "AdamW weight decay",
    "train.clip_norm": "global gradient-norm clip",
    "train.aux_loss_coef": "weight of the router's load-balancing loss (mean over layers)",
    "train.moe_impl": "sparse (the model's ragged_dot forward) | dense (every expert, the same function)",
    "train.eval_every": "steps between held-out evaluations",
    "train.eval_tokens": "held-out tokens of each periodic evaluation",
    "train.final_eval_tokens": "held-out tokens of the final perplexity and routing statistics",
    "train.eval_batch_size": "sequences per evaluation batch",
    "train.log_every": "steps between log lines",
    "train.geometry": "the model's size as config.json keys (vocab_size stays null: it is train.vocab_size)",
}

# Keys under any `geometry:` (config.json names of a model's size, every family's).
GEOMETRY_HELP = {
    "model_type": "the family: mixtral | qwen3_moe | olmoe | qwen2_moe",
    "vocab_size": "tokens in the vocabulary",
    "hidden_size": "model width",
    "intermediate_size": "FFN width: Mixtral's and OLMoE's experts, the dense MLP of Qwen layers",
    "moe_intermediate_size": "expert FFN width of Qwen3-MoE / Qwen2-MoE",
    "num_hidden_layers": "decoder layers",
    "num_attention_heads": "query heads",
    "num_key_value_heads": "key/value heads (grouped-query attention)",
    "head_dim": "width of one head; null = hidden_size / num_attention_heads",
    "num_local_experts": "experts per layer (Mixtral's key; the others' num_experts is read too)",
    "num_experts": "experts per layer (Qwen3-MoE, OLMoE, Qwen2-MoE; a model.geometry key: train.geometry and "
                   "init-random spell it num_local_experts for every family)",
    "num_experts_per_tok": "experts each token is routed to (top-k)",
    "norm_topk_prob": "renormalise the top-k routing weights to sum 1 (Mixtral always does)",
    "decoder_sparse_step": "every n-th layer is MoE, the others dense MLPs (Qwen); null = 1",
    "mlp_only_layers": "layer indices that are dense MLPs (Qwen)",
    "shared_expert_intermediate_size": "the always-on shared expert's FFN width (Qwen2-MoE)",
    "max_position_embeddings": "longest context (prompt + new tokens)",
    "rope_theta": "rotary embedding base; null = 1e6",
    "rms_norm_eps": "RMSNorm epsilon",
    "sliding_window": "attention window; null = the whole context",
    "tie_word_embeddings": "share the input embedding with the output layer",
}
