"""Which experts live on the GPU: a memory budget turned into a resident set.

Algorithm (Fiddler §3, with the accounting made explicit):
  1. Everything that is not a routed expert goes to the GPU: embeddings, attention (with its biases and q/k
     norms), norms, routers, shared experts and their gates, the dense MLPs of non-MoE layers, the LM head
     (:func:`non_expert_bytes`, exact for every family).
  2. Reserve the KV cache for ``max_batch`` sequences of ``max_context`` tokens, an activation workspace for the
     largest step, and one expert-sized buffer for each PCIe staging slot (shared by all layers) and each
     dynamic-cache slot (``cache_slots`` per layer).
  3. Fill what is left with whole experts -- at their stored size: a quantised expert (``expert_precision``
     int8 / int4) stays quantised on the GPU, 2-4 x smaller, while the staging and cache slots hold the
     dequantised weights the PCIe lane writes -- in the order of the placement policy:
     ``popularity`` — most-routed (layer, expert) first by an offline profile; ties, and the case with no
     profile, follow the *spread* order (expert 0 of every layer, then expert 1 of every layer, ...), so every
     layer gets the same share; ``first`` — (layer, expert) in checkpoint order; ``random`` — a seeded shuffle.
     ``resident_experts`` fixes the count instead (an ablation knob; it must still fit). Only MoE layers have
     experts to place; the rows of dense layers (Qwen's ``mlp_only_layers``) are all True: nothing of them is
     offloaded.
  4. XLA's autotuner needs scratch for one weight of the largest per-layer resident stack when it compiles
     (``autotune_bytes``), and a quantised stack's many-token steps dequantise it into transient bf16 weights
     (``dequantized_bytes``): drop experts from the end of the order until those fit too.
A budget below step 1 + 2 is an error that states the minimum. Pure Python: no JAX, no device needed.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from fiddler_jax.errors import InvalidInputError
from fiddler_jax.models.config import ModelConfig
from fiddler_jax.models.quantization import DEFAULT_INT4_GROUP, expert_matrix_bytes
from fiddler_jax.units import format_bytes, parse_bytes

POLICIES = ("popularity", "first", "random")
@dataclasses.dataclass(frozen=True)
class MemoryPlan:
    """Byte accounting of one placement (all in bytes)."""

    budget: int
    non_expert: int
    kv_cache: int
    workspace: int
    slots: int  # staging buffers + dynamic-cache buffers of every layer
    expert: int  # one resident expert (w1, w3, w2) as stored: quantised bytes at int8 / int4
    resident_count: int
    autotune: int = 0  # XLA's autotuning scratch for the largest resident stack (depends on the placement)
    dequantized: int = 0  # a quantised resident stack's transient W' in a many-token step (depends on it too)
    step_tokens: int = 0  # the most tokens one forward step may hold (rows x columns): the workspace's size

    @property
    def fixed(self) -> int:
        return self.non_expert + self.kv_cache + self.workspace + self.slots + self.autotune + self.dequantized

    @property
    def used(self) -> int:
        return self.fixed + self.resident_count * self.expert

    def __str__(self) -> str:
        f = format_bytes
        return (f"budget {f(self.budget)}: non-expert {f(self.non_expert)}, KV cache {f(self.kv_cache)}, "
                f"workspace {f(self.workspace)}, autotuning {f(self.autotune)}, "
                + (f"dequantised stack {f(self.dequantized)}, " if self.dequantized else "")
                + f"slots {f(self.slots)}, {self.resident_count} resident experts x {f(self.expert)} = "
                f"{f(self.resident_count * self.expert)}; used {f(self.used)}")


@dataclasses.dataclass(frozen=True)
class Placement:
    """``resident[l, e]`` is True when expert e of layer l lives on the GPU; ``memory`` is the accounting."""

    resident: np.ndarray
    memory: MemoryPlan
    policy: str

    dense_layers: tuple[int, ...] = ()  # layers without experts (their rows of ``resident`` are all True)

    @property
    def resident_count(self) -> int:
        """Resident routed experts (the rows of dense layers are not experts)."""
        return int(self.resident.sum()) - len(self.dense_layers) * self.resident.shape[1]

    @property
    def offloaded_count(self) -> int:
        return int((~self.resident).sum())

    def layer_all_resident(self, layer: int) -> bool:
        return bool(self.resident[layer].all())


def non_expert_bytes(cfg: ModelConfig, itemsize: int) -> int:
    """Bytes of every parameter that is not a routed expert's weight (module docstring, step 1)."""
    h, d = cfg.hidden_size, cfg.head_dim
    q, kv = cfg.num_attention_heads * d, cfg.num_key_value_heads * d
    attn = h * (2 * q + 2 * kv) + (q + 2 * kv if cfg.qkv_bias else 0) + (h if cfg.o_bias else 0)
    attn += {"none": 0, "head": 2 * d, "projection": q + kv}[cfg.qk_norm]
    per_layer = attn + 2 * h  # + the two norms
    sparse = len(cfg.moe_layers)
    shared = 3 * h * cfg.shared_expert_intermediate_size + h if cfg.has_shared_expert else 0  # + its gate
    moe = cfg.num_experts * h + shared  # router
    dense = 3 * h * cfg.intermediate_size
    embed = cfg.vocab_size * h * (1 if cfg.tie_word_embeddings else 2)
    layers = cfg.num_hidden_layers * per_layer + sparse * moe + (cfg.num_hidden_layers - sparse) * dense
    return (layers + embed + h) * itemsize


