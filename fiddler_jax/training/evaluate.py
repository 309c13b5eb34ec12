"""Quality measurements of a trained tiny Mixtral: held-out perplexity against a unigram baseline on the same
tokens, and per-layer routing statistics over held-out tokens.

Routing statistics of one layer, from the top-k assignments of N tokens (N·k assignments in all):
  * ``share[e]``     = assignments to expert e / (N·k)                      (uniform: 1/E)
  * ``imbalance``    = max_e share / min_e share                             (uniform: 1)
  * ``load_entropy`` = H(share) / log E                                      (uniform load: 1)
  * ``router_entropy`` = mean over tokens of H(softmax(router logits)) / log E: near 1 for a router that has
    not learned anything (random init spreads every token evenly), well below 1 when tokens are routed decisively
  * ``min_token_fraction`` = min_e (tokens that use e / N)  (= k · min share)
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from fiddler_jax.models.causal_lm import MoeForCausalLM
from fiddler_jax.training.train import forward, token_nll


def unigram_perplexity(train_stream: np.ndarray, targets: np.ndarray, vocab_size: int) -> float:
    """Perplexity of ``targets`` under token frequencies of ``train_stream`` (add-one smoothing)."""
    counts = np.bincount(train_stream.astype(np.int64), minlength=vocab_size).astype(np.float64) + 1.0
    logp = np.log(counts / counts.sum())
    return float(np.exp(-logp[targets.astype(np.int64)].mean()))


def _batch_stats(graphdef, params, batch, top_k: int):
    model = nnx.merge(graphdef, params)
    logits, router_logits = forward(model, batch[:, :-1], "sparse")
    nll = jnp.sum(token_nll(logits, batch[:, 1:]))
    counts, entropy = [], []
    for rl in router_logits:
        probs = jax.nn.softmax(rl.astype(jnp.float32), axis=-1)
        _, experts = jax.lax.top_k(probs, top_k)
        counts.append(jnp.sum(jax.nn.one_hot(experts, rl.shape[-1], dtype=jnp.int32), axis=(0, 1)))
        entropy.append(-jnp.sum(probs * jnp.log(jnp.clip(probs, 1e-30))))
    return nll, jnp.stack(counts), jnp.stack(entropy)


_batch_stats_jit = jax.jit(_batch_stats, static_argnums=(0, 3))


def routing_stats(counts: np.ndarray, entropy_sum: np.ndarray, num_tokens: int, top_k: int) -> list[dict]:
    """Per-layer statistics (see module docstring) from assignment counts [L, E] and summed router entropy [L]."""
    out = []
    num_experts = counts.shape[1]
    for layer, (c, h) in enumerate(zip(counts, entropy_sum)):
        share = c / c.sum()
        nz = share[share > 0]
        out.append({
            "layer": layer,
            "share": [round(float(s), 4) for s in share],
            "imbalance": float(share.max() / share.min()) if share.min() > 0 else math.inf,
            "load_entropy": float(-(nz * np.log(nz)).sum() / math.log(num_experts)),
            "router_entropy": float(h / num_tokens / math.log(num_experts)),
            "min_share": float(share.min()),
            "min_token_fraction": float(share.min() * top_k),
        })
    return out


def evaluate(model: MoeForCausalLM, windows: np.ndarray, train_stream: np.ndarray, batch_size: int = 16) -> dict:
    """Held-out NLL/perplexity of ``model`` on ``windows`` [n, T+1], the unigram baseline on the same target
    tokens, and per-layer routing statistics over the same tokens."""
    cfg = model.config
    graphdef, params = nnx.split(model, nnx.Param)
    total_nll, counts, entropy = 0.0, 0, 0
    for i in range(0, len(windows), batch_size):
        chunk = jnp.asarray(windows[i:i + batch_size])
        nll, c, h = _batch_stats_jit(graphdef, params, chunk, cfg.num_experts_per_tok)
        total_nll += float(nll)
        counts = counts + np.asarray(c, np.int64)
        entropy = entropy + np.asarray(h, np.float64)
    n = windows.shape[0] * (windows.shape[1] - 1)
    nll = total_nll / n
    return {
        "heldout_tokens": int(n),
        "heldout_nll": nll,
        "heldout_perplexity": math.exp(nll),
        "unigram_perplexity": unigram_perplexity(train_stream, windows[:, 1:], cfg.vocab_size),
        "routing": routing_stats(counts, entropy, n, cfg.num_experts_per_tok),
    }
