"""The geometry of a MoE model (Mixtral, Qwen3-MoE, OLMoE, Qwen2-MoE) as a frozen dataclass, read from and
written to a Hugging Face ``config.json``.

Only the fields the forward pass uses are kept; a config of an unsupported ``model_type`` or one that lacks a
required field raises :class:`~fiddler_jax.errors.ModelConfigError` naming the field. Both the transformers-4 layout
(``rope_theta`` at top level, as on the Hub's mistralai/Mixtral-8x7B-v0.1) and the transformers-5 layout
(``rope_parameters: {rope_type, rope_theta}``) are accepted.
"""
from __future__ import annotations

import dataclasses
import json
import math
import numbers
import os
import stat
from typing import Any

from fiddler_jax.errors import CheckpointError, ModelConfigError
from fiddler_jax.models.safetensors_io import unreadable

FAMILIES = {
    "mixtral": "MixtralForCausalLM",
    "qwen3_moe": "Qwen3MoeForCausalLM",
    "olmoe": "OlmoeForCausalLM",
    "qwen2_moe": "Qwen2MoeForCausalLM",
}
"""The supported ``model_type`` values and the transformers class of each."""

# The config.json name of the routed-expert count (the other spelling is accepted too: transformers' configs
# alias them and may write either) and of the expert FFN width, per family.
_EXPERTS_KEY = {"mixtral": "num_local_experts", "qwen3_moe": "num_experts", "olmoe": "num_experts",
                "qwen2_moe": "num_experts"}
_EXPERT_FFN_KEY = {"mixtral": "intermediate_size", "qwen3_moe": "moe_intermediate_size",
                   "olmoe": "intermediate_size", "qwen2_moe": "moe_intermediate_size"}
