"""Mixtral geometry as a frozen dataclass, read from and written to a Hugging Face ``config.json``.

Only the fields the forward pass uses are kept; a config of another ``model_type`` or one that lacks a required
field raises :class:`~fiddler_jax.errors.ModelConfigError` naming the field. Both the transformers-4 layout
(``rope_theta`` at top level, as on the Hub's mistralai/Mixtral-8x7B-v0.1) and the transformers-5 layout
(``rope_parameters: {rope_type, rope_theta}``) are accepted.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

from fiddler_jax.errors import CheckpointError, ModelConfigError

_REQUIRED = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_local_experts",
    "num_experts_per_tok",
)


@dataclasses.dataclass(frozen=True)
class MixtralConfig:
    """The geometry and numerics of a Mixtral model (HF field names)."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    num_local_experts: int
    num_experts_per_tok: int
    head_dim: int
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
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads", "num_local_experts",
                     "num_experts_per_tok", "head_dim", "max_position_embeddings"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ModelConfigError(f"config field {name!r} must be a positive integer, got {value!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ModelConfigError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of num_key_value_heads "
                f"({self.num_key_value_heads}) for grouped-query attention")
        if self.num_experts_per_tok > self.num_local_experts:
            raise ModelConfigError(
                f"num_experts_per_tok ({self.num_experts_per_tok}) exceeds num_local_experts "
                f"({self.num_local_experts})")
        if self.head_dim % 2:
            raise ModelConfigError(f"head_dim must be even for rotary embeddings, got {self.head_dim}")
        if self.sliding_window is not None and self.sliding_window <= 0:
            raise ModelConfigError(f"sliding_window must be positive or null, got {self.sliding_window}")

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        """The end-of-sequence ids as a tuple (HF allows an int or a list)."""
        if self.eos_token_id is None:
            return ()
        if isinstance(self.eos_token_id, int):
            return (self.eos_token_id,)
        return tuple(self.eos_token_id)

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any], source: str = "config") -> MixtralConfig:
        """Build from the parsed ``config.json`` of a ``MixtralForCausalLM`` checkpoint."""
        model_type = d.get("model_type")
        if model_type != "mixtral":
            raise ModelConfigError(
                f"{source}: model_type is {model_type!r}, but fiddler-jax runs only 'mixtral' checkpoints "
                "(MixtralForCausalLM). Point model.path at a Mixtral folder.")
        missing = [k for k in _REQUIRED if d.get(k) is None]
        if missing:
            raise ModelConfigError(f"{source}: required field(s) missing: {', '.join(missing)}")
        act = d.get("hidden_act", "silu")
        if act != "silu":
            raise ModelConfigError(f"{source}: hidden_act {act!r} is not supported (Mixtral uses 'silu')")
        rope_theta = d.get("rope_theta")
        rope = d.get("rope_parameters") or d.get("rope_scaling")
        if isinstance(rope, dict):
            rope_type = rope.get("rope_type", rope.get("type", "default"))
            if rope_type != "default":
                raise ModelConfigError(f"{source}: rope_type {rope_type!r} is not supported (only 'default')")
            rope_theta = rope.get("rope_theta", rope_theta)
        heads = d["num_attention_heads"]
        eos = d.get("eos_token_id", 2)
        try:
            return cls(
                vocab_size=d["vocab_size"],
                hidden_size=d["hidden_size"],
                intermediate_size=d["intermediate_size"],
                num_hidden_layers=d["num_hidden_layers"],
                num_attention_heads=heads,
                num_key_value_heads=d.get("num_key_value_heads") or heads,
                num_local_experts=d["num_local_experts"],
                num_experts_per_tok=d["num_experts_per_tok"],
                head_dim=d.get("head_dim") or d["hidden_size"] // heads,
                max_position_embeddings=d.get("max_position_embeddings", 32768),
                rms_norm_eps=float(d.get("rms_norm_eps", 1e-5)),
                rope_theta=float(rope_theta if rope_theta is not None else 1e6),
                sliding_window=d.get("sliding_window"),
                tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
                initializer_range=float(d.get("initializer_range", 0.02)),
                router_aux_loss_coef=float(d.get("router_aux_loss_coef", 0.001)),
                bos_token_id=d.get("bos_token_id"),
                eos_token_id=tuple(eos) if isinstance(eos, list) else eos,
                pad_token_id=d.get("pad_token_id"),
            )
        except ModelConfigError as e:
            raise ModelConfigError(f"{source}: {e}") from None

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike) -> MixtralConfig:
        """Read ``<path>/config.json``."""
        file = os.path.join(os.fspath(path), "config.json")
        if not os.path.isdir(path):
            raise CheckpointError(f"model folder {os.fspath(path)!r} does not exist; pass the path of a folder "
                                  "holding config.json and *.safetensors (a Hugging Face checkpoint)")
        if not os.path.isfile(file):
            raise CheckpointError(f"{file} is missing: a Hugging Face checkpoint folder needs a config.json")
        try:
            with open(file) as f:
                d = json.load(f)
        except json.JSONDecodeError as e:
            raise ModelConfigError(f"{file} is not valid JSON ({e})") from None
        return cls.from_hf_dict(d, source=file)

    def to_hf_dict(self) -> dict[str, Any]:
        """The ``config.json`` content transformers reads back into an equal ``MixtralConfig``."""
        eos = list(self.eos_token_id) if isinstance(self.eos_token_id, tuple) else self.eos_token_id
        return {
            "architectures": ["MixtralForCausalLM"],
            "model_type": "mixtral",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "num_local_experts": self.num_local_experts,
            "num_experts_per_tok": self.num_experts_per_tok,
            "hidden_act": "silu",
            "max_position_embeddings": self.max_position_embeddings,
            "rms_norm_eps": self.rms_norm_eps,
            # Both spellings: transformers 4 reads rope_theta, transformers 5 reads rope_parameters.
            "rope_theta": self.rope_theta,
            "rope_parameters": {"rope_type": "default", "rope_theta": self.rope_theta},
            "sliding_window": self.sliding_window,
            "tie_word_embeddings": self.tie_word_embeddings,
            "initializer_range": self.initializer_range,
            "router_aux_loss_coef": self.router_aux_loss_coef,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": eos,
            "pad_token_id": self.pad_token_id,
            "attention_dropout": 0.0,
            "router_jitter_noise": 0.0,
            "use_cache": True,
        }
