"""Seeded random weights of a MoE model made in memory, split between device and host like a loaded checkpoint.

For benchmarks on machines without the checkpoint (``model=mixtral_8x7b_random``, ``qwen3_30b_a3b_random``, ``olmoe_random``): the exact geometry, random
values, nothing written to disk. Every tensor is a pure function of (seed, its name), so expert (l, e) has the
same weights whether it is resident or offloaded, and budgets compare the same model:
  * experts: normal(0, initializer_range) in float32, or, in bfloat16, random bits with the exponent fixed so
    |w| ∈ [2^-7, 2^-6) (the same scale, generated at memory speed: :func:`fiddler_jax.random_bits.random_bf16`);
  * other weights: normal(0, initializer_range); norms: 1.
``router_bias`` > 0 skews routing the way trained routers do (speed does not depend on weight values; routing
does): the embedding's last feature is set to 1 for every token — a constant direction that survives in the
residual stream, about sqrt(hidden) after the norm — and expert e's router row gets
``router_bias · (1 − e/(E−1)) / sqrt(hidden)`` on that feature: a logit boost of about router_bias·(1 − e/(E−1)),
so low-numbered experts win more often. Compare it with the spread of the random router logits,
initializer_range·sqrt(hidden) (1.28 for Mixtral-8x7B); the bench records the routing counts it produced. 0 gives
the near-uniform routing of random weights.
"""
from __future__ import annotations

import hashlib

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx

from fiddler_jax.models.checkpoint import _params, expert_name, hf_names, resolve_dtype
from fiddler_jax.models.config import ModelConfig
from fiddler_jax.models.causal_lm import MoeForCausalLM
from fiddler_jax.random_bits import random_bf16


def _rng(seed: int, name: str) -> np.random.Generator:
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little"))


def random_tensor(name: str, shape: tuple[int, ...], dtype, seed: int, std: float) -> np.ndarray:
    """The tensor called ``name`` (HF name) of the seeded random model."""
    dtype = np.dtype(resolve_dtype(dtype))
    rng = _rng(seed, name)
    if name.endswith("norm.weight"):
        return np.ones(shape, dtype)
    if dtype == np.dtype(ml_dtypes.bfloat16) and ".experts." in name:
        return random_bf16(rng, shape)
    return (rng.standard_normal(shape, dtype=np.float32) * np.float32(std)).astype(dtype)


class RandomExperts:
    """``source(layer, expert)`` → {"w1", "w3", "w2"} of the seeded random model (for ``HostExperts.pin``)."""

    def __init__(self, cfg: ModelConfig, dtype, seed: int):
        self.cfg, self.dtype, self.seed = cfg, dtype, seed

    def __call__(self, layer: int, expert: int) -> dict[str, np.ndarray]:
        h, f = self.cfg.hidden_size, self.cfg.moe_intermediate_size
        shapes = {"w1": (f, h), "w3": (f, h), "w2": (h, f)}
        return {w: random_tensor(expert_name(self.cfg, layer, expert, w), s, self.dtype, self.seed,
                                 self.cfg.initializer_range)
                for w, s in shapes.items()}


def random_split_model(cfg: ModelConfig, dtype="bfloat16", *, resident: np.ndarray, seed: int = 0,
                       router_bias: float = 0.0, store=None) -> tuple[MoeForCausalLM, RandomExperts]:
    """The seeded random model with only the ``resident`` experts (bool [layers, experts]) on the device, and
    the source of the offloaded ones (module docstring). ``store``: as :func:`checkpoint.load_split`'s."""
    dtype = resolve_dtype(dtype)
    resident = np.asarray(resident, bool)
    model = nnx.eval_shape(lambda: MoeForCausalLM(cfg, dtype=dtype, rngs=nnx.Rngs(0)))
    experts = RandomExperts(cfg, dtype, seed)
    E = cfg.num_experts
    for path, param in _params(model):
        names = hf_names(path, cfg)
        if len(names) > 1:  # an expert stack: its resident rows
            layer, weight = int(path[1]), str(path[-1])
            rows = [experts(layer, e)[weight] for e in np.flatnonzero(resident[layer])]
            shape = (0,) + tuple(param.shape[1:])
            if not rows:
                param.value = jnp.zeros(shape, dtype)
            else:
                param.value = jax.device_put(np.stack(rows)) if store is None else store(jax.device_put(np.stack(rows)))
            continue
        value = random_tensor(names[0], tuple(param.shape), dtype, seed, cfg.initializer_range)
        if router_bias and names[0] == "model.embed_tokens.weight":
            value[:, -1] = 1
        if router_bias and tuple(map(str, path[2:4])) == ("mlp", "gate"):
            # the normed constant feature is about sqrt(hidden): the logit boost is about router_bias·(1 − e/(E−1))
            value[:, -1] = router_bias * (1 - np.arange(E) / max(E - 1, 1)) / np.sqrt(cfg.hidden_size)
        param.value = jax.device_put(value)
    return model, experts