def expert_bytes(cfg: ModelConfig, itemsize: int, precision: str = "bf16", group: int = DEFAULT_INT4_GROUP) -> int:
    """One routed expert's w1, w3 and w2 as stored at ``precision`` ("bf16": ``itemsize`` bytes a weight; int8 /
    int4 with their scales)."""
    h, f = cfg.hidden_size, cfg.moe_intermediate_size
    return sum(expert_matrix_bytes(out, inp, precision, group, itemsize) for out, inp in ((f, h), (f, h), (h, f)))


def kv_cache_bytes(cfg: ModelConfig, itemsize: int, max_batch: int, max_context: int) -> int:
    return 2 * cfg.num_hidden_layers * max_batch * max_context * cfg.num_key_value_heads * cfg.head_dim * itemsize


XLA_SCRATCH = 256 << 20  # cuBLAS/autotuning scratch and allocator fragmentation (measured headroom, H100)


def workspace_bytes(cfg: ModelConfig, itemsize: int, max_step_tokens: int, context: int) -> int:
    """Activations of the largest step — float32 logits, a few hidden-sized buffers and one layer's expert
    intermediates for every token (an estimate; XLA reuses buffers), the attention scores over ``context``
    keys — plus XLA's own temporaries: its grouped
    (ragged) product re-lays out one stacked weight of a layer (E × ffn × hidden: 896 MiB for Mixtral-8x7B,
    measured with the compiled memory analysis on the H100) or, when larger, the autotuner's float32 scratch of
    the LM head's weight, and ``XLA_SCRATCH``."""
    ffn = max(cfg.num_experts_per_tok * cfg.moe_intermediate_size + cfg.shared_expert_intermediate_size,
              cfg.intermediate_size if len(cfg.moe_layers) < cfg.num_hidden_layers else 0)
    per_token = 4 * cfg.vocab_size + itemsize * (8 * cfg.hidden_size + 2 * ffn)
    stacked_weight = cfg.num_experts * cfg.moe_intermediate_size * cfg.hidden_size * itemsize
    # the autotuner profiles the LM head's product on a float32 scratch of its weight (Qwen3-30B-A3B's 152k x
    # 2048 head ran out of memory without it at 16 GiB); it compiles apart from the grouped product
    head_scratch = cfg.vocab_size * cfg.hidden_size * 4
    return max_step_tokens * per_token + attention_scores_bytes(cfg, max_step_tokens, context) \
        + max(stacked_weight, head_scratch) + XLA_SCRATCH


def attention_scores_bytes(cfg: ModelConfig, step_tokens: int, context: int) -> int:
    """Float32 attention scores and probabilities of one layer for ``step_tokens`` queries over ``context`` keys
    (2.2 GB each for a 4096-token Mixtral prefill: a 24 GiB run without them ran out of memory at 2048)."""
    return 2 * 4 * cfg.num_attention_heads * step_tokens * context


def placement_order(num_layers: int, num_experts: int, policy: str, profile: np.ndarray | None = None,
                    seed: int = 0) -> list[tuple[int, int]]:
    """All (layer, expert) pairs in the order the policy fills the GPU."""
    spread = [(l, e) for e in range(num_experts) for l in range(num_layers)]
    if policy == "first":
        return [(l, e) for l in range(num_layers) for e in range(num_experts)]
    if policy == "random":
        rng = np.random.default_rng(seed)
        return [spread[i] for i in rng.permutation(len(spread))]
    if policy == "popularity":
        if profile is None:
            return spread
        profile = np.asarray(profile)
        if profile.shape != (num_layers, num_experts):
            raise InvalidInputError(f"the popularity profile has shape {list(profile.shape)}, but the model has "
                                    f"{num_layers} layers x {num_experts} experts; profile this model again")
        rank = {pair: i for i, pair in enumerate(spread)}
        return sorted(spread, key=lambda p: (-profile[p], rank[p]))  # stable: ties keep the spread order
    raise InvalidInputError(f"unknown placement {policy!r}; valid: {', '.join(POLICIES)}")


def _two_sizes(budget: int, minimum: int) -> str:
    """"<budget> is below the minimum <minimum>", in bytes as well when the rounded sizes read the same."""
    a, b = format_bytes(budget), format_bytes(minimum)
    if a == b:
        a, b = f"{a} ({budget:,} bytes)", f"{b} ({minimum:,} bytes)"
    return f"{a} is below the minimum {b}"


