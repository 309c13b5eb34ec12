"""The Mixtral causal LM as a Flax NNX module (attribute names mirror the HF checkpoint names).

Forward pass over a static-shape KV cache: embed → for each decoder layer
``h = x + attn(input_layernorm(x))``, ``x = h + moe(post_attention_layernorm(h))`` → final norm → LM head
(tied to the embedding when ``tie_word_embeddings``). Logits come out in float32.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from fiddler_jax.models.config import MixtralConfig
from fiddler_jax.models.layers import Attention, Embed, LayerKV, Linear, RMSNorm
from fiddler_jax.models.moe import SparseMoe

KVCache = tuple  # tuple[LayerKV, ...], one per layer


class DecoderLayer(nnx.Module):
    """Pre-norm attention block followed by a pre-norm sparse-MoE block, each with a residual."""

    def __init__(self, cfg: MixtralConfig, *, dtype, rngs: nnx.Rngs):
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype=dtype)
        self.self_attn = Attention(cfg, dtype=dtype, rngs=rngs)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype=dtype)
        self.block_sparse_moe = SparseMoe(cfg, dtype=dtype, rngs=rngs)

    def attention_block(self, x, kv: LayerKV, positions, start):
        """x + attention(norm(x)); returns (h, updated cache)."""
        attn, kv = self.self_attn(self.input_layernorm(x), kv, positions, start)
        return x + attn, kv

    def __call__(self, x, kv: LayerKV, positions, start, moe_dispatch: str = "sparse"):
        h, kv = self.attention_block(x, kv, positions, start)
        moe_out, router_logits = self.block_sparse_moe(self.post_attention_layernorm(h), moe_dispatch)
        return h + moe_out, kv, router_logits


class Mixtral(nnx.Module):
    """MixtralForCausalLM. ``dtype`` is the dtype of parameters and activations (float32 or bfloat16)."""

    def __init__(self, cfg: MixtralConfig, *, dtype=jnp.float32, rngs: nnx.Rngs):
        self.config = cfg
        self.dtype = jnp.dtype(dtype)
        self.embed_tokens = Embed(cfg.vocab_size, cfg.hidden_size, dtype=dtype, std=cfg.initializer_range,
                                  rngs=rngs)
        self.layers = nnx.List([DecoderLayer(cfg, dtype=dtype, rngs=rngs) for _ in range(cfg.num_hidden_layers)])
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype=dtype)
        self.lm_head = None if cfg.tie_word_embeddings else Linear(
            cfg.hidden_size, cfg.vocab_size, dtype=dtype, std=cfg.initializer_range, rngs=rngs)

    def init_cache(self, batch: int, length: int) -> KVCache:
        """An empty KV cache of ``length`` slots per sequence, in the model's dtype."""
        c = self.config
        shape = (batch, length, c.num_key_value_heads, c.head_dim)
        return tuple(LayerKV(jnp.zeros(shape, self.dtype), jnp.zeros(shape, self.dtype))
                     for _ in range(c.num_hidden_layers))

    def __call__(self, tokens: jax.Array, cache: KVCache, start, *, return_router_logits: bool = False,
                 moe_dispatch: str = "sparse"):
        """tokens [B, T] int at absolute positions start..start+T-1, written into ``cache``.

        Returns (logits [B, T, vocab] float32, updated cache) and, if asked, the router logits of each layer
        (a tuple of [B·T, E] arrays, for routing statistics and the load-balancing loss). ``moe_dispatch`` is
        passed to :meth:`SparseMoe.__call__` ("dense" is for training)."""
        start = jnp.asarray(start, jnp.int32)
        positions = start + jnp.arange(tokens.shape[1], dtype=jnp.int32)
        x = self.embed_tokens(tokens)
        new_cache, router_logits = [], []
        for layer, kv in zip(self.layers, cache):
            x, kv, rl = layer(x, kv, positions, start, moe_dispatch)
            new_cache.append(kv)
            router_logits.append(rl)
        x = self.norm(x)
        logits = self.embed_tokens.attend(x) if self.lm_head is None else self.lm_head(x, out_dtype=jnp.float32)
        if return_router_logits:
            return logits, tuple(new_cache), tuple(router_logits)
        return logits, tuple(new_cache)