# Families whose decoder layers may be dense MLPs (decoder_sparse_step / mlp_only_layers).
_DENSE_LAYER_FAMILIES = ("qwen3_moe", "qwen2_moe")
QK_NORMS = ("none", "head", "projection")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """The geometry and numerics of a decoder-only MoE model of one of the :data:`FAMILIES`.

    Every family is pre-norm attention (RoPE, grouped-query) followed by a pre-norm MLP block per layer. What
    differs, as fields:
      * ``num_experts`` routed experts per MoE layer, each a SwiGLU FFN of width ``moe_intermediate_size``; the
        router keeps ``num_experts_per_tok`` and renormalises their probabilities iff ``norm_topk_prob``
        (Mixtral: always);
      * ``sparse_layers``: which layers are MoE; the others are dense SwiGLU MLPs of width ``intermediate_size``
        (Qwen's ``mlp_only_layers`` / ``decoder_sparse_step``; empty tuple = every layer is MoE);
      * ``shared_expert_intermediate_size`` > 0: a shared SwiGLU expert beside the routed ones, scaled by
        sigmoid(x · shared_expert_gate) (Qwen2-MoE);
      * ``qk_norm``: "head" (RMSNorm of each head's query/key, Qwen3-MoE), "projection" (RMSNorm over the whole
        query/key projection, OLMoE) or "none"; ``qkv_bias`` / ``o_bias``: biases of the projections;
        ``clip_qkv``: clamp of the projections (OLMoE).
    """

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    num_experts: int
    num_experts_per_tok: int
    head_dim: int
    model_type: str = "mixtral"
    moe_intermediate_size: int | None = None  # None: intermediate_size (Mixtral and OLMoE use one width)
    sparse_layers: tuple[bool, ...] = ()  # () = every layer is MoE
    shared_expert_intermediate_size: int = 0
    norm_topk_prob: bool = True
    qk_norm: str = "none"
    qkv_bias: bool = False
    o_bias: bool = False
    clip_qkv: float | None = None
    max_position_embeddings: int = 32768
    rms_norm_eps: float = 1e-5
    rope_theta: float = 1e6
    sliding_window: int | None = None
    tie_word_embeddings: bool = False
    initializer_range: float = 0.02
    router_aux_loss_coef: float = 0.001
    bos_token_id: int | None = 1
    eos_token_id: int | tuple[int, ...] | None = 2
    pad_token_id: int | None = None

    def __post_init__(self):
        if self.model_type not in FAMILIES:
            raise ModelConfigError(unsupported_family(self.model_type))
        if self.moe_intermediate_size is None:
            object.__setattr__(self, "moe_intermediate_size", self.intermediate_size)
        for name in ("vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size",
                     "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "num_experts",
                     "num_experts_per_tok", "head_dim", "max_position_embeddings"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ModelConfigError(f"config field {name!r} must be a positive integer, got {value!r}")
        shared = self.shared_expert_intermediate_size
        if not _is_int(shared) or shared < 0:
            raise ModelConfigError(f"config field 'shared_expert_intermediate_size' must be an integer >= 0, got "
                                   f"{shared!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ModelConfigError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of num_key_value_heads "
                f"({self.num_key_value_heads}) for grouped-query attention")
        if self.num_experts_per_tok > self.num_experts:
            raise ModelConfigError(
                f"num_experts_per_tok ({self.num_experts_per_tok}) exceeds the number of experts "
                f"({self.num_experts})")
        if self.head_dim % 2:
            raise ModelConfigError(f"head_dim must be even for rotary embeddings, got {self.head_dim}")
        if self.qk_norm not in QK_NORMS:
            raise ModelConfigError(f"qk_norm must be one of {', '.join(QK_NORMS)}, got {self.qk_norm!r}")
        layers = tuple(self.sparse_layers)
        if layers and (len(layers) != self.num_hidden_layers or not all(isinstance(b, bool) for b in layers)):
            raise ModelConfigError(f"sparse_layers must hold one true/false per layer ({self.num_hidden_layers}), "
                                   f"got {self.sparse_layers!r}")
        if layers and not any(layers):
            raise ModelConfigError("no layer is a mixture of experts (mlp_only_layers / decoder_sparse_step leave "
                                   "only dense MLPs); fiddler-jax runs MoE models")
        object.__setattr__(self, "sparse_layers", () if all(layers) else layers)
        if self.clip_qkv is not None and not (isinstance(self.clip_qkv, float) and self.clip_qkv > 0):
            raise ModelConfigError(f"clip_qkv must be a positive number or null, got {self.clip_qkv!r}")
        window = self.sliding_window
        if window is not None and (not isinstance(window, int) or isinstance(window, bool) or window <= 0):
            raise ModelConfigError(f"sliding_window must be a positive integer or null, got {window!r}")
        for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
            value = getattr(self, name)
            many = name == "eos_token_id" and isinstance(value, tuple)
            if not (value is None or _is_int(value) or many and all(_is_int(i) for i in value)):
                kind = "a token id, a list of token ids or null" if name == "eos_token_id" else "a token id or null"
                raise ModelConfigError(f"config field {name!r} must be {kind}, got {value!r}")

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        """The end-of-sequence ids as a tuple (HF allows an int or a list)."""
        if self.eos_token_id is None:
            return ()
        if isinstance(self.eos_token_id, int):
            return (self.eos_token_id,)
        return tuple(self.eos_token_id)

    def is_sparse(self, layer: int) -> bool:
        """Whether decoder layer ``layer`` is a mixture of experts (else a dense MLP)."""
        return not self.sparse_layers or self.sparse_layers[layer]

    @property
    def moe_layers(self) -> tuple[int, ...]:
        """The indices of the MoE layers."""
        return tuple(n for n in range(self.num_hidden_layers) if self.is_sparse(n))

    @property
    def has_shared_expert(self) -> bool:
        return self.shared_expert_intermediate_size > 0

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any], source: str = "config") -> ModelConfig:
        """Build from the parsed ``config.json`` of a checkpoint of one of the :data:`FAMILIES`."""
        if not isinstance(d, dict):
            raise ModelConfigError(f"{source} holds a JSON {_json_kind(d)}, but a Hugging Face config.json is a JSON "
                                   "object of fields ({\"model_type\": \"mixtral\", ...}); save the model's "
                                   "config.json again")
        family = d.get("model_type")
        if family not in FAMILIES:
            raise ModelConfigError(f"{source}: {unsupported_family(family)}")
        experts_key, ffn_key = _EXPERTS_KEY[family], _EXPERT_FFN_KEY[family]
        other = "num_experts" if experts_key == "num_local_experts" else "num_local_experts"
        if d.get(experts_key) is None and d.get(other) is not None:  # transformers writes either spelling
            experts_key = other
        required = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                    experts_key, "num_experts_per_tok") + ((ffn_key,) if ffn_key != "intermediate_size" else ())
        missing = [k for k in required if d.get(k) is None]
        if missing:
            raise ModelConfigError(f"{source}: required field(s) missing: {', '.join(missing)}")
        act = d.get("hidden_act", "silu")
        if act != "silu":
            raise ModelConfigError(f"{source}: hidden_act {act!r} is not supported (the MoE families here use "
                                   "'silu')")
        rope_theta = d.get("rope_theta")
        rope = d.get("rope_parameters") or d.get("rope_scaling")
        if isinstance(rope, dict):
            rope_type = rope.get("rope_type", rope.get("type", "default"))
            if rope_type != "default":
                raise ModelConfigError(f"{source}: rope_type {rope_type!r} is not supported (only 'default')")
            rope_theta = rope.get("rope_theta", rope_theta)
        heads, hidden = d["num_attention_heads"], d["hidden_size"]
        head_dim = d.get("head_dim")
        if not head_dim and _is_int(hidden) and _is_int(heads) and heads > 0:
            head_dim = hidden // heads  # else __post_init__ names the bad hidden_size / num_attention_heads first
        kv_heads = d.get("num_key_value_heads")
        tie = d.get("tie_word_embeddings", False)
        if not isinstance(tie, bool) and tie is not None:
            raise ModelConfigError(f"{source}: config field 'tie_word_embeddings' must be true or false, got {tie!r}")
        eos = d.get("eos_token_id", 2)
        try:
            return cls(
                model_type=family,
                vocab_size=d["vocab_size"],
                hidden_size=hidden,
                intermediate_size=d["intermediate_size"],
                moe_intermediate_size=d[ffn_key],
                num_hidden_layers=d["num_hidden_layers"],
                num_attention_heads=heads,
                num_key_value_heads=heads if kv_heads is None else kv_heads,
                num_experts=d[experts_key],
                num_experts_per_tok=d["num_experts_per_tok"],
                head_dim=head_dim,
                **_family_fields(family, d, head_dim, hidden, heads),
                max_position_embeddings=d.get("max_position_embeddings", 32768),
                rms_norm_eps=_number(d.get("rms_norm_eps", 1e-5), "rms_norm_eps", ">= 0"),
                rope_theta=_number(1e6 if rope_theta is None else rope_theta, "rope_theta", "> 0"),
                sliding_window=_sliding_window(family, d),
                tie_word_embeddings=bool(tie),
                initializer_range=_number(d.get("initializer_range", 0.02), "initializer_range"),
                router_aux_loss_coef=_number(d.get("router_aux_loss_coef", 0.001), "router_aux_loss_coef"),
                bos_token_id=d.get("bos_token_id"),
                eos_token_id=tuple(eos) if isinstance(eos, list) else eos,
                pad_token_id=d.get("pad_token_id"),
            )
        except ModelConfigError as e:
            raise ModelConfigError(f"{source}: {e}") from None

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike) -> ModelConfig:
        """Read ``<path>/config.json`` (UTF-8 JSON, as transformers writes it)."""
        folder = os.fspath(path)
        file = os.path.join(folder, "config.json")
        expected = "pass the path of a folder holding config.json and *.safetensors (a Hugging Face checkpoint)"
        try:
            is_folder = stat.S_ISDIR(os.stat(folder).st_mode)
        except (FileNotFoundError, NotADirectoryError):
            raise CheckpointError(f"model folder {folder!r} does not exist; {expected}") from None
        except OSError as e:
            raise CheckpointError(unreadable(folder, e)) from None
        if not is_folder:
            raise CheckpointError(f"model path {folder!r} is a file, not a folder; {expected}")
        try:
            with open(file, encoding="utf-8") as f:
                text = f.read()
        except FileNotFoundError:
            raise CheckpointError(f"{file} is missing: a Hugging Face checkpoint folder needs a config.json") from None
        except UnicodeDecodeError as e:
            raise ModelConfigError(f"{file} is not UTF-8 text (byte {e.object[e.start]:#04x} at offset {e.start}); "
                                   "save config.json as UTF-8 JSON") from None
        except OSError as e:
            raise CheckpointError(unreadable(file, e)) from None
        try:
            d = json.loads(text)
        except (ValueError, RecursionError) as e:  # JSONDecodeError, an over-long integer, absurd nesting
            raise ModelConfigError(f"{file} is not valid JSON ({e})") from None
        return cls.from_hf_dict(d, source=file)

    def to_hf_dict(self) -> dict[str, Any]:
        """The ``config.json`` content transformers reads back into the same model (and ``from_hf_dict`` into
        an equal ``ModelConfig``)."""
        eos = list(self.eos_token_id) if isinstance(self.eos_token_id, tuple) else self.eos_token_id
        family = self.model_type
        d = {
            "architectures": [FAMILIES[family]],
            "model_type": family,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            _EXPERTS_KEY[family]: self.num_experts,
            "num_experts_per_tok": self.num_experts_per_tok,
            "hidden_act": "silu",
            "max_position_embeddings": self.max_position_embeddings,
            "rms_norm_eps": self.rms_norm_eps,
            # Both spellings: transformers 4 reads rope_theta, transformers 5 reads rope_parameters.
            "rope_theta": self.rope_theta,
            "rope_parameters": {"rope_type": "default", "rope_theta": self.rope_theta},
            "tie_word_embeddings": self.tie_word_embeddings,
            "initializer_range": self.initializer_range,
            "router_aux_loss_coef": self.router_aux_loss_coef,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": eos,
            "pad_token_id": self.pad_token_id,
            "attention_dropout": 0.0,
            "use_cache": True,
        }
        if family == "mixtral":
            d |= {"sliding_window": self.sliding_window, "router_jitter_noise": 0.0}
        else:
            d |= {"norm_topk_prob": self.norm_topk_prob, "output_router_logits": False}
        if family in ("qwen3_moe", "qwen2_moe"):
            d |= {"moe_intermediate_size": self.moe_intermediate_size, "decoder_sparse_step": 1,
                  "mlp_only_layers": [n for n in range(self.num_hidden_layers) if not self.is_sparse(n)],
                  "use_sliding_window": self.sliding_window is not None,
                  "sliding_window": self.sliding_window, "max_window_layers": self.num_hidden_layers}
        if family == "qwen3_moe":
            d["attention_bias"] = self.qkv_bias
        if family == "qwen2_moe":
            d |= {"qkv_bias": self.qkv_bias, "shared_expert_intermediate_size": self.shared_expert_intermediate_size}
        if family == "olmoe":
            d |= {"attention_bias": self.qkv_bias, "clip_qkv": self.clip_qkv}
        return d