def place(cfg: ModelConfig, gpu_budget: int | str, *, itemsize: int = 2, policy: str = "popularity",
          profile: np.ndarray | None = None, resident_experts: int | None = None, max_batch: int = 1,
          max_context: int | None = None, max_step_tokens: int | None = None, staging_slots: int = 0,
          cache_slots: int = 0, seed: int = 0, expert_precision: str = "bf16",
          int4_group: int = DEFAULT_INT4_GROUP) -> Placement:
    """Choose the GPU-resident experts for ``gpu_budget`` (see the module docstring for the algorithm)."""
    budget = parse_bytes(gpu_budget)
    context = cfg.max_position_embeddings if max_context is None else max_context
    step_tokens = max_batch * context if max_step_tokens is None else max_step_tokens
    for name, value, least in (("max_batch", max_batch, 1), ("max_context", context, 1),
                               ("max_step_tokens", step_tokens, 1), ("staging_slots", staging_slots, 0),
                               ("cache_slots", cache_slots, 0)):
        if value < least:
            raise InvalidInputError(f"{name} must be ≥ {least}; got {value}")
    if step_tokens < max_batch:
        raise InvalidInputError(f"max_step_tokens={step_tokens} is below max_batch={max_batch}: a decode step holds "
                                "one token of every row; raise max_step_tokens or lower max_batch")
    expert = expert_bytes(cfg, itemsize, expert_precision, int4_group)
    slot = expert_bytes(cfg, itemsize)  # a staging / cache slot holds W' in the model's dtype
    memory = MemoryPlan(budget=budget, non_expert=non_expert_bytes(cfg, itemsize),
                        kv_cache=kv_cache_bytes(cfg, itemsize, max_batch, context),
                        workspace=workspace_bytes(cfg, itemsize, step_tokens, min(context, step_tokens)),
                        slots=(staging_slots + cache_slots * len(cfg.moe_layers)) * slot, expert=expert,
                        resident_count=0, step_tokens=step_tokens)
    if budget < memory.fixed:
        raise InvalidInputError(
            f"gpu_budget {_two_sizes(budget, memory.fixed)} this model "
            f"needs without any resident expert ({memory}); raise gpu_budget, or lower max_context/max_batch, "
            "max_step_tokens (longer prompts then run in several steps) or the slot counts")
    moe_layers = cfg.moe_layers
    dense_layers = tuple(n for n in range(cfg.num_hidden_layers) if not cfg.is_sparse(n))
    total = len(moe_layers) * cfg.num_experts
    fits = min(total, (budget - memory.fixed) // expert)
    count = fits if resident_experts is None else int(resident_experts)
    if not 0 <= count <= fits:
        raise InvalidInputError(f"resident_experts={resident_experts} does not fit: gpu_budget "
                                f"{format_bytes(budget)} holds at most {fits} of {total} experts")
    if profile is not None:
        profile = np.asarray(profile)
        if profile.shape != (cfg.num_hidden_layers, cfg.num_experts):
            raise InvalidInputError(f"the popularity profile has shape {list(profile.shape)}, but the model has "
                                    f"{cfg.num_hidden_layers} layers x {cfg.num_experts} experts; profile this "
                                    "model again")
        profile = profile[list(moe_layers)]
    order = [(moe_layers[l], e) for l, e in placement_order(len(moe_layers), cfg.num_experts, policy, profile, seed)]
    while True:  # the autotuner's scratch depends on the placement: fewer experts until both fit
        resident = np.zeros((cfg.num_hidden_layers, cfg.num_experts), bool)
        resident[list(dense_layers)] = True
        for layer, e in order[:count]:
            resident[layer, e] = True
        widest = int(resident[list(moe_layers)].sum(axis=1).max())
        planned = dataclasses.replace(memory, resident_count=count, autotune=autotune_bytes(cfg, itemsize, widest),
                                      dequantized=dequantized_bytes(cfg, itemsize, widest, expert_precision))
        if planned.used <= budget or resident_experts is not None or count == 0:
            break
        count -= 1
    if planned.used > budget:
        raise InvalidInputError(f"resident_experts={resident_experts} does not fit with XLA's autotuning scratch "
                                f"({planned}); lower resident_experts or raise gpu_budget")
    return Placement(resident, planned, policy, dense_layers)


def autotune_bytes(cfg: ModelConfig, itemsize: int, layer_resident: int) -> int:
    """XLA's autotuner profiles a layer's grouped product on scratch copies of its operand when it compiles:
    one weight of the largest resident stack (``layer_resident`` experts × ffn × hidden) and a little more. At
    48 GiB (5 resident in some layers: 560 MiB a weight) it asked for 576 MiB, at 79 GiB (7: 784 MiB) for 800 MiB;
    without room every run failed to compile. Reserved: the weight and a quarter more."""
    weight = layer_resident * cfg.moe_intermediate_size * cfg.hidden_size * itemsize
    return weight + weight // 4


def dequantized_bytes(cfg: ModelConfig, itemsize: int, layer_resident: int, precision: str) -> int:
    """A quantised resident stack runs a many-token step (prefill, a wide batch) through the grouped product on
    its dequantised weights W': w1, w3 and w2 of the layer's ``layer_resident`` experts in the model's dtype,
    all three counted (XLA may keep them alive together). 0 at bf16: the stack itself is the operand."""
    if precision == "bf16":
        return 0
    return 3 * layer_resident * cfg.moe_intermediate_size * cfg.hidden_size * itemsize
