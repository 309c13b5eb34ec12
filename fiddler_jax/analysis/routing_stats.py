"""Routing statistics of a Mixtral: which experts each token is sent to, and the structure in those choices.

Everything here works on one array, ``choices[l, t, j]``: the j-th of the top-k experts that layer l's router
picked for token t of one running text (``route_text``). From it:

- ``popularity`` [L, E]: the share of layer l's assignments that went to expert e (rows sum to 1).
- ``load_imbalance`` [L]: max over experts of the share divided by the uniform share 1/E (1 = balanced; E = one
  expert takes everything). This is what placement exploits: the busier the top experts, the more a few resident
  experts cover.
- ``coactivation`` [L, E, E]: P(i and j both chosen for a token); the diagonal is P(i chosen).
- ``temporal_reuse`` [L]: the fraction of token t+1's experts that token t also used, beside ``chance_reuse``
  (k/E, what independent routing would give). High reuse is what an expert cache (the LRU planner) lives on.
- ``layer_transition`` [L-1, E, E]: P(expert j at layer l+1 | expert i at layer l) over the k×k pairs of each
  token; rows sum to 1. Sharp rows mean layer l predicts layer l+1 (prefetching the next layer's experts pays).
- ``token_category`` / ``routing_by_category``: for code, each token is a keyword, identifier, number, whitespace,
  punctuation or other, and the expert shares are split by category.

All functions are plain numpy; only ``route_text`` runs the model.
"""
from __future__ import annotations

import keyword

import math

import numpy as np

from fiddler_jax.errors import InvalidInputError

CATEGORIES = ("keyword", "identifier", "number", "whitespace", "punctuation", "other")


def _check(choices: np.ndarray, num_experts: int) -> np.ndarray:
    choices = np.asarray(choices)
    if choices.ndim != 3 or not np.issubdtype(choices.dtype, np.integer):
        raise InvalidInputError(f"choices must be an integer array [layers, tokens, top_k], got {choices.dtype} "
                                f"{choices.shape}")
    if choices.size and (choices.min() < 0 or choices.max() >= num_experts):
        raise InvalidInputError(f"choices hold expert ids outside [0, {num_experts}); pass the model's "
                                "num_local_experts")
    return choices


def route_text(model, ids: np.ndarray, *, window: int = 256) -> np.ndarray:
    """choices [L, T, k]: the top-k experts of every MoE layer for each of the T token ids, run through ``model`` in
    independent windows of ``window`` tokens (the last one may be shorter), through the profiler's
    ``window_choices``."""
    import jax.numpy as jnp
    from flax import nnx

    from fiddler_jax.runtime.profiling import window_choices

    ids = np.asarray(ids).reshape(-1)
    cfg = model.config
    if ids.size == 0:
        raise InvalidInputError("no tokens to route")
    if ids.min() < 0 or ids.max() >= cfg.vocab_size:
        raise InvalidInputError(f"token ids outside [0, {cfg.vocab_size}): they were made with another tokenizer")
    graphdef, state = nnx.split(model)
    out = [np.asarray(window_choices(graphdef, state, jnp.asarray(ids[None, s:s + window], jnp.int32)))
           for s in range(0, ids.size, window)]
    return np.concatenate(out, axis=1).astype(np.int64)


def popularity(choices: np.ndarray, num_experts: int) -> np.ndarray:
    """[L, E] share of each layer's assignments routed to each expert."""
    choices = _check(choices, num_experts)
    counts = np.stack([np.bincount(c.reshape(-1), minlength=num_experts) for c in choices]).astype(np.float64)
    return counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)


def load_imbalance(shares: np.ndarray) -> np.ndarray:
    """[L] max share over the uniform share: 1 for perfectly balanced routing, E when one expert takes all."""
    shares = np.asarray(shares, np.float64)
    return shares.max(axis=1) * shares.shape[1]


def kept_experts(fraction: float, num_experts: int) -> int:
    """Whole experts a budget fraction keeps per layer: f · E rounded half up (Python's round() would send 1/16
    of 8 experts to 0 but 3/16 to 2)."""
    return int(math.floor(float(fraction) * num_experts + 0.5))


