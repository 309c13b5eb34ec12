"""Mixtral geometry as a frozen dataclass, read from and written to a Hugging Face ``config.json``.

Only the fields the forward pass uses are kept; a config of another ``model_type`` or one that lacks a required
field raises :class:`~fiddler_jax.errors.ModelConfigError` naming the field. Both the transformers-4 layout
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

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any], source: str = "config") -> MixtralConfig:
        """Build from the parsed ``config.json`` of a ``MixtralForCausalLM`` checkpoint."""
        if not isinstance(d, dict):
            raise ModelConfigError(f"{source} holds a JSON {_json_kind(d)}, but a Hugging Face config.json is a JSON "
                                   "object of fields ({\"model_type\": \"mixtral\", ...}); save the model's "
                                   "config.json again")
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
                vocab_size=d["vocab_size"],
                hidden_size=hidden,
                intermediate_size=d["intermediate_size"],
                num_hidden_layers=d["num_hidden_layers"],
                num_attention_heads=heads,
                num_key_value_heads=heads if kv_heads is None else kv_heads,
                num_local_experts=d["num_local_experts"],
                num_experts_per_tok=d["num_experts_per_tok"],
                head_dim=head_dim,
                max_position_embeddings=d.get("max_position_embeddings", 32768),
                rms_norm_eps=_number(d.get("rms_norm_eps", 1e-5), "rms_norm_eps", ">= 0"),
                rope_theta=_number(1e6 if rope_theta is None else rope_theta, "rope_theta", "> 0"),
                sliding_window=d.get("sliding_window"),
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
    def from_pretrained(cls, path: str | os.PathLike) -> MixtralConfig:
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
