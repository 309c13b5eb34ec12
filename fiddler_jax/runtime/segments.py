"""The jitted pieces of a forward pass, each compiled once per layer structure and never again for a new plan.

Parameters travel as a :class:`Split`'s flat list of arrays (``leaves``); the pieces are:
  * ``embed`` and ``head`` (final norm + LM head, or the tied embedding; ``last_only``: the last position's
    logits, what generation's steps need);
  * ``fused_layer``: a layer whose experts are all on the GPU, attention and MoE in one call;
  * ``attention_and_router``: attention, the post-attention norm, the router, the shared expert's gated output
    (families with one; None otherwise), the per-expert counts and the step's sync vector (:mod:`routing_sync`:
    the counts, the routing, the counts the next layer's router would give this hidden state -- what prefetch
    acts on -- and for small steps the MoE input);
  * ``attention_and_cpu_begin``: a streamed step's attention, router and shared expert, then the begun call of
    the streamed CPU lane (no counts, no sync);
  * ``stack_mix``: the MoE share of the experts in a stack of GPU weights (the resident experts, or the dynamic
    cache's buffers), a slot map saying which expert sits in which row (-1: not in the stack), added to a base
    (the shared expert's output, or None);
  * ``stage_copy`` and ``staged_mix``: the PCIe lane's batch of experts copied from pinned host memory into rows
    of its staging stack in one call, and their share mixed from that stack in one call.
A layer's input arrives as a pending residual, ``(x,)`` or ``(h, gpu_out, cpu_out)`` of a hybrid MoE step; its
sum is taken at the start of the next jitted piece (one dispatch fewer per layer than a separate add).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from fiddler_jax.models.moe import route, sparse_expert_mix
from fiddler_jax.models.quantized_experts import dequantize_matrix
from fiddler_jax.runtime import routing_sync


class Split:
    """A module split once into its graph and a flat list of its arrays. The hot path passes ``leaves`` (a list,
    flattened by JAX's C++ pytree code) to functions jitted once per ``key``, instead of an NNX ``State`` (whose
    Python flattening sorts and hashes every key) and a static graphdef (hashed again by every call): on the tiny
    model that halved the host time of a layer step."""

    def __init__(self, module):
        graphdef, state = nnx.split(module)
        self.leaves, treedef = jax.tree.flatten(state)
        self.key = (graphdef, treedef)

    @staticmethod
    def merge(key, leaves):
        graphdef, treedef = key
        return nnx.merge(graphdef, jax.tree.unflatten(treedef, leaves))


def residual(pending):
    """The layer input from a pending residual (module docstring)."""
    if len(pending) == 1:
        return pending[0]
    h, gpu_out, cpu_out = pending
    return h + (gpu_out + cpu_out).astype(h.dtype).reshape(h.shape)


def attend_and_route(layer, pending, kv, start):
    """A MoE layer's attention, the MoE input, its routing (a row's left padding -- a batch of prompts of different
    lengths -- routed with weight 0: the lanes skip (CPU) or zero (GPU) the padding's work) and the shared expert's
    output; also the mask of real tokens [N, 1] and the KV cache (traceable)."""
    x = residual(pending)
    positions = start + jnp.arange(x.shape[1], dtype=jnp.int32)
    h, kv = layer.attention_block(x, kv, positions, start)
    moe_in = layer.post_attention_layernorm(h).reshape(-1, h.shape[-1])
    routing, _ = layer.mlp.route(moe_in)
    real = (positions[None, :] >= kv.pad[:, None]).reshape(-1, 1)
    routing = routing._replace(weights=jnp.where(real, routing.weights, 0.0))
    return h, moe_in, routing, layer.mlp.shared(moe_in), real, kv


def fused_step(layer, pending, kv, start):
    """A layer whose experts are all resident (or a dense layer) on its pending input: (output, KV cache)
    (traceable)."""
    x = residual(pending)
    positions = start + jnp.arange(x.shape[1], dtype=jnp.int32)
    x, kv, _ = layer(x, kv, positions, start)
    return x, kv


def final_logits(embed, norm, lm_head, pending, last_only: bool):
    """Logits [B, T, V] float32 of the last layer's pending output, or [B, V] of the last position only;
    ``lm_head`` None: the head is tied to the ``embed`` module (traceable)."""
    x = residual(pending)
    if last_only:
        x = x[:, -1]
    x = norm(x)
    if lm_head is None:
        return embed.attend(x)
    return lm_head(x, out_dtype=jnp.float32)


def mix_with_base(moe_in, routing, slot_of, w1, w3, w2, base=None):
    """The MoE share of the experts in a stack of GPU weights (``slot_of``: each expert's row, -1 where it is not
    in the stack), added to ``base`` (the shared expert's output, or None) (traceable)."""
    out = sparse_expert_mix(moe_in, routing, w1, w3, w2, slot_of)
    return out if base is None else base + out


@functools.cache
def layer_steps(key, router_key):
    """``(fused_layer, attention_and_router, attention_and_cpu_begin)`` of one layer structure (all MoE layers of
    a model share one, so one compile each; a dense layer only ever runs fused); ``router_key``: the
    (post-attention norm, gate) structure of the layer the step looks ahead to (None for a dense layer)."""

    @functools.partial(jax.jit, donate_argnums=2)
    def fused_layer(leaves, pending, kv, start):
        return fused_step(Split.merge(key, leaves), pending, kv, start)

    @functools.partial(jax.jit, donate_argnums=2)
    def attention_and_router(leaves, pending, kv, start, lookahead):
        """Residual after attention, the normed MoE input [N, hidden], the routing, the shared expert's output
        (None without one), the sync vector and the KV cache; ``lookahead``: the next layer's norm and gate leaves,
        None when the engine does not prefetch."""
        layer = Split.merge(key, leaves)
        h, moe_in, routing, shared, real, kv = attend_and_route(layer, pending, kv, start)
        moe = layer.mlp
        # the padding is left out of the counts: the planner sees the real tokens
        counts = jnp.bincount(routing.experts.reshape(-1), weights=jnp.broadcast_to(real, routing.experts.shape)
                              .reshape(-1).astype(jnp.int32), length=moe.num_experts)
        predicted = None
        if lookahead is not None:
            next_norm, next_gate = (Split.merge(k, part) for k, part in zip(router_key, lookahead))
            guess = route(next_gate(next_norm(h).reshape(-1, h.shape[-1])), moe.top_k)
            predicted = jnp.bincount(guess.experts.reshape(-1), length=moe.num_experts)
        sync = routing_sync.pack(counts, routing.experts, routing.weights, predicted, moe_in)
        return h, moe_in, routing, shared, sync, kv

    @functools.partial(jax.jit, donate_argnums=2)
    def attention_and_cpu_begin(leaves, pending, kv, start, tables):
        """A streamed step's first piece: attention and the router as above, then the CPU lane's experts begun
        (:func:`fiddler_jax.kernels.streamed_lane.streamed_cpu_begin` on the registered layer ``tables``, an int32
        scalar: one compile for every layer) -- the host works on them while the GPU runs what is queued next.
        Returns the residual after attention, the MoE input, the routing, the shared expert's output, the ticket
        the lane's end takes and the KV cache."""
        from fiddler_jax.kernels.streamed_lane import streamed_cpu_begin

        h, moe_in, routing, shared, _, kv = attend_and_route(Split.merge(key, leaves), pending, kv, start)
        ticket = streamed_cpu_begin(moe_in, routing.experts, routing.weights, tables)
        return h, moe_in, routing, shared, ticket, kv

    return fused_layer, attention_and_router, attention_and_cpu_begin


@functools.cache
def model_ends(embed_key, norm_key, head_key):
    """``(embed, head)``; ``head_key`` None: the LM head is tied to the embedding."""

    @jax.jit
    def embed(leaves, tokens):
        return Split.merge(embed_key, leaves)(tokens)

    @functools.partial(jax.jit, static_argnames="last_only")
    def head(embed_leaves, norm_leaves, head_leaves, pending, last_only=False):
        """Logits [B, T, V] float32, or [B, V] of the last position only."""
        return final_logits(Split.merge(embed_key, embed_leaves), Split.merge(norm_key, norm_leaves),
                            None if head_key is None else Split.merge(head_key, head_leaves), pending, last_only)

    return embed, head


stack_mix = jax.jit(mix_with_base)


@jax.jit
def staged_mix(moe_in, routing, slot_of, w1, w3, w2, acc):
    """``acc`` plus the MoE share of the experts in a staging stack (the PCIe lane's pool: w1, w3 [S, ffn, hidden],
    w2 [S, hidden, ffn]); ``slot_of`` [E] int32 names each expert's row (-1: not mixed here). The stack always has
    the pool's S rows, so one compile serves every batch size; the sum into ``acc`` saves a separate add."""
    return acc + sparse_expert_mix(moe_in, routing, w1, w3, w2, slot_of)


def _as_bits(a):
    """2-byte floats as uint16 (a free bitcast): XLA:CPU otherwise widens a bf16 stack to float32 around each
    row update (13x slower on the CI machine); on a GPU it changes nothing."""
    return jax.lax.bitcast_convert_type(a, jnp.uint16) if a.dtype.itemsize == 2 else a


@functools.partial(jax.jit, donate_argnums=0, static_argnames="target")
def stage_copy(stack, rows, experts, *, target):
    """Copy n experts from pinned host memory into rows of a device stack, in one call.

    ``stack``: {"w1", "w3", "w2"} device arrays [S, ...] (donated: updated in place, returned); ``rows`` int32 [n];
    ``experts``: n dicts of pinned_host arrays (a quantised expert's matrices as {"q", "scales"}); ``target``: the
    device-memory sharding. For each weight and each expert i: move it to the device (a DMA from pinned memory:
    a quantised matrix's fewer bytes, dequantised there to the stack's dtype, W') and write it into row
    ``rows[i]``. Returns the
    updated stack and the first element of every copied array (as bits): a small output that depends on every
    copy, ready once they have landed. (Read back from the updated stack instead, it made XLA:CPU copy the whole
    stack: 70 against 5 ms for 8 Qwen3-sized experts.) Compiled once per n."""
    out, landed = {}, []
    for w, buf in stack.items():
        bits = _as_bits(buf)
        for i, expert in enumerate(experts):
            held = expert[w]
            if isinstance(held, dict):
                moved = jax.device_put(held, target)
                update = _as_bits(dequantize_matrix(moved["q"], moved["scales"], buf.dtype))
            else:
                update = _as_bits(jax.device_put(held, target))
            landed.append(update[0, 0])
            bits = jax.lax.dynamic_update_index_in_dim(bits, update, rows[i], 0)
        out[w] = jax.lax.bitcast_convert_type(bits, buf.dtype) if bits.dtype != buf.dtype else bits
    return out, jnp.stack(landed)


class ModelSegments:
    """A model's parameters split for the jitted pieces, and the pieces for each layer."""

    def __init__(self, model):
        self.embed_part, self.norm_part = Split(model.embed_tokens), Split(model.norm)
        self.head_part = None if model.lm_head is None else Split(model.lm_head)
        self._embed, self._head = model_ends(self.embed_part.key, self.norm_part.key,
                                             None if self.head_part is None else self.head_part.key)
        self.layers = [Split(layer) for layer in model.layers]
        routers = [(Split(l.post_attention_layernorm), Split(l.mlp.gate)) if l.is_sparse else None
                   for l in model.layers]
        # a MoE layer step looks ahead to the next layer's router; to its own when the next layer is dense or
        # there is none (nothing is prefetched for those)
        ahead = [n + 1 if n + 1 < len(routers) and routers[n + 1] is not None else n for n in range(len(routers))]
        self.lookahead = [None if routers[n] is None else tuple(p.leaves for p in routers[ahead[n]])
                          for n in range(len(routers))]
        self.steps = [layer_steps(part.key, None if routers[n] is None else tuple(p.key for p in routers[ahead[n]]))
                      for n, part in enumerate(self.layers)]

    def embed(self, tokens):
        return self._embed(self.embed_part.leaves, tokens)

    def head(self, pending, last_only: bool):
        head_leaves = None if self.head_part is None else self.head_part.leaves
        return self._head(self.embed_part.leaves, self.norm_part.leaves, head_leaves, pending, last_only=last_only)

    def fused_layer(self, layer: int, pending, kv, start):
        return self.steps[layer][0](self.layers[layer].leaves, pending, kv, start)

    def attention_and_router(self, layer: int, pending, kv, start, lookahead: bool):
        return self.steps[layer][1](self.layers[layer].leaves, pending, kv, start,
                                    self.lookahead[layer] if lookahead else None)

    def attention_and_cpu_begin(self, layer: int, pending, kv, start, tables):
        """``tables``: the registered layer's id, an int32 device scalar."""
        return self.steps[layer][2](self.layers[layer].leaves, pending, kv, start, tables)

    def jitted(self) -> dict:
        """The jitted pieces by name, each once (``f._cache_size()`` counts its compiles)."""
        found = {"embed": self._embed, "head": self._head, "stack_mix": stack_mix, "staged_mix": staged_mix,
                 "stage_copy": stage_copy}
        for n, steps in enumerate(dict.fromkeys(self.steps)):  # distinct layer structures, in layer order
            suffix = "" if n == 0 else f"_{n}"
            (found["fused_layer" + suffix], found["attention_and_router" + suffix],
             found["attention_and_cpu_begin" + suffix]) = steps
        return found