def unsupported_family(model_type) -> str:
    supported = ", ".join(f"{t!r} ({c})" for t, c in FAMILIES.items())
    return (f"model_type is {model_type!r}, but fiddler-jax runs only these MoE families: {supported}. Point "
            "model.path at a checkpoint of one of them.")


def _family_fields(family: str, d: dict, head_dim, hidden, heads) -> dict:
    """The family-specific fields of :class:`ModelConfig` from a config.json (module docstring of the class)."""
    if family == "mixtral":
        return {}
    norm_topk = d.get("norm_topk_prob", False)
    if not isinstance(norm_topk, bool):
        raise ModelConfigError(f"config field 'norm_topk_prob' must be true or false, got {norm_topk!r}")
    fields = {"norm_topk_prob": norm_topk}
    if family in _DENSE_LAYER_FAMILIES:
        step = d.get("decoder_sparse_step", 1)
        dense = d.get("mlp_only_layers") or []
        if not _is_int(step) or step < 1:
            raise ModelConfigError(f"config field 'decoder_sparse_step' must be a positive integer, got {step!r}")
        if not isinstance(dense, list) or not all(_is_int(n) for n in dense):
            raise ModelConfigError(f"config field 'mlp_only_layers' must be a list of layer indices, got {dense!r}")
        layers = d["num_hidden_layers"] if _is_int(d["num_hidden_layers"]) else 0
        fields["sparse_layers"] = tuple(n not in dense and (n + 1) % step == 0 for n in range(layers))
    if family == "qwen3_moe":
        bias = d.get("attention_bias", False)
        fields |= {"qk_norm": "head", "qkv_bias": bool(bias), "o_bias": bool(bias)}
    elif family == "olmoe":
        bias = d.get("attention_bias", False)
        if _is_int(hidden) and _is_int(heads) and heads > 0 and head_dim != hidden // heads:
            raise ModelConfigError(f"OLMoE normalises the query over hidden_size ({hidden}) values, so head_dim "
                                   f"({head_dim}) must be hidden_size / num_attention_heads")
        clip = d.get("clip_qkv")
        fields |= {"qk_norm": "projection", "qkv_bias": bool(bias), "o_bias": bool(bias),
                   "clip_qkv": None if clip is None else _number(clip, "clip_qkv", "> 0")}
    elif family == "qwen2_moe":
        shared = d.get("shared_expert_intermediate_size") or 0
        fields |= {"qkv_bias": bool(d.get("qkv_bias", True)), "shared_expert_intermediate_size": shared}
    return fields


