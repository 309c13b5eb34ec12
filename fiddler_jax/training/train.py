"""Training the NNX Mixtral with optax: next-token cross-entropy plus Mixtral's load-balancing loss.

The module is split once (``nnx.split``) into its graph and its float32 ``Param`` state; the step is a plain
``jax.jit`` over (params, optimizer state, batch) with AdamW (warm-up, cosine decay to ``final_lr_fraction``,
global-norm clipping, weight decay on matrices only). Loss = mean next-token NLL + ``aux_loss_coef`` · (mean
over layers of :func:`~fiddler_jax.models.moe.load_balancing_loss`), as transformers' Mixtral computes it.

Two equivalent MoE paths: ``sparse`` runs the model's own forward (grouped ``ragged_dot`` over the experts the
tokens chose); ``dense`` runs every expert on every token and weights by the same top-k routing (E/k times
the FLOPs, but plain dense matmuls). They compute the same function; pick the faster on your hardware.
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from fiddler_jax.models.config import MixtralConfig
from fiddler_jax.models.layers import matmul_precision
from fiddler_jax.models.mixtral import Mixtral
from fiddler_jax.models.moe import expert_ffn, load_balancing_loss, route

MOE_IMPLS = ("sparse", "dense")


class Metrics(NamedTuple):
    loss: jax.Array
    nll: jax.Array
    aux: jax.Array
    grad_norm: jax.Array


def dense_moe(moe, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The MoE block with every expert applied to every token: out_t = Σ_e g_{t,e} FFN_e(x_t), where g is the
    renormalised top-k routing weight (0 for experts not chosen). Same result as ``SparseMoe.__call__``."""
    flat = x.reshape(-1, x.shape[-1])
    router_logits = moe.gate(flat)
    routing = route(router_logits, moe.top_k)
    gates = jnp.sum(jax.nn.one_hot(routing.experts, moe.num_experts, dtype=jnp.float32)
                    * routing.weights[..., None], axis=1)  # [N, E]
    y = jax.vmap(expert_ffn, in_axes=(None, 0, 0, 0))(flat, moe.w1[...], moe.w3[...], moe.w2[...])  # [E, N, h]
    out = jnp.einsum("ne,enh->nh", gates, y, precision=matmul_precision(jnp.float32))
    return out.astype(x.dtype).reshape(x.shape), router_logits


def forward(model: Mixtral, tokens: jax.Array, moe_impl: str = "sparse"):
    """Logits [B, T, V] float32 and the router logits of each layer, for a batch starting at position 0."""
    b, t = tokens.shape
    cache = model.init_cache(b, t)
    if moe_impl == "sparse":
        logits, _, router_logits = model(tokens, cache, 0, return_router_logits=True)
        return logits, router_logits
    if moe_impl != "dense":
        raise ValueError(f"moe_impl must be one of {MOE_IMPLS}, got {moe_impl!r}")
    positions = jnp.arange(t, dtype=jnp.int32)
    start = jnp.int32(0)
    x = model.embed_tokens(tokens)
    router_logits = []
    for layer, kv in zip(model.layers, cache):
        h, _ = layer.attention_block(x, kv, positions, start)
        moe_out, rl = dense_moe(layer.block_sparse_moe, layer.post_attention_layernorm(h))
        x = h + moe_out
        router_logits.append(rl)
    x = model.norm(x)
    logits = model.embed_tokens.attend(x) if model.lm_head is None else model.lm_head(x, out_dtype=jnp.float32)
    return logits, tuple(router_logits)


def token_nll(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """Per-token negative log-likelihood [B, T] (float32)."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]


def loss_fn(params, graphdef, batch, *, aux_coef: float, top_k: int, moe_impl: str):
    model = nnx.merge(graphdef, params)
    logits, router_logits = forward(model, batch[:, :-1], moe_impl)
    nll = jnp.mean(token_nll(logits, batch[:, 1:]))
    aux = jnp.mean(jnp.stack([load_balancing_loss(rl, top_k) for rl in router_logits]))
    return nll + aux_coef * aux, (nll, aux)


def make_optimizer(lr: float, steps: int, warmup_steps: int, final_lr_fraction: float, weight_decay: float,
                   clip_norm: float, b1: float = 0.9, b2: float = 0.95) -> optax.GradientTransformation:
    """AdamW with linear warm-up and cosine decay; weight decay only on parameters with ≥ 2 dimensions."""
    schedule = optax.warmup_cosine_decay_schedule(0.0, lr, max(1, min(warmup_steps, steps - 1)), max(steps, 2),
                                                  end_value=lr * final_lr_fraction)
    decay_mask = functools.partial(jax.tree.map, lambda p: p.ndim >= 2)
    return optax.chain(optax.clip_by_global_norm(clip_norm),
                       optax.adamw(schedule, b1=b1, b2=b2, weight_decay=weight_decay, mask=decay_mask))


def init_model(cfg: MixtralConfig, seed: int) -> Mixtral:
    """Float32 master weights, N(0, initializer_range²) as transformers initialises Mixtral."""
    return Mixtral(cfg, dtype=jnp.float32, rngs=nnx.Rngs(seed))


class Trainer:
    """Holds the split model, the optimizer and the jitted step/eval functions."""

    def __init__(self, model: Mixtral, tx: optax.GradientTransformation, *, aux_coef: float, moe_impl: str):
        if moe_impl not in MOE_IMPLS:
            raise ValueError(f"moe_impl must be one of {MOE_IMPLS}, got {moe_impl!r}")
        self.graphdef, self.params = nnx.split(model, nnx.Param)
        self.tx = tx
        self.opt_state = tx.init(self.params)
        self.top_k = model.config.num_experts_per_tok
        kw = dict(aux_coef=aux_coef, top_k=self.top_k, moe_impl=moe_impl)
        graphdef = self.graphdef

        def step(params, opt_state, batch):
            (loss, (nll, aux)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, graphdef, batch, **kw)
            updates, opt_state = tx.update(grads, opt_state, params)
            params = optax.apply_updates(params, updates)
            return params, opt_state, Metrics(loss, nll, aux, optax.global_norm(grads))

        def eval_nll(params, batch):
            return loss_fn(params, graphdef, batch, **kw)[1][0]

        self._step = jax.jit(step, donate_argnums=(0, 1))
        self._eval = jax.jit(eval_nll)

    def step(self, batch: np.ndarray) -> Metrics:
        self.params, self.opt_state, m = self._step(self.params, self.opt_state, jnp.asarray(batch))
        return m

    def eval_nll(self, windows: np.ndarray, batch_size: int) -> float:
        """Mean next-token NLL over ``windows`` [n, T+1] (batches of ``batch_size``; the last may be smaller)."""
        total, count = 0.0, 0
        for i in range(0, len(windows), batch_size):
            chunk = windows[i:i + batch_size]
            total += float(self._eval(self.params, jnp.asarray(chunk))) * chunk.shape[0] * (chunk.shape[1] - 1)
            count += chunk.shape[0] * (chunk.shape[1] - 1)
        return total / count

    def model(self) -> Mixtral:
        return nnx.merge(self.graphdef, self.params)
