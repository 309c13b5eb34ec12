"""The MoE causal LM of every supported family (Mixtral, Qwen3-MoE, OLMoE, Qwen2-MoE) as one Flax NNX module.

Forward pass over a static-shape KV cache: embed → for each decoder layer
``h = x + attn(input_layernorm(x))``, ``x = h + mlp(post_attention_layernorm(h))`` → final norm → LM head
(tied to the embedding when ``tie_word_embeddings``). A layer's ``mlp`` is a :class:`SparseMoe` (routed experts,
and a shared expert where the family has one) or, for the dense layers of Qwen's ``mlp_only_layers``, a
:class:`DenseMlp`. Attribute names are the families' common ones; :mod:`checkpoint` maps them to each family's
checkpoint names. Logits come out in float32.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from fiddler_jax.models.config import ModelConfig
from fiddler_jax.models.layers import Attention, DenseMlp, Embed, LayerKV, Linear, RMSNorm
from fiddler_jax.models.moe import SparseMoe

KVCache = tuple  # tuple[LayerKV, ...], one per layer


class DecoderLayer(nnx.Module):
    """Pre-norm attention block followed by a pre-norm MLP block (sparse MoE or dense), each with a residual."""

    def __init__(self, cfg: ModelConfig, layer: int, *, dtype, rngs: nnx.Rngs):
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype=dtype)
        self.self_attn = Attention(cfg, dtype=dtype, rngs=rngs)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype=dtype)
        if cfg.is_sparse(layer):
            self.mlp = SparseMoe(cfg, dtype=dtype, rngs=rngs)
        else:
            self.mlp = DenseMlp(cfg.hidden_size, cfg.intermediate_size, dtype=dtype, std=cfg.initializer_range,
                                rngs=rngs)

    @property
    def is_sparse(self) -> bool:
        return isinstance(self.mlp, SparseMoe)

    def attention_block(self, x, kv: LayerKV, positions, start):
        """x + attention(norm(x)); returns (h, updated cache)."""
        attn, kv = self.self_attn(self.input_layernorm(x), kv, positions, start)
        return x + attn, kv

    def __call__(self, x, kv: LayerKV, positions, start, moe_dispatch: str = "sparse"):
        """(output, cache, router logits [N, E] -- None for a dense layer)."""
        h, kv = self.attention_block(x, kv, positions, start)
        normed = self.post_attention_layernorm(h)
        if not self.is_sparse:
            return h + self.mlp(normed), kv, None
        moe_out, router_logits = self.mlp(normed, moe_dispatch)
        return h + moe_out, kv, router_logits


class MoeForCausalLM(nnx.Module):
    """The causal LM of ``cfg``'s family. ``dtype`` is the dtype of parameters and activations (float32 or
    bfloat16)."""

    def __init__(self, cfg: ModelConfig, *, dtype=jnp.float32, rngs: nnx.Rngs):
        self.config = cfg
        self.dtype = jnp.dtype(dtype)
        self.embed_tokens = Embed(cfg.vocab_size, cfg.hidden_size, dtype=dtype, std=cfg.initializer_range,
                                  rngs=rngs)
        self.layers = nnx.List([DecoderLayer(cfg, n, dtype=dtype, rngs=rngs) for n in range(cfg.num_hidden_layers)])
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype=dtype)
        self.lm_head = None if cfg.tie_word_embeddings else Linear(
            cfg.hidden_size, cfg.vocab_size, dtype=dtype, std=cfg.initializer_range, rngs=rngs)

    def init_cache(self, batch: int, length: int, pad=None) -> KVCache:
        """An empty KV cache of ``length`` slots per sequence, in the model's dtype; ``pad`` [batch]: each row's
        left padding in slots (:class:`LayerKV`; default none)."""
        c = self.config
        shape = (batch, length, c.num_key_value_heads, c.head_dim)
        pad = np.zeros(batch, np.int32) if pad is None else np.asarray(pad, np.int32).reshape(batch)
        return tuple(LayerKV(jnp.zeros(shape, self.dtype), jnp.zeros(shape, self.dtype), jnp.array(pad))
                     for _ in range(c.num_hidden_layers))  # a pad array per layer: a cache is donated whole

    def __call__(self, tokens: jax.Array, cache: KVCache, start, *, return_router_logits: bool = False,
                 moe_dispatch: str = "sparse"):
        """tokens [B, T] int written into cache slots start..start+T-1 (row b's positions are those minus its left
        padding, ``cache[l].pad[b]``).

        Returns (logits [B, T, vocab] float32, updated cache) and, if asked, the router logits of each MoE layer
        (a tuple of [B·T, E] arrays in layer order, dense layers left out: for routing statistics and the
        load-balancing loss). ``moe_dispatch`` is passed to :meth:`SparseMoe.__call__` ("dense" is for
        training)."""
        start = jnp.asarray(start, jnp.int32)
        positions = start + jnp.arange(tokens.shape[1], dtype=jnp.int32)
        x = self.embed_tokens(tokens)
        new_cache, router_logits = [], []
        for layer, kv in zip(self.layers, cache):
            x, kv, rl = layer(x, kv, positions, start, moe_dispatch)
            new_cache.append(kv)
            if rl is not None:
                router_logits.append(rl)
        x = self.norm(x)
        logits = self.embed_tokens.attend(x) if self.lm_head is None else self.lm_head(x, out_dtype=jnp.float32)
        if return_router_logits:
            return logits, tuple(new_cache), tuple(router_logits)
        return logits, tuple(new_cache)


Mixtral = MoeForCausalLM  # the Mixtral-only releases' name (``fiddler_jax.Mixtral``)
