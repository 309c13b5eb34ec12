"""The hybrid layer step's one device-to-host sync, as one transfer.

Everything the host needs to plan a layer step and run its CPU lane -- the tokens per expert, each token's
experts and weights, the next layer's predicted counts (when prefetching) and, for small steps, the MoE input
itself -- is packed on the GPU into one int32 vector (``pack``, inside the jitted attention segment) and taken
apart on the host without copies (``unpack``: numpy views of that vector). One transfer instead of five: on the
H100 machine ``jax.device_get`` of the five arrays of a decode step took 0.055 ms against 0.017 ms for one array
of the same bytes even when all were ready, and in the decode loop the per-array host work (``copy_to_host_async``
and ``_value`` per array) was about 0.4 ms of a 6.5 ms layer step.

Layout (int32 words): counts [E] | experts [N·k] | weights [N·k] (float32 bits) | predicted [E] (only when
predicted) | moe_in [N·hidden] bits (only when shipped: at most ``SMALL_STEP_BYTES`` and a whole number of
words). A float32 ``moe_in`` takes one word per element, a bfloat16 one two elements per word (little-endian
pairs, as ``lax.bitcast_convert_type`` packs them and numpy views them back).
"""
from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

SMALL_STEP_BYTES = 1 << 20  # a layer step's activations up to this size come to the host with its routing


def ships_activations(shape: tuple[int, ...], dtype) -> bool:
    """Whether a step's MoE input of this shape and dtype rides along with the routing (decode and beams), so the
    CPU lane need not fetch it apart: small enough, and whole int32 words per row."""
    itemsize = np.dtype(dtype).itemsize
    n, hidden = math.prod(shape[:-1]), shape[-1]  # math.prod: this runs every layer step (np.prod costs 7 us)
    return n * hidden * itemsize <= SMALL_STEP_BYTES and itemsize in (2, 4) and (hidden * itemsize) % 4 == 0


def _words(x: jax.Array) -> jax.Array:
    """x's bits as a flat int32 vector (x: 2-D, float32 or a 2-byte dtype with an even last dimension)."""
    if x.dtype.itemsize == 4:
        return jax.lax.bitcast_convert_type(x, jnp.int32).reshape(-1)
    return jax.lax.bitcast_convert_type(x.reshape(x.shape[0], x.shape[1] // 2, 2), jnp.int32).reshape(-1)


def pack(counts: jax.Array, experts: jax.Array, weights: jax.Array, predicted: jax.Array | None,
         moe_in: jax.Array) -> jax.Array:
    """The step's sync vector (module docstring), traced inside the attention segment. ``moe_in`` [N, hidden]
    is included when :func:`ships_activations` says so."""
    parts = [counts.astype(jnp.int32), experts.reshape(-1).astype(jnp.int32),
             jax.lax.bitcast_convert_type(weights.reshape(-1).astype(jnp.float32), jnp.int32)]
    if predicted is not None:
        parts.append(predicted.astype(jnp.int32))
    if ships_activations(moe_in.shape, moe_in.dtype):
        parts.append(_words(moe_in))
    return jnp.concatenate(parts)


@dataclasses.dataclass(frozen=True)
class StepSync:
    """The host's views of one step's sync vector."""

    counts: np.ndarray  # int32 [E]
    experts: np.ndarray  # int32 [N, k]
    weights: np.ndarray  # float32 [N, k]
    predicted: np.ndarray | None  # int32 [E] or None
    moe_in: np.ndarray | None  # [N, hidden] in the step's dtype, or None when it stayed on the device


def unpack(words: np.ndarray, *, num_experts: int, top_k: int, moe_in_shape: tuple[int, int], moe_in_dtype,
           predicted: bool) -> StepSync:
    """Views into the host copy of :func:`pack`'s vector (no copies). Raises ValueError if its length does not
    match the layout the arguments describe (the engine and the jitted segment disagree: a bug)."""
    E, (n, hidden) = num_experts, moe_in_shape
    a = n * top_k
    shipped = ships_activations(moe_in_shape, moe_in_dtype)
    itemsize = np.dtype(moe_in_dtype).itemsize
    want = E + 2 * a + (E if predicted else 0) + (n * hidden * itemsize // 4 if shipped else 0)
    if words.dtype != np.int32 or words.shape != (want,):
        raise ValueError(f"routing sync vector: expected int32 [{want}] for E={E}, k={top_k}, moe_in {moe_in_shape} "
                         f"{np.dtype(moe_in_dtype).name}, predicted={predicted}; got {words.dtype} {words.shape}")
    at = 0

    def take(size):
        nonlocal at
        at += size
        return words[at - size:at]

    counts = take(E)
    experts = take(a).reshape(n, top_k)
    weights = take(a).view(np.float32).reshape(n, top_k)
    pred = take(E) if predicted else None
    moe_in = take(n * hidden * itemsize // 4).view(moe_in_dtype).reshape(n, hidden) if shipped else None
    return StepSync(counts, experts, weights, pred, moe_in)
