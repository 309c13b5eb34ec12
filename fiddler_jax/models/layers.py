"""The dense building blocks of the MoE families as Flax NNX modules: linear maps in HF layout (optionally with a
bias), RMSNorm, rotary position embeddings, grouped-query attention (with the families' query/key norms) over a
static-shape KV cache, and the dense SwiGLU MLP.

Weights keep the Hugging Face layout (``weight[out, in]``) so a checkpoint tensor is loaded as it is and a
linear map computes ``x @ weight.T``. In float32 the matrix products run at ``Precision.HIGHEST`` (no TF32 on
GPUs), which is what parity with transformers needs; in bfloat16 they run at the default precision with float32
accumulation where it matters (attention scores, softmax, RMSNorm statistics).
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx


def matmul_precision(dtype) -> jax.lax.Precision:
    """HIGHEST for float32 parameters (exact float32 products), DEFAULT otherwise."""
    return jax.lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else jax.lax.Precision.DEFAULT


def normal_init(rngs: nnx.Rngs, shape, std: float, dtype) -> jax.Array:
    """N(0, std²) initialisation, as transformers' ``_init_weights`` for Mixtral."""
    return (std * jax.random.normal(rngs.params(), shape, jnp.float32)).astype(dtype)


class Linear(nnx.Module):
    """``y = x @ weight.T (+ bias)`` with ``weight[out_features, in_features]`` (HF layout)."""

    def __init__(self, in_features: int, out_features: int, *, dtype, std: float, rngs: nnx.Rngs,
                 bias: bool = False):
        self.weight = nnx.Param(normal_init(rngs, (out_features, in_features), std, dtype))
        self.bias = nnx.Param(jnp.zeros((out_features,), dtype)) if bias else None

    def __call__(self, x: jax.Array, out_dtype=None) -> jax.Array:
        w = self.weight[...]
        y = jnp.einsum("...i,oi->...o", x, w, precision=matmul_precision(w.dtype),
                       preferred_element_type=out_dtype or w.dtype)
        return y if self.bias is None else y + self.bias[...].astype(y.dtype)


class Embed(nnx.Module):
    """Token embedding table ``weight[vocab, hidden]``; ``attend`` is the tied LM head."""

    def __init__(self, vocab_size: int, hidden_size: int, *, dtype, std: float, rngs: nnx.Rngs):
        self.weight = nnx.Param(normal_init(rngs, (vocab_size, hidden_size), std, dtype))

    def __call__(self, tokens: jax.Array) -> jax.Array:
        return jnp.take(self.weight[...], tokens, axis=0)

    def attend(self, x: jax.Array) -> jax.Array:
        w = self.weight[...]
        return jnp.einsum("...h,vh->...v", x, w, precision=matmul_precision(w.dtype),
                          preferred_element_type=jnp.float32)


class RMSNorm(nnx.Module):
    """``weight * x / sqrt(mean(x²) + eps)``, statistics in float32, result cast back before the scale (as HF)."""

    def __init__(self, size: int, eps: float, *, dtype):
        self.weight = nnx.Param(jnp.ones((size,), dtype))
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return self.weight[...] * normed.astype(x.dtype)