def _sliding_window(family: str, d: dict):
    """The attention window of every layer, or None. Qwen families apply theirs only with use_sliding_window and
    then only to some layers (max_window_layers), which is refused here."""
    if family == "mixtral" or family == "olmoe":
        return d.get("sliding_window") if family == "mixtral" else None
    if d.get("use_sliding_window"):
        raise ModelConfigError("use_sliding_window is true: per-layer sliding windows (max_window_layers) are not "
                               "supported; set use_sliding_window to false")
    return None


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _json_kind(value) -> str:
    return {list: "list", str: "string", bool: "boolean", type(None): "null"}.get(type(value), "number")


def _number(value, key: str, bound: str = "") -> float:
    """Float field ``key`` of a config: a finite JSON number (within ``bound``: "", "> 0" or ">= 0"), else an error
    (which ``from_hf_dict`` prefixes with the file)."""
    try:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    except OverflowError:  # an integer beyond float range
        ok = False
    if ok and bound:
        ok = value > 0 if bound == "> 0" else value >= 0
    if not ok:
        raise ModelConfigError(f"config field {key!r} must be a finite number{' ' + bound if bound else ''}, got "
                               f"{value!r}")
    return float(value)


MixtralConfig = ModelConfig  # the Mixtral-only releases' name (``fiddler_jax.MixtralConfig``)
