"""What quantised experts do to a model's outputs: held-out perplexity, routing and greedy continuations of a model
whose routed experts are replaced by their dequantised int8 / int4 weights (:mod:`fiddler_jax.models.quantization`),
against the same model at its own precision.

The model runs in float32 with each expert matrix W replaced by W' = dequantize(quantize(W)), exactly the
weights a quantised lane computes with (the CPU kernel and the GPU expert FFN must reproduce them), so these
numbers are the accuracy cost of the format itself. The router, attention and shared experts are not quantised.
Measured over the same held-out windows and prompts:
  * perplexity: exp(mean token NLL) over the windows' targets, and its change against the reference;
  * routing change: the fraction of (token, MoE layer) whose top-k expert set differs from the reference's (the
    hidden states drift, so later layers may route differently);
  * greedy agreement: the fraction of generated positions equal to the reference's continuation, and the
    fraction of prompts whose whole continuation is equal.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from fiddler_jax.models import quantization as Q

MATRICES = ("w1", "w3", "w2")


def routed_expert_weights(model) -> list[tuple[object, dict[str, np.ndarray]]]:
    """(MoE module, {"w1", "w3", "w2": float32 numpy [E, out, in]}) of every layer with routed experts."""
    found = []
    for layer in model.layers:
        if getattr(layer, "is_sparse", False):
            found.append((layer.mlp, {w: np.asarray(getattr(layer.mlp, w).value, np.float32) for w in MATRICES}))
    return found


def set_expert_precision(experts, precision: str, group: int = Q.DEFAULT_INT4_GROUP) -> int:
    """Give every routed expert of ``experts`` (:func:`routed_expert_weights`) the dequantised weights of
    ``precision`` ("bf16": the saved weights back). Returns the stored bytes of one expert at that precision."""
    Q.check_precision(precision, group)
    for moe, saved in experts:
        for name in MATRICES:
            w = saved[name]
            new = w if precision == "bf16" else np.stack([Q.dequantize(Q.quantize(m, precision, group)) for m in w])
            param = getattr(moe, name)
            param.value = jnp.asarray(new, param.value.dtype)
    if not experts:
        return 0
    first = experts[0][1]  # every routed expert of a model has one geometry
    return sum(Q.expert_matrix_bytes(*first[name].shape[1:], precision, group) for name in MATRICES)


@functools.partial(jax.jit, static_argnums=1)
def _window_stats(model_state, graphdef, tokens):
    from flax import nnx

    from fiddler_jax.training.train import forward, token_nll

    model = nnx.merge(graphdef, model_state)
    logits, router_logits = forward(model, tokens[:, :-1], "sparse")
    nll = jnp.sum(token_nll(logits, tokens[:, 1:]))
    top_k = model.config.num_experts_per_tok
    chosen = [jnp.sort(jax.lax.top_k(r.astype(jnp.float32), top_k)[1], axis=-1) for r in router_logits]
    return nll, jnp.stack(chosen)


def measure(model, windows: np.ndarray, prompts: np.ndarray, new_tokens: int, batch_size: int = 8) -> dict:
    """The model's summed NLL and target count over ``windows`` [n, T + 1], its top-k sets [L, n·T, k] and its
    greedy continuations of ``prompts`` [P, t] (``new_tokens`` each)."""
    from flax import nnx

    from fiddler_jax.runtime.generate import generate

    graphdef, state = nnx.split(model)
    nll, sets = 0.0, []
    for i in range(0, len(windows), batch_size):
        part_nll, chosen = _window_stats(state, graphdef, jnp.asarray(windows[i:i + batch_size]))
        nll += float(part_nll)
        sets.append(np.asarray(chosen).reshape(len(chosen), -1, chosen.shape[-1]))
    continuations = generate(model, prompts, new_tokens, eos_token_id=[])[:, prompts.shape[1]:]
    return {"nll": nll, "targets": int(windows.shape[0] * (windows.shape[1] - 1)),
            "sets": np.concatenate(sets, axis=1), "greedy": np.asarray(continuations)}


def compare(reference: dict, variant: dict) -> dict:
    """Perplexity of both, its relative change, routing change and greedy agreement (module docstring)."""
    ppl_ref = math.exp(reference["nll"] / reference["targets"])
    ppl = math.exp(variant["nll"] / variant["targets"])
    changed = (reference["sets"] != variant["sets"]).any(axis=-1)  # [L, tokens]
    same = reference["greedy"] == variant["greedy"]
    return {"perplexity": ppl, "reference_perplexity": ppl_ref, "perplexity_change": ppl / ppl_ref - 1,
            "routing_change": float(changed.mean()),
            "routing_change_per_layer": [round(float(c), 5) for c in changed.mean(axis=1)],
            "greedy_token_agreement": float(same.mean()), "greedy_prompts_equal": float(same.all(axis=1).mean())}
