"""The jnp-level ops: XLA FFI custom calls into the CPU expert kernel, usable inside jax.jit on the CPU device."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from fiddler_jax.kernels._lib import EXPERT_FFN_TARGET, GROUPED_EXPERT_FFN_TARGET

_OUT_DTYPES = (jnp.bfloat16, jnp.float32)


def _check(name: str, a, dtype, rank: int) -> None:
    if a.ndim != rank:
        raise ValueError(f"{name} must have rank {rank}, got shape {tuple(a.shape)}")
    if a.dtype != dtype:
        raise TypeError(f"{name} must be {jnp.dtype(dtype).name}, got {a.dtype}")


def _refuse_narrowing(names, args, wanted) -> None:
    """Refuse an argument whose dtype ``jnp.asarray`` would change: without x64, JAX turns int64/uint64 into
    int32/uint32 and float64 into float32 by wrapping or rounding every value, silently (an index of 2**32 would
    become 0). The C++ handler only sees the result, so this check runs whether or not ``validate`` is set."""
    for name, a, want in zip(names, args, wanted):
        dtype = getattr(a, "dtype", None)
        if dtype is None:
            continue
        dtype = np.dtype(dtype)
        if jax.dtypes.canonicalize_dtype(dtype) != dtype:
            raise TypeError(f"{name} must be {want}, got {dtype} (JAX without x64 would convert it to "
                            f"{jax.dtypes.canonicalize_dtype(dtype)}, wrapping or rounding its values); cast it "
                            f"with .astype(np.{want}) after checking its values fit")


def _out_dtype(out_dtype):
    dt = jnp.dtype(out_dtype)
    if dt not in [jnp.dtype(d) for d in _OUT_DTYPES]:
        raise TypeError(f"out_dtype must be bfloat16 or float32, got {dt}")
    return dt


def expert_ffn(x, w1, w3, w2, *, out_dtype=jnp.bfloat16, validate: bool = True) -> jax.Array:
    """One Mixtral expert on n tokens: ``(silu(x @ w1.T) * (x @ w3.T)) @ w2.T``.

    x: [n, hidden] bf16; w1, w3: [ffn, hidden] bf16; w2: [hidden, ffn] bf16 (HF layouts). fp32 accumulation;
    returns [n, hidden] in ``out_dtype`` (bf16 or f32). Runs as an XLA FFI custom call registered for platform
    "cpu" only: call it inside a jit on ``jax.devices("cpu")[0]`` (or with inputs committed there / under
    ``jax.default_device``); on a GPU device XLA finds no target. ``validate=False`` skips the Python-side
    checks (the C++ handler checks everything again).
    """
    _refuse_narrowing(("x", "w1", "w3", "w2"), (x, w1, w3, w2), ("bfloat16",) * 4)
    x, w1, w3, w2 = (jnp.asarray(a) for a in (x, w1, w3, w2))
    out_dt = _out_dtype(out_dtype)
    if validate:
        for name, a in (("x", x), ("w1", w1), ("w3", w3), ("w2", w2)):
            _check(name, a, jnp.bfloat16, 2)
        n, hidden = x.shape
        ffn = w1.shape[0]
        if w1.shape[1] != hidden:
            raise ValueError(f"w1 has shape {w1.shape} but x has hidden size {hidden} (w1 is [ffn, hidden])")
        if w3.shape != w1.shape:
            raise ValueError(f"w3 has shape {w3.shape}, expected {w1.shape} like w1")
        if w2.shape != (hidden, ffn):
            raise ValueError(f"w2 has shape {w2.shape}, expected {(hidden, ffn)} = [hidden, ffn]")
    out = jax.ShapeDtypeStruct(tuple(x.shape[:1]) + tuple(x.shape[-1:]) if x.ndim >= 1 else (), out_dt)
    return jax.ffi.ffi_call(EXPERT_FFN_TARGET, out, vmap_method="sequential")(x, w1, w3, w2)


def grouped_expert_ffn(hidden, token_idx, expert_idx, weights, w1, w3, w2, *, out_dtype=jnp.bfloat16,
                       validate: bool = True) -> jax.Array:
    """Sum of routed experts for one layer's CPU-assigned (token, expert) pairs.

    hidden: [T, H] bf16; token_idx, expert_idx: [A] int32; weights: [A] float32 (routing weights, finite and
    >= 0); w1, w3: [E, F, H] bf16; w2: [E, H, F] bf16 (the layer's stacked experts). Returns [T, H]:
    ``out[t] = sum_{a: token_idx[a] == t} weights[a] * FFN_{expert_idx[a]}(hidden[t])`` (zero for tokens with
    no assignment). All experts of the call are spread over all cores at once. Index range and weight checks
    happen in C++ (an out-of-range index raises, naming the argument). Indices must be int32 and weights float32:
    an int64 or float64 array is refused (without x64, JAX would wrap or round it), whatever ``validate`` says.
    NaN or inf in ``hidden`` or the expert matrices propagates to the outputs it reaches (not checked: that would
    be a pass over the weights); NaN, inf or negative routing weights are refused.
    """
    _refuse_narrowing(("hidden", "token_idx", "expert_idx", "weights", "w1", "w3", "w2"),
                      (hidden, token_idx, expert_idx, weights, w1, w3, w2),
                      ("bfloat16", "int32", "int32", "float32", "bfloat16", "bfloat16", "bfloat16"))
    args = [jnp.asarray(a) for a in (hidden, token_idx, expert_idx, weights, w1, w3, w2)]
    hidden, token_idx, expert_idx, weights, w1, w3, w2 = args
    out_dt = _out_dtype(out_dtype)
    if validate:
        _check("hidden", hidden, jnp.bfloat16, 2)
        _check("token_idx", token_idx, jnp.int32, 1)
        _check("expert_idx", expert_idx, jnp.int32, 1)
        _check("weights", weights, jnp.float32, 1)
        for name, a in (("w1", w1), ("w3", w3), ("w2", w2)):
            _check(name, a, jnp.bfloat16, 3)
        T, H = hidden.shape
        E, F = w1.shape[:2]
        if not (token_idx.shape == expert_idx.shape == weights.shape):
            raise ValueError(f"token_idx {token_idx.shape}, expert_idx {expert_idx.shape} and weights "
                             f"{weights.shape} must have the same length")
        if w1.shape[2] != H:
            raise ValueError(f"w1 has shape {w1.shape} but hidden has size {H} (w1 is [E, ffn, hidden])")
        if w3.shape != w1.shape:
            raise ValueError(f"w3 has shape {w3.shape}, expected {w1.shape} like w1")
        if w2.shape != (E, H, F):
            raise ValueError(f"w2 has shape {w2.shape}, expected {(E, H, F)} = [E, hidden, ffn]")
    out = jax.ShapeDtypeStruct((hidden.shape[0], hidden.shape[-1]) if hidden.ndim >= 1 else (), out_dt)
    return jax.ffi.ffi_call(GROUPED_EXPERT_FFN_TARGET, out, vmap_method="sequential")(*args)