def static_capture(profile_choices: np.ndarray, eval_choices: np.ndarray, num_experts: int,
                   fractions) -> np.ndarray:
    """[F] share of the evaluation tokens' assignments that land on resident experts when each layer keeps its
    ``fraction`` · E most popular experts of the profiling tokens (popularity placement with an equal share per
    layer; fraction f keeps floor(f · E + 1/2) experts, ties by id: :func:`kept_experts`). Profile and evaluate on
    different tokens, or the curve flatters static placement. Uniform routing gives kept_experts(f, E) / E."""
    profile_choices = _check(profile_choices, num_experts)
    eval_shares = popularity(eval_choices, num_experts)
    order = np.argsort(-popularity(profile_choices, num_experts), axis=1, kind="stable")  # [L, E] most popular first
    ranked = np.take_along_axis(eval_shares, order, axis=1).cumsum(axis=1)  # [L, E]: share of the top r+1
    out = []
    for f in np.asarray(fractions, np.float64).reshape(-1):
        if not 0.0 <= f <= 1.0:
            raise InvalidInputError(f"a budget fraction must be in [0, 1], got {f}")
        keep = kept_experts(f, num_experts)
        out.append(0.0 if keep == 0 else float(ranked[:, keep - 1].mean()))
    return np.asarray(out)


def _one_hot(choices: np.ndarray, num_experts: int) -> np.ndarray:
    """[L, T, E] 1.0 where the expert is among the token's choices."""
    hot = np.zeros(choices.shape[:2] + (num_experts,), np.float64)
    np.put_along_axis(hot, choices, 1.0, axis=2)
    return hot


def coactivation(choices: np.ndarray, num_experts: int) -> np.ndarray:
    """[L, E, E] P(expert i and expert j are both chosen for a token); the diagonal is P(i is chosen)."""
    choices = _check(choices, num_experts)
    hot = _one_hot(choices, num_experts)
    return np.einsum("lti,ltj->lij", hot, hot) / max(choices.shape[1], 1)


def temporal_reuse(choices: np.ndarray, num_experts: int) -> np.ndarray:
    """[L] mean fraction of token t+1's experts that token t also chose (needs two tokens or more)."""
    choices = _check(choices, num_experts)
    if choices.shape[1] < 2:
        raise InvalidInputError("temporal reuse needs at least two tokens")
    hot = _one_hot(choices, num_experts)
    shared = (hot[:, 1:] * hot[:, :-1]).sum(axis=2)  # [L, T-1] experts in common
    return shared.mean(axis=1) / choices.shape[2]


def chance_reuse(num_experts: int, top_k: int) -> float:
    """The temporal reuse of routing that ignores the previous token: k/E."""
    return top_k / num_experts


def layer_transition(choices: np.ndarray, num_experts: int) -> np.ndarray:
    """[L-1, E, E] P(expert j at layer l+1 | expert i at layer l), counted over every (i, j) pair of each token's
    top-k sets; a row of an expert never chosen at layer l is all zeros."""
    choices = _check(choices, num_experts)
    hot = _one_hot(choices, num_experts)
    joint = np.einsum("lti,ltj->lij", hot[:-1], hot[1:])
    return joint / np.maximum(joint.sum(axis=2, keepdims=True), 1e-300)


def token_category(piece: str) -> str:
    """The lexical category of one decoded token of Python source: a keyword, an identifier, a number, whitespace,
    punctuation, or other (mixed pieces such as ' foo(' are classed by their stripped text)."""
    text = piece.strip()
    if not text:
        return "whitespace"
    if keyword.iskeyword(text) or keyword.issoftkeyword(text):
        return "keyword"
    if text.isidentifier():
        return "identifier"
    if text.replace("_", "").replace(".", "", 1).isdigit():
        return "number"
    if all(not c.isalnum() and c != "_" for c in text):
        return "punctuation"
    return "other"


def token_categories(tokenizer, ids: np.ndarray) -> list[str]:
    """The category of each token id, from its text decoded alone."""
    return [token_category(tokenizer.decode([int(i)])) for i in np.asarray(ids).reshape(-1)]


def routing_by_category(choices: np.ndarray, categories: list[str], num_experts: int) -> dict[str, np.ndarray]:
    """{category: [L, E] expert shares over that category's tokens}, for the categories that occur."""
    choices = _check(choices, num_experts)
    if len(categories) != choices.shape[1]:
        raise InvalidInputError(f"{len(categories)} categories for {choices.shape[1]} tokens")
    cats = np.asarray(categories)
    return {c: popularity(choices[:, cats == c], num_experts) for c in CATEGORIES if (cats == c).any()}
