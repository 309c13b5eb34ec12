"""Offline routing profile: how often the router of each layer picks each expert.

``profile_routing`` runs the model over token windows and, per layer, counts the (token, top-k slot)
assignments routed to each expert: ``counts[l, e]``. Placement fills the GPU with the most-routed experts first.
A profile carries the fingerprint of the model it was measured on (sha256 of the config and of every weight's
HF name and shape, dtype-independent), and loading it for another model is an error.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
from collections.abc import Iterable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from fiddler_jax.errors import InvalidInputError
from fiddler_jax.models.checkpoint import _params, hf_names
from fiddler_jax.models.causal_lm import MoeForCausalLM

FORMAT = "fiddler-jax routing profile v1"


def model_fingerprint(model: MoeForCausalLM) -> str:
    """sha256 over the config and the (HF name, shape) of every weight: equal for the same model in any dtype."""
    cfg = model.config
    h = hashlib.sha256(json.dumps(cfg.to_hf_dict(), sort_keys=True).encode())
    for path, param in _params(model):
        names = hf_names(path, cfg)
        shape = param.shape[1:] if len(names) > 1 else param.shape
        for name in names:
            h.update(f"{name}:{list(shape)};".encode())
    return h.hexdigest()


@dataclasses.dataclass(frozen=True)
class RoutingProfile:
    """``counts[l, e]``: assignments of layer l routed to expert e over ``tokens`` profiled tokens."""

    counts: np.ndarray
    tokens: int
    model_fingerprint: str
    source: str = ""

    def shares(self) -> np.ndarray:
        """Per-layer fraction of the assignments that each expert received ([L, E], rows sum to 1)."""
        total = self.counts.sum(axis=1, keepdims=True)
        return self.counts / np.maximum(total, 1)

    def save(self, path: str | os.PathLike) -> None:
        with open(path, "w") as f:
            json.dump({"format": FORMAT, "model_fingerprint": self.model_fingerprint, "tokens": self.tokens,
                       "source": self.source, "counts": self.counts.tolist()}, f, indent=1)

    @classmethod
    def load(cls, path: str | os.PathLike, model: MoeForCausalLM | None = None) -> RoutingProfile:
        """Read a profile; with ``model``, refuse one measured on another model."""
        try:
            with open(path) as f:
                d = json.load(f)
            if not isinstance(d, dict):
                kind = {list: "list", str: "string", bool: "boolean", type(None): "null"}.get(type(d), "number")
                raise ValueError(f"it holds a JSON {kind}, not an object")
            if d.get("format") != FORMAT:
                raise ValueError(f"format is {d.get('format')!r}, expected {FORMAT!r}")
            profile = cls(np.asarray(d["counts"], np.int64), int(d["tokens"]), d["model_fingerprint"],
                          d.get("source", ""))
        except FileNotFoundError:
            raise InvalidInputError(f"profile file {os.fspath(path)!r} does not exist; create it with "
                                    "`fiddler-jax profile`") from None
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise InvalidInputError(f"{os.fspath(path)} is not a routing profile ({e}); create it with "
                                    "`fiddler-jax profile`") from None
        if model is not None and profile.model_fingerprint != model_fingerprint(model):
            raise InvalidInputError(f"{os.fspath(path)} was measured on another model (fingerprint "
                                    f"{profile.model_fingerprint[:12]}…, this model {model_fingerprint(model)[:12]}…);"
                                    " run `fiddler-jax profile` for this model")
        return profile


@functools.partial(jax.jit, static_argnums=0)
def window_choices(graphdef, state, tokens):
    """[L, B·T, k] the top-k experts every MoE layer's router picks for each token of a batch of windows [B, T]
    (each window from position 0; L counts the MoE layers, ``config.moe_layers``). The top-k is taken on the
    router logits, which picks the same experts as on their softmax."""
    model = nnx.merge(graphdef, state)
    b, t = tokens.shape
    _, _, router_logits = model(tokens, model.init_cache(b, t), 0, return_router_logits=True)
    k = model.config.num_experts_per_tok
    return jnp.stack([jax.lax.top_k(rl.astype(jnp.float32), k)[1] for rl in router_logits])


@functools.partial(jax.jit, static_argnums=0)
def _window_counts(graphdef, state, tokens):
    """[L, E] assignment counts of one batch of windows [B, T] (rows of dense layers: 0)."""
    cfg = nnx.merge(graphdef, state).config
    choices = window_choices(graphdef, state, tokens)
    counts = jnp.zeros((cfg.num_hidden_layers, cfg.num_experts), jnp.int32)
    for row, c in zip(cfg.moe_layers, choices):
        counts = counts.at[row].set(jnp.bincount(c.reshape(-1), length=cfg.num_experts))
    return counts


def profile_routing(model: MoeForCausalLM, windows: Iterable[np.ndarray], *, batch_size: int = 8, source: str = "",
                    total: int | None = None, progress: bool = True) -> RoutingProfile:
    """Count router choices over ``windows`` (int arrays of one fixed length T), batched by ``batch_size``.
    The top-k choice uses the router logits directly (softmax is monotone, so it picks the same experts)."""
    cfg = model.config
    graphdef, state = nnx.split(model)
    counts = np.zeros((cfg.num_hidden_layers, cfg.num_experts), np.int64)
    tokens, batch = 0, []

    def flush():
        nonlocal tokens
        ids = np.stack(batch)
        if ids.min() < 0 or ids.max() >= cfg.vocab_size:
            raise InvalidInputError(f"profiling data holds token ids outside [0, {cfg.vocab_size}); it was encoded "
                                    "with another tokenizer")
        counts[:] += np.asarray(_window_counts(graphdef, state, jnp.asarray(ids, jnp.int32)))
        tokens += ids.size
        bar.update(ids.size)
        batch.clear()

    with tqdm(total=total, desc="profiling routing", unit="tok", disable=not progress, leave=False) as bar:
        for w in windows:
            batch.append(np.asarray(w))
            if len(batch) == batch_size:
                flush()
        if batch:
            flush()
    if tokens == 0:
        raise InvalidInputError("no profiling data: the text produced no full token window; give more text or a "
                                "shorter seq_len")
    return RoutingProfile(counts, tokens, model_fingerprint(model), source)
