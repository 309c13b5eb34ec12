"""Quantised experts on a JAX device: the formats of :mod:`fiddler_jax.models.quantization` computed with jax.numpy
(on the GPU at load time, where numpy would take minutes for Mixtral-8x7B), and a model's routed experts given the
weights of a precision.

``quantize_matrix`` follows the numpy reference ``quantization.quantize`` operation for operation (a division by 127
or 7, a float16 scale for int4, round half to even, a clip), but XLA may divide by multiplying with a reciprocal
(XLA:CPU does), so a scale can differ by one ulp and a q sitting on a rounding tie by one step: the engine and the
plain model both quantise through this function, on the same device, and so hold the same weights.
``dequantize_matrix`` gives W' = q · scale in float32, rounded once to the model's dtype: the weights the GPU
computes with -- the PCIe lane writes them into its staging stack; resident experts are held quantised
(:class:`QuantizedStack`) and computed with as W'. The CPU kernel
computes with q · scale exactly (its float32 sums of exact products, times the scale), so in a bfloat16 model the
lanes agree to bf16 rounding, as they do for unquantised experts; in a float32 model (parity runs) the CPU lane's
numpy path uses W' itself.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from fiddler_jax.models import quantization as Q

MATRICES = ("w1", "w3", "w2")


@functools.partial(jax.jit, static_argnames=("precision", "group"))
def quantize_matrix(w, *, precision: str, group: int = Q.DEFAULT_INT4_GROUP):
    """W [out, in] -> (q, scales) at ``precision`` (int8: int8 [out, in], float32 [out]; int4: uint8 [out, in / 2],
    float16 [out, in / group]), as ``quantization.quantize``. ``in`` must be a multiple of the int4 group."""
    w = w.astype(jnp.float32)
    out, inp = w.shape
    if precision == "int8":
        scales = jnp.max(jnp.abs(w), axis=1) / jnp.float32(127.0)
        safe = jnp.where(scales > 0, scales, jnp.float32(1.0))[:, None]
        return jnp.clip(jnp.rint(w / safe), -127, 127).astype(jnp.int8), scales
    group = min(group, inp)
    grouped = w.reshape(out, inp // group, group)
    scales = (jnp.max(jnp.abs(grouped), axis=2) / jnp.float32(7.0)).astype(jnp.float16)
    s32 = scales.astype(jnp.float32)
    safe = jnp.where(s32 > 0, s32, jnp.float32(1.0))[:, :, None]
    q = jnp.clip(jnp.rint(grouped / safe), -8, 7).astype(jnp.int8).reshape(out, inp)
    nib = (q.astype(jnp.int16) & 0xF).astype(jnp.uint8)
    return nib[:, 0::2] | (nib[:, 1::2] << 4), scales


def dequantize_matrix(q, scales, dtype):
    """W' [out, in] in ``dtype`` from a quantised matrix (q int8 [out, in] with scales [out]; or packed int4 uint8
    [out, in / 2] with scales [out, groups]). Traceable: the PCIe lane calls it inside its copy."""
    if q.dtype == jnp.int8:
        return (q.astype(jnp.float32) * scales.astype(jnp.float32)[:, None]).astype(dtype)
    out, half = q.shape
    low = (q & 0xF).astype(jnp.int8)
    high = (q >> 4).astype(jnp.int8)
    nibbles = jnp.stack([low, high], axis=-1).reshape(out, 2 * half)
    values = jnp.where(nibbles > 7, nibbles - 16, nibbles).astype(jnp.float32)
    groups = scales.shape[1]
    w = values.reshape(out, groups, -1) * scales.astype(jnp.float32)[:, :, None]
    return w.reshape(out, 2 * half).astype(dtype)


@jax.tree_util.register_pytree_node_class
class QuantizedStack:
    """A stack of experts' matrices kept quantised on the device: ``q`` [S, out, in] int8 with ``scales`` [S, out]
    float32, or packed int4 ``q`` [S, out, in / 2] uint8 with ``scales`` [S, out, groups] float16 (the formats of
    :func:`quantize_matrix`), computed with as W' = q · scale in ``dtype`` (:func:`dequantize_matrix`). The
    expert functions of :mod:`fiddler_jax.models.moe` take it wherever they take a stacked weight: a decode step
    dequantises only the rows it reads, inside the reduction that reads them (:meth:`matvec`), so the GPU holds
    and reads the quantised bytes; a many-token step dequantises the stack once into a transient (:meth:`dense`).
    A pytree (``q`` and ``scales`` are its leaves; ``dtype`` is static), so it sits in an ``nnx.Param``."""

    def __init__(self, q, scales, dtype):
        self.q, self.scales, self.dtype = q, scales, jnp.dtype(dtype)

    def tree_flatten(self):
        return (self.q, self.scales), self.dtype

    @classmethod
    def tree_unflatten(cls, dtype, leaves):
        return cls(*leaves, dtype)

    @property
    def shape(self) -> tuple[int, int, int]:
        """The logical shape [S, out, in] of the weights it stands for."""
        s, out, held = self.q.shape
        return s, out, held if self.q.dtype == jnp.int8 else 2 * held

    @property
    def nbytes(self) -> int:
        return self.q.nbytes + self.scales.nbytes

    def __getitem__(self, index):
        """``stack[...]`` (what an ``nnx.Param`` read gives) is the stack itself; ``stack[e]`` (a scalar) expert e's
        W' [out, in]; ``stack[ids]`` the W' of the experts ``ids`` [M] int32, [M, out, in] (gathered, then
        dequantised)."""
        if index is Ellipsis:
            return self
        if isinstance(index, (int, np.integer)) or getattr(index, "ndim", None) == 0:
            return dequantize_matrix(self.q[index], self.scales[index], self.dtype)
        return QuantizedStack(self.q[index], self.scales[index], self.dtype).dense()

    def matvec(self, i, v) -> jax.Array:
        """W'_i · v in float32 ([out]) for the expert in row ``i`` (a traced scalar) and v [in]: each product is
        W'[o, j] · v[j] with W' = q · scale rounded to ``dtype`` as :func:`dequantize_matrix` rounds it, summed in
        float32 -- written as elementwise work on the quantised rows feeding one reduction, so XLA reads the q
        bytes once and materialises nothing of the expert's size. int4's packed pairs are not interleaved back
        into rows: the low nibbles multiply v's even inputs and the high nibbles its odd ones, group by group.
        In a float32 model this is W' · v to float32 summation order; in a bfloat16 one the backend may drop the
        rounding inside the fused loop (XLA:CPU does), computing with q · scale itself -- as the CPU kernel does
        -- so it agrees with a W' stack to bf16 rounding."""
        f32 = jnp.float32
        q = jax.lax.dynamic_index_in_dim(self.q, i, keepdims=False)
        s = jax.lax.dynamic_index_in_dim(self.scales, i, keepdims=False).astype(f32)
        v = v.astype(f32)
        if q.dtype == jnp.int8:
            w = (q.astype(f32) * s[:, None]).astype(self.dtype).astype(f32)
            return jnp.sum(w * v[None, :], axis=-1)
        out, half = q.shape
        groups = s.shape[1]
        q = q.reshape(out, groups, half // groups)
        pairs = v.reshape(groups, half // groups, 2)

        def signed(nibble):  # 0..15 -> -8..7
            n = nibble.astype(jnp.int8)
            return jnp.where(n > 7, n - 16, n).astype(f32)

        low = (signed(q & 0xF) * s[:, :, None]).astype(self.dtype).astype(f32)
        high = (signed(q >> 4) * s[:, :, None]).astype(self.dtype).astype(f32)
        return jnp.sum(low * pairs[None, :, :, 0] + high * pairs[None, :, :, 1], axis=(1, 2))

    def dense(self) -> jax.Array:
        """W' of every expert, [S, out, in] in ``dtype`` (a transient for the grouped product)."""
        return jax.vmap(lambda q, s: dequantize_matrix(q, s, self.dtype))(self.q, self.scales)


def expert_matvec(stack, i, v) -> jax.Array:
    """W_i · v in float32 ([out]) for row ``i`` (a traced scalar) of a stacked weight or a
    :class:`QuantizedStack`, and v [in]: one multiply-and-sum over the row's weights (the row picked by a dynamic
    slice that XLA fuses into the reduction)."""
    if isinstance(stack, QuantizedStack):
        return stack.matvec(i, v)
    w = jax.lax.dynamic_index_in_dim(stack, i, keepdims=False)
    return jnp.sum(w.astype(jnp.float32) * v.astype(jnp.float32)[None, :], axis=-1)


def dense_stack(stack) -> jax.Array:
    """A stacked weight [S, out, in] as an array (a :class:`QuantizedStack` dequantised)."""
    return stack.dense() if isinstance(stack, QuantizedStack) else stack


@functools.partial(jax.jit, static_argnames=("precision", "group"))
def quantize_stack(stack, *, precision: str, group: int) -> QuantizedStack:
    """A stack [E, out, in] quantised one expert at a time (bounded memory), computing as W' in its dtype."""
    q, scales = jax.lax.map(lambda w: quantize_matrix(w, precision=precision, group=group), stack)
    return QuantizedStack(q, scales, stack.dtype)


@functools.partial(jax.jit, static_argnames=("precision", "group"))
def _roundtrip_stack(stack, *, precision: str, group: int):
    """W' (in the stack's dtype) of every expert of a stack [E, out, in], one expert at a time (bounded memory)."""
    def one(w):
        return dequantize_matrix(*quantize_matrix(w, precision=precision, group=group), stack.dtype)
    return jax.lax.map(one, stack)


def check_model_precision(hidden: int, ffn: int, precision: str, group: int) -> None:
    """Refuse a precision, or an int4 group that does not divide the expert matrices' rows (w1 / w3 rows have
    ``hidden`` inputs, w2 rows ``ffn``), with the groups that would."""
    Q.check_precision(precision, group)
    if precision != "int4":
        return
    for name, inputs in (("hidden_size", hidden), ("moe_intermediate_size", ffn)):
        if not Q.int4_group_fits(inputs, group):
            fits = [str(c) for c in Q.INT4_GROUPS if Q.int4_group_fits(inputs, c)]
            raise Q.InvalidInputError(
                f"int4 group {group} does not fit the experts' rows of {inputs} inputs ({name}); use int4_group "
                f"among {', '.join(fits) or 'none (use int8)'}")


def apply_expert_precision(model, precision: str, group: int = Q.DEFAULT_INT4_GROUP) -> None:
    """Give every routed expert stack of the plain model the weights W' of ``precision``, in place; "bf16" leaves
    them as they are. The router, attention and shared experts keep theirs. (An engine's resident experts are
    quantised as they load instead, into :class:`QuantizedStack`: :func:`resident_stack_store`.)"""
    cfg = model.config
    check_model_precision(cfg.hidden_size, cfg.moe_intermediate_size, precision, group)
    if precision == "bf16":
        return
    for layer in model.layers:
        if not getattr(layer, "is_sparse", False):
            continue
        for name in MATRICES:
            param = getattr(layer.mlp, name)
            stack = param.get_value()
            if stack.shape[0]:
                param.set_value(_roundtrip_stack(stack, precision=precision, group=group))


def resident_stack_store(precision: str, group: int = Q.DEFAULT_INT4_GROUP):
    """What a loader does with each resident expert stack once it is on the device: None at "bf16" (kept), else
    quantise it into a :class:`QuantizedStack` at once, so the bf16 copy of only one stack is alive at a time."""
    Q.check_precision(precision, group)
    if precision == "bf16":
        return None
    return lambda stack: quantize_stack(stack, precision=precision, group=group) if stack.shape[0] else stack


def quantize_expert(weights: dict, precision: str, group: int) -> dict[str, tuple[jax.Array, jax.Array]]:
    """One expert {"w1", "w3", "w2": [out, in] arrays} -> {name: (q, scales)} on the default device."""
    return {name: quantize_matrix(jnp.asarray(np.ascontiguousarray(weights[name])), precision=precision,
                                  group=group) for name in MATRICES}
