"""The sparse mixture of experts of the MoE families, as small pure functions and one module.

Routing algorithm (as in transformers' Mixtral, Qwen3-MoE, OLMoE and Qwen2-MoE):
  1. ``route``: router logits = x · gateᵀ; probabilities = softmax over all experts in float32; keep the top-k
     experts of each token and, when the family renormalises (Mixtral always; the others by ``norm_topk_prob``),
     divide their k probabilities by their sum.
  2. ``group_by_expert``: flatten the N·k (token, expert) assignments and sort them by expert (stable), giving
     contiguous groups and the per-expert token counts — the counts are what the hybrid planner reads.
  3. ``expert_ffn`` / ``grouped_expert_ffn``: the SwiGLU expert FFN_e(x) = (silu(x·w1ᵀ) ⊙ (x·w3ᵀ)) · w2ᵀ, with
     weights in HF layout (w1, w3 [ffn, hidden]; w2 [hidden, ffn]); the grouped form runs all groups at once with
     ``jax.lax.ragged_dot_general``; with no more assignments than experts (decode) the row-wise form reads just
     the chosen experts' weights, in place, instead.
  4. ``combine``: out_t = Σ_j weight_{t,j} · FFN_{e_{t,j}}(x_t), accumulated in float32.
  5. A shared expert (Qwen2-MoE), when the model has one, adds sigmoid(x · shared_gateᵀ) · FFN_shared(x) for every
     token; it is never routed, so the runtime keeps it on the GPU beside the resident experts.

The runtime later splits step 3 between GPU-resident experts and offloaded ones; steps 1, 2 and 4 stay the same.
Every function that takes stacked expert weights also takes a ``QuantizedStack`` (an engine's resident experts at
int8 / int4): the row-wise form dequantises the rows it reads inside its reduction, the others a transient W'.
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from fiddler_jax.models.layers import DenseMlp, Linear, matmul_precision, normal_init
from fiddler_jax.models.quantized_experts import dense_stack, expert_matvec

ROWWISE_MAX_ROWS = 16  # the decode form unrolls one row per assignment; beyond this many the grouped product runs


class Routing(NamedTuple):
    """Top-k routing of N tokens: ``weights`` [N, k] float32 (rows sum to 1 when renormalised), ``experts``
    [N, k] int32."""

    weights: jax.Array
    experts: jax.Array


class ExpertGroups(NamedTuple):
    """Assignments sorted by expert: ``order`` [N·k] indexes the flattened (token, slot) pairs; ``sizes`` [E]."""

    order: jax.Array
    sizes: jax.Array


def route(router_logits: jax.Array, top_k: int, normalize: bool = True) -> Routing:
    """Softmax over experts (float32), top-k, and (``normalize``) renormalise the k kept probabilities."""
    probs = jax.nn.softmax(router_logits.astype(jnp.float32), axis=-1)
    weights, experts = jax.lax.top_k(probs, top_k)
    if normalize:
        weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
    return Routing(weights, experts.astype(jnp.int32))


def group_by_expert(experts: jax.Array, num_experts: int) -> ExpertGroups:
    """Stable sort of the flattened assignments by expert id, and the number of assignments per expert."""
    flat = experts.reshape(-1)
    order = jnp.argsort(flat, stable=True).astype(jnp.int32)
    sizes = jnp.bincount(flat, length=num_experts).astype(jnp.int32)
    return ExpertGroups(order, sizes)


def expert_ffn(x: jax.Array, w1: jax.Array, w3: jax.Array, w2: jax.Array) -> jax.Array:
    """One SwiGLU expert on x [n, hidden]: (silu(x·w1ᵀ) ⊙ (x·w3ᵀ)) · w2ᵀ."""
    prec = matmul_precision(w1.dtype)
    gate = jnp.einsum("nh,fh->nf", x, w1, precision=prec, preferred_element_type=jnp.float32)
    up = jnp.einsum("nh,fh->nf", x, w3, precision=prec, preferred_element_type=jnp.float32)
    act = (jax.nn.silu(gate) * up).astype(w2.dtype)
    return jnp.einsum("nf,hf->nh", act, w2, precision=prec, preferred_element_type=jnp.float32)


_ROWS_BY_FFN_HIDDEN = jax.lax.RaggedDotDimensionNumbers(
    dot_dimension_numbers=(([1], [2]), ([], [])), lhs_ragged_dimensions=[0], rhs_group_dimensions=[0])


def grouped_expert_ffn(x_sorted: jax.Array, sizes: jax.Array, w1: jax.Array, w3: jax.Array,
                       w2: jax.Array) -> jax.Array:
    """All experts at once: rows of ``x_sorted`` [M, hidden] come in contiguous groups of ``sizes`` [E] rows,
    group e through expert e (stacked w1, w3 [E, ffn, hidden], w2 [E, hidden, ffn]). Returns float32 [M, hidden]."""
    prec = matmul_precision(w1.dtype)
    w1, w3, w2 = dense_stack(w1), dense_stack(w3), dense_stack(w2)

    def rdot(lhs, rhs):
        return jax.lax.ragged_dot_general(lhs, rhs, sizes, _ROWS_BY_FFN_HIDDEN, precision=prec,
                                          preferred_element_type=jnp.float32)

    act = (jax.nn.silu(rdot(x_sorted, w1)) * rdot(x_sorted, w3)).astype(w2.dtype)
    return rdot(act, w2)


def gathered_expert_ffn(x_rows: jax.Array, expert_ids: jax.Array, w1: jax.Array, w3: jax.Array,
                        w2: jax.Array) -> jax.Array:
    """Row m of ``x_rows`` [M, hidden] through expert ``expert_ids[m]``, by gathering those experts' weights (the
    reference form the tests compare :func:`rowwise_expert_ffn` with; the engine uses the rowwise form).
    Reads M experts instead of all E, which is what few-token steps (decode) want. Returns float32 [M, hidden]."""
    prec = matmul_precision(w1.dtype)
    gate = jnp.einsum("mh,mfh->mf", x_rows, w1[expert_ids], precision=prec, preferred_element_type=jnp.float32)
    up = jnp.einsum("mh,mfh->mf", x_rows, w3[expert_ids], precision=prec, preferred_element_type=jnp.float32)
    act = (jax.nn.silu(gate) * up).astype(w2.dtype)
    return jnp.einsum("mf,mhf->mh", act, w2[expert_ids], precision=prec, preferred_element_type=jnp.float32)


def rowwise_expert_ffn(x_rows: jax.Array, expert_ids: jax.Array, w1: jax.Array, w3: jax.Array,
                       w2: jax.Array) -> jax.Array:
    """Like :func:`gathered_expert_ffn`, reading each row's expert in place: for row m (a static unroll over
    the few rows of a decode step) every product is a multiply-and-sum over the expert's weights, e.g.
    gate_f = Σ_h w1[e, f, h]·x_h in float32, with the expert picked by a dynamic slice that XLA fuses into the
    reduction. Nothing expert-sized is materialised (the indexing form copies the chosen experts: k × 352 MB of
    transient for a Mixtral decode step, beyond the budget) and each weight is read once; a quantised stack's
    rows are dequantised inside the same reduction (:func:`expert_matvec`)."""
    rows = []
    for m in range(x_rows.shape[0]):
        e, x = expert_ids[m], x_rows[m]
        act = (jax.nn.silu(expert_matvec(w1, e, x)) * expert_matvec(w3, e, x)).astype(w2.dtype)
        rows.append(expert_matvec(w2, e, act))
    return jnp.stack(rows)


def dense_expert_mix(flat: jax.Array, routing: Routing, w1: jax.Array, w3: jax.Array, w2: jax.Array) -> jax.Array:
    """Every expert on every token, mixed by the top-k routing weights (0 for experts not chosen):
    out_t = Σ_e g_{t,e} FFN_e(x_t). E/k times the FLOPs of the sparse forms but plain dense matmuls, which
    trains faster on GPUs for small models. Returns float32 [N, hidden]."""
    num_experts = w1.shape[0]
    w1, w3, w2 = dense_stack(w1), dense_stack(w3), dense_stack(w2)
    gates = jnp.sum(jax.nn.one_hot(routing.experts, num_experts, dtype=jnp.float32) * routing.weights[..., None],
                    axis=1)  # [N, E]
    y = jax.vmap(expert_ffn, in_axes=(None, 0, 0, 0))(flat, w1, w3, w2)  # [E, N, hidden]
    return jnp.einsum("ne,enh->nh", gates, y, precision=jax.lax.Precision.HIGHEST)


def combine(y_sorted: jax.Array, groups: ExpertGroups, routing: Routing, num_tokens: int) -> jax.Array:
    """Scatter the expert outputs back to their tokens, weighted: out_t = Σ_j w_{t,j}·y_{t,j}, float32."""
    top_k = routing.weights.shape[-1]
    token = groups.order // top_k
    weight = routing.weights.reshape(-1)[groups.order]
    out = jnp.zeros((num_tokens, y_sorted.shape[-1]), jnp.float32)
    return out.at[token].add(y_sorted.astype(jnp.float32) * weight[:, None])


def sparse_expert_mix(flat: jax.Array, routing: Routing, w1: jax.Array, w3: jax.Array, w2: jax.Array,
                      slot_of: jax.Array | None = None) -> jax.Array:
    """Σ_j w_{t,j}·FFN(x_t) over the assignments whose expert is in the stacked weights, computing only those.

    ``slot_of`` [E] int32 maps an expert to its row in the stack (w1, w3 [S, ffn, hidden], w2 [S, hidden, ffn]);
    -1 means the expert is elsewhere and its assignments contribute 0 here (the hybrid runtime computes them on
    another lane). ``None`` means the stack holds all experts in order. The rowwise form when there are no more
    assignments than stack rows and at most ``ROWWISE_MAX_ROWS`` of them (decode; the form unrolls a row each),
    else the grouped ragged product. Returns float32 [N, hidden]."""
    num_slots, top_k = w1.shape[0], routing.weights.shape[-1]
    if slot_of is None:
        slots, weights, groups_n = routing.experts, routing.weights, num_slots
    else:
        slots = slot_of[routing.experts]
        present = slots >= 0
        # Absent assignments form one extra group after the stack's rows, with weight 0.
        slots, weights, groups_n = jnp.where(present, slots, num_slots), jnp.where(present, routing.weights, 0.0), \
            num_slots + 1
    groups = group_by_expert(slots, groups_n)
    x_sorted = flat[groups.order // top_k]
    slot_sorted = slots.reshape(-1)[groups.order]
    if x_sorted.shape[0] <= min(num_slots, ROWWISE_MAX_ROWS):  # few assignments (decode): only the chosen rows
        y_sorted = rowwise_expert_ffn(x_sorted, jnp.minimum(slot_sorted, num_slots - 1), w1, w3, w2)
    else:
        y_sorted = grouped_expert_ffn(x_sorted, groups.sizes[:num_slots], w1, w3, w2)
    y_sorted = jnp.where((slot_sorted < num_slots)[:, None], y_sorted, 0.0)
    return combine(y_sorted, groups, Routing(weights, slots), flat.shape[0])


def load_balancing_loss(router_logits: jax.Array, top_k: int) -> jax.Array:
    """Switch/Mixtral auxiliary loss for one layer (router_logits [N, E]): E · Σ_e f_e · P_e, where f_e is the
    fraction of (token, slot) assignments routed to e and P_e the mean router probability of e. Equals 1 for a
    perfectly uniform router; transformers averages the same quantity over layers."""
    num_experts = router_logits.shape[-1]
    probs = jax.nn.softmax(router_logits.astype(jnp.float32), axis=-1)
    _, experts = jax.lax.top_k(probs, top_k)
    assigned = jax.nn.one_hot(experts, num_experts, dtype=jnp.float32).sum(axis=1)  # [N, E]
    fraction = jnp.mean(assigned, axis=0) / top_k
    return num_experts * jnp.sum(fraction * jnp.mean(probs, axis=0))


class SparseMoe(nnx.Module):
    """One MoE layer's MLP block: router ``gate`` [E, hidden], the stacked routed experts (w1 = gate_proj,
    w3 = up_proj [E, ffn, hidden]; w2 = down_proj [E, hidden, ffn]) and, for families with one, the shared expert
    and its sigmoid gate [1, hidden]."""

    def __init__(self, cfg, *, dtype, rngs: nnx.Rngs):
        e, h, f, std = cfg.num_experts, cfg.hidden_size, cfg.moe_intermediate_size, cfg.initializer_range
        self.num_experts = e
        self.top_k = cfg.num_experts_per_tok
        self.normalize = cfg.norm_topk_prob
        self.gate = Linear(h, e, dtype=dtype, std=std, rngs=rngs)
        self.w1 = nnx.Param(normal_init(rngs, (e, f, h), std, dtype))
        self.w3 = nnx.Param(normal_init(rngs, (e, f, h), std, dtype))
        self.w2 = nnx.Param(normal_init(rngs, (e, h, f), std, dtype))
        if cfg.has_shared_expert:
            self.shared_expert = DenseMlp(h, cfg.shared_expert_intermediate_size, dtype=dtype, std=std, rngs=rngs)
            self.shared_expert_gate = Linear(h, 1, dtype=dtype, std=std, rngs=rngs)
        else:
            self.shared_expert = self.shared_expert_gate = None

    def route(self, flat: jax.Array) -> tuple[Routing, jax.Array]:
        """(the top-k routing of flat [N, hidden], the router logits [N, E])."""
        router_logits = self.gate(flat)
        return route(router_logits, self.top_k, self.normalize), router_logits

    def shared(self, flat: jax.Array) -> jax.Array | None:
        """The shared expert's gated output, float32 [N, hidden] (None without one)."""
        if self.shared_expert is None:
            return None
        gate = jax.nn.sigmoid(self.shared_expert_gate(flat, out_dtype=jnp.float32))
        return gate * self.shared_expert(flat, out_dtype=jnp.float32)

    def __call__(self, x: jax.Array, dispatch: str = "sparse") -> tuple[jax.Array, jax.Array]:
        """x [..., hidden] → (MoE output of x's dtype, router logits [N, E]).

        ``dispatch``: "sparse" (default) computes only the chosen experts — gathered weights when there are no
        more assignments than experts (decode), else the grouped ragged product; "dense" runs every expert on
        every token (:func:`dense_expert_mix`, for training). Both compute the same function."""
        flat = x.reshape(-1, x.shape[-1])
        routing, router_logits = self.route(flat)
        w1, w3, w2 = self.w1[...], self.w3[...], self.w2[...]
        if dispatch == "dense":
            out = dense_expert_mix(flat, routing, w1, w3, w2)
        elif dispatch == "sparse":
            out = sparse_expert_mix(flat, routing, w1, w3, w2)
        else:
            raise ValueError(f"MoE dispatch must be 'sparse' or 'dense', got {dispatch!r}")
        shared = self.shared(flat)
        if shared is not None:
            out = out + shared
        return out.astype(x.dtype).reshape(x.shape), router_logits