def rope_tables(positions: jax.Array, head_dim: int, theta: float) -> tuple[jax.Array, jax.Array]:
    """cos/sin tables [..., head_dim] for ``positions`` [...] (e.g. [B, T]: each row's own positions):
    frequency i = theta^(-2i/head_dim), the two halves of the head repeat the same frequencies (the HF
    "rotate_half" convention), all in float32."""
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    freqs = positions.astype(jnp.float32)[..., None] * inv_freq
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate ``x`` [B, T, heads, D] by position: ``x*cos + rotate_half(x)*sin``, with tables [B, T, D]."""
    half = x.shape[-1] // 2
    x32 = x.astype(jnp.float32)
    rotated = jnp.concatenate([-x32[..., half:], x32[..., :half]], axis=-1)
    out = x32 * cos[:, :, None, :] + rotated * sin[:, :, None, :]
    return out.astype(x.dtype)


class LayerKV(NamedTuple):
    """One layer's KV cache: keys and values [B, S, kv_heads, head_dim] for S cache slots (static shape), and
    ``pad`` [B] int32, the slots each row's left padding takes: row b's sequence starts at slot ``pad[b]``, so
    its token in slot s is at position ``s - pad[b]`` and slots before ``pad[b]`` are never attended to. A batch
    of prompts of different lengths is left-padded to one length (transformers' layout), so every row writes
    its next token into the same slot."""

    k: jax.Array
    v: jax.Array
    pad: jax.Array


def attention_mask(q_slots: jax.Array, cache_len: int, sliding_window: int | None, pad: jax.Array) -> jax.Array:
    """[B, T, S] boolean: the query in slot q of row b sees cache slot s iff ``pad[b] <= s <= q`` and, with a
    sliding window w, s > q - w (the transformers Mixtral rule; slot differences are position differences)."""
    s = jnp.arange(cache_len)[None, None, :]
    q = q_slots[None, :, None]
    allowed = (s <= q) & (s >= pad[:, None, None])
    if sliding_window is not None:
        allowed = allowed & (s > q - sliding_window)
    return allowed


class Attention(nnx.Module):
    """Grouped-query attention with RoPE. New keys/values are written into the cache at ``start`` and every
    query attends over all cache slots through :func:`attention_mask`, so prefill and one-token decode are the
    same code with static shapes. Before RoPE, the config's ``qk_norm`` normalises the queries and keys: "head"
    (RMSNorm over each head's head_dim values, Qwen3-MoE) or "projection" (RMSNorm over the whole projection,
    OLMoE, followed by the ``clip_qkv`` clamp of q, k and v when set)."""

    def __init__(self, cfg, *, dtype, rngs: nnx.Rngs):
        h, d, std = cfg.hidden_size, cfg.head_dim, cfg.initializer_range
        self.num_heads = cfg.num_attention_heads
        self.num_kv_heads = cfg.num_key_value_heads
        self.head_dim = d
        self.rope_theta = cfg.rope_theta
        self.sliding_window = cfg.sliding_window
        self.qk_norm = cfg.qk_norm
        self.clip_qkv = cfg.clip_qkv
        bias = cfg.qkv_bias
        self.q_proj = Linear(h, self.num_heads * d, dtype=dtype, std=std, rngs=rngs, bias=bias)
        self.k_proj = Linear(h, self.num_kv_heads * d, dtype=dtype, std=std, rngs=rngs, bias=bias)
        self.v_proj = Linear(h, self.num_kv_heads * d, dtype=dtype, std=std, rngs=rngs, bias=bias)
        self.o_proj = Linear(self.num_heads * d, h, dtype=dtype, std=std, rngs=rngs, bias=cfg.o_bias)
        if cfg.qk_norm == "head":
            self.q_norm = RMSNorm(d, cfg.rms_norm_eps, dtype=dtype)
            self.k_norm = RMSNorm(d, cfg.rms_norm_eps, dtype=dtype)
        elif cfg.qk_norm == "projection":
            self.q_norm = RMSNorm(self.num_heads * d, cfg.rms_norm_eps, dtype=dtype)
            self.k_norm = RMSNorm(self.num_kv_heads * d, cfg.rms_norm_eps, dtype=dtype)
        else:
            self.q_norm = self.k_norm = None

    def __call__(self, x: jax.Array, kv: LayerKV, positions: jax.Array, start: jax.Array):
        """x [B, T, hidden] written into cache slots ``positions`` [T] = start + arange(T) (row b's positions are
        those minus ``kv.pad[b]``). Returns (out [B, T, hidden], updated cache)."""
        b, t, _ = x.shape
        d, kvh = self.head_dim, self.num_kv_heads
        group = self.num_heads // kvh
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        if self.qk_norm == "projection":
            q, k = self.q_norm(q), self.k_norm(k)
        if self.clip_qkv is not None:
            q, k, v = (jnp.clip(a, -self.clip_qkv, self.clip_qkv) for a in (q, k, v))
        q = q.reshape(b, t, self.num_heads, d)
        k = k.reshape(b, t, kvh, d)
        v = v.reshape(b, t, kvh, d)
        if self.qk_norm == "head":
            q, k = self.q_norm(q), self.k_norm(k)
        cos, sin = rope_tables(positions[None, :] - kv.pad[:, None], d, self.rope_theta)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        zero = jnp.zeros((), jnp.int32)
        start = jnp.asarray(start, jnp.int32)
        k_all = jax.lax.dynamic_update_slice(kv.k, k.astype(kv.k.dtype), (zero, start, zero, zero))
        v_all = jax.lax.dynamic_update_slice(kv.v, v.astype(kv.v.dtype), (zero, start, zero, zero))
        prec = matmul_precision(x.dtype)
        qg = q.reshape(b, t, kvh, group, d)
        scores = jnp.einsum("btkgd,bskd->bkgts", qg, k_all, precision=prec,
                            preferred_element_type=jnp.float32) * (d ** -0.5)
        mask = attention_mask(positions, k_all.shape[1], self.sliding_window, kv.pad)
        scores = jnp.where(mask[:, None, None], scores, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(scores, axis=-1).astype(x.dtype)
        out = jnp.einsum("bkgts,bskd->btkgd", probs, v_all, precision=prec, preferred_element_type=x.dtype)
        return self.o_proj(out.reshape(b, t, self.num_heads * d)), LayerKV(k_all, v_all, kv.pad)


class DenseMlp(nnx.Module):
    """The dense SwiGLU MLP of a non-MoE layer (and of a shared expert): down(silu(gate(x)) ⊙ up(x)), the
    products accumulated in float32 as the experts' are."""

    def __init__(self, hidden: int, ffn: int, *, dtype, std: float, rngs: nnx.Rngs):
        self.gate_proj = Linear(hidden, ffn, dtype=dtype, std=std, rngs=rngs)
        self.up_proj = Linear(hidden, ffn, dtype=dtype, std=std, rngs=rngs)
        self.down_proj = Linear(ffn, hidden, dtype=dtype, std=std, rngs=rngs)

    def __call__(self, x: jax.Array, out_dtype=None) -> jax.Array:
        f32 = jnp.float32
        act = jax.nn.silu(self.gate_proj(x, out_dtype=f32)) * self.up_proj(x, out_dtype=f32)
        return self.down_proj(act.astype(self.down_proj.weight.dtype), out_dtype=out_dtype or x.dtype)
