"""Training the NNX Mixtral with optax: next-token cross-entropy plus Mixtral's load-balancing loss.

The module is split once (``nnx.split``) into its graph and its float32 ``Param`` state; the step is a plain
``jax.jit`` over (params, optimizer state, batch) with AdamW (warm-up, cosine decay to ``final_lr_fraction``,
global-norm clipping, weight decay on matrices only). Loss = mean next-token NLL + ``aux_loss_coef`` · (mean
over layers of :func:`~fiddler_jax.models.moe.load_balancing_loss`), as transformers' Mixtral computes it.

Two equivalent MoE paths, both the model's own forward (``moe_dispatch`` of :class:`~fiddler_jax.models.moe.
SparseMoe`): ``sparse`` (grouped ``ragged_dot`` over the experts the tokens chose) and ``dense`` (every expert
on every token, weighted by the same top-k routing: E/k times the FLOPs, but plain dense matmuls). They compute
the same function; pick the faster on your hardware.
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from fiddler_jax.models.config import ModelConfig
from fiddler_jax.models.causal_lm import MoeForCausalLM
from fiddler_jax.models.moe import load_balancing_loss

MOE_IMPLS = ("sparse", "dense")


class Metrics(NamedTuple):
    loss: jax.Array
    nll: jax.Array
    aux: jax.Array
    grad_norm: jax.Array


def forward(model: MoeForCausalLM, tokens: jax.Array, moe_impl: str = "sparse"):
    """Logits [B, T, V] float32 and the router logits of each layer, for a batch starting at position 0."""
    if moe_impl not in MOE_IMPLS:
        raise ValueError(f"moe_impl must be one of {MOE_IMPLS}, got {moe_impl!r}")
    b, t = tokens.shape
    logits, _, router_logits = model(tokens, model.init_cache(b, t), 0, return_router_logits=True,
                                     moe_dispatch=moe_impl)
    return logits, router_logits


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


def init_model(cfg: ModelConfig, seed: int) -> MoeForCausalLM:
    """Float32 master weights, N(0, initializer_range²) as transformers initialises Mixtral."""
    return MoeForCausalLM(cfg, dtype=jnp.float32, rngs=nnx.Rngs(seed))


class Trainer:
    """Holds the split model, the optimizer and the jitted step/eval functions."""

    def __init__(self, model: MoeForCausalLM, tx: optax.GradientTransformation, *, aux_coef: float, moe_impl: str):
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

    def model(self) -> MoeForCausalLM:
        return nnx.merge(self.graphdef, self.params)
