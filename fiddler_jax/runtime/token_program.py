"""A whole forward pass as one jitted program, for passes whose every layer step needs no host decision.

When each layer of a pass is fused (every expert resident) or streamed (its plan is known before its routing:
:mod:`fiddler_jax.runtime.lanes.streamed`) -- single-token decode, typically -- nothing the host computes depends
on the pass's data, so the whole pass is one program: embed, then per layer either the fused layer, or attention
and the router, the streamed CPU lane begun, the resident experts' mix, the CPU lane ended, then the head. One
dispatch instead of about three per layer, so the device's queue never waits for the host's Python between
layers (on the H100 machine a decode step's GPU spans were mostly such waits while the kernel's threads held the
cores; docs/results/2026-12-07_1cfcc77).

Order inside the program. The begin and the end are custom calls with side effects, the mix is pure: XLA may
put the mix anywhere their data allows. Two ``optimization_barrier``s fix begin -> mix -> end: the mix reads its
inputs through a barrier with the begin's ticket, and the end reads the ticket through a barrier with the mix's
output. So on the GPU's stream the host runs the offloaded experts while the GPU runs the resident ones, as the
per-layer dispatches do.

The program is compiled once per (layer structure, streamed layers, tokens, last_only) and computes the functions
the step loop's per-layer pieces compute, of the same arrays. In float32 it gives their numbers exactly; in bf16 up
to bf16 rounding, since XLA compiles the whole pass as one computation (other fusions; a bf16 value a per-layer
piece stores may stay float32 inside the program: XLA's default "excess precision"). On a random bf16 Qwen2-MoE
of the tests: the same greedy tokens, and logits at most 1.4e-2 (0.6% of the largest logit) from the per-layer
ones (tests/test_engine_families.py); on the tests' other models, the same bits.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from fiddler_jax.runtime.segments import Split, attend_and_route, final_logits, fused_step, mix_with_base


@functools.cache
def token_program(layer_keys: tuple, embed_key, norm_key, head_key, streamed: tuple[bool, ...],
                  mixes: tuple[bool, ...], last_only: bool):
    """The jitted pass for this structure. ``layer_keys``: each layer's Split key; ``streamed[l]``: layer l is a
    streamed step (else fused); ``mixes[l]``: a streamed layer has resident experts to mix."""

    @functools.partial(jax.jit, donate_argnums=(4,))
    def run(embed_leaves, norm_leaves, head_leaves, layer_leaves, kv, tokens, start, residents, table_ids):
        from fiddler_jax.kernels.streamed_lane import streamed_cpu_begin, streamed_cpu_end

        embed = Split.merge(embed_key, embed_leaves)
        pending = (embed(tokens),)
        new_kv = []
        for layer, key in enumerate(layer_keys):
            module = Split.merge(key, layer_leaves[layer])
            if not streamed[layer]:
                x, cache = fused_step(module, pending, kv[layer], start)
                pending = (x,)
                new_kv.append(cache)
                continue
            h, moe_in, routing, shared, _, cache = attend_and_route(module, pending, kv[layer], start)
            ticket = streamed_cpu_begin(moe_in, routing.experts, routing.weights, table_ids[layer])
            ticket, moe_in, routing = jax.lax.optimization_barrier((ticket, moe_in, routing))
            if mixes[layer]:
                gpu = mix_with_base(moe_in, routing, *residents[layer], shared)
            else:
                gpu = jnp.zeros(moe_in.shape, jnp.float32) if shared is None else shared
            ticket, gpu = jax.lax.optimization_barrier((ticket, gpu))
            pending = (h, gpu, streamed_cpu_end(ticket, *moe_in.shape))
            new_kv.append(cache)
        logits = final_logits(embed, Split.merge(norm_key, norm_leaves),
                              None if head_key is None else Split.merge(head_key, head_leaves), pending, last_only)
        return logits, tuple(new_kv)

    return run
