"""Next-token selection from float32 logits: greedy, or temperature + nucleus (top-p) sampling.

Top-p keeps the smallest set of most-probable tokens whose probability mass reaches ``top_p`` (the token that
crosses the threshold is kept, so at least one token always survives), renormalises, and samples.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def greedy(logits: jax.Array) -> jax.Array:
    """argmax over the vocabulary: [B, V] → [B] int32."""
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)


def top_p_filter(logits: jax.Array, top_p: float) -> jax.Array:
    """Set logits outside the nucleus of mass ``top_p`` to -inf (per row of [B, V])."""
    sorted_logits = jnp.sort(logits, axis=-1)[..., ::-1]
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    keep_sorted = mass_before < top_p
    # The smallest kept logit is the threshold: every token at least that likely stays.
    threshold = jnp.min(jnp.where(keep_sorted, sorted_logits, jnp.inf), axis=-1, keepdims=True)
    return jnp.where(logits >= threshold, logits, -jnp.inf)


def sample(logits: jax.Array, key: jax.Array, temperature: float, top_p: float) -> jax.Array:
    """Sample [B] int32 from softmax(logits / temperature) restricted to the top-p nucleus."""
    scaled = logits.astype(jnp.float32) / temperature
    if top_p < 1.0:
        scaled = top_p_filter(scaled, top_p)
    return jax.random.categorical(key, scaled, axis=-1).astype(jnp.int32)
