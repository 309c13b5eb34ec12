"""Random bfloat16 arrays: the one helper behind the seeded random model's experts, the benchmarks' and the
calibration's weights and the kernel tests' inputs.

Two kinds of values, by ``std``:
  * ``std=None`` (weights at memory speed): raw random 16-bit words with the exponent field fixed, so every value
    is finite, |x| ∈ [2^-7, 2^-6) with a random sign and mantissa -- about the scale of a Mixtral weight
    (normal(0, 0.02)), generated as fast as memory is written (90 GB of Mixtral experts in about a minute);
  * ``std`` given (test inputs): normal(0, std) drawn in float64 and rounded to bfloat16.
For a given generator state the values are fixed: the seeded random model (:mod:`fiddler_jax.models.random_weights`)
depends on them bit for bit."""
from __future__ import annotations

import ml_dtypes
import numpy as np

BF16 = np.dtype(ml_dtypes.bfloat16)
_SIGN_AND_MANTISSA = 0x807F
_EXPONENT = 0x3C00  # biased exponent 120: 2^-7


def random_bf16(rng: np.random.Generator, shape, *, std: float | None = None) -> np.ndarray:
    """A bfloat16 array of ``shape`` from ``rng`` (module docstring: ``std=None`` from bits, else normal)."""
    if std is not None:
        return (rng.standard_normal(shape) * std).astype(BF16)
    size = int(np.prod(shape))
    # raw 64-bit draws viewed as 16-bit words, masked in place: about 8x faster than integers(dtype=uint16)
    bits = rng.bit_generator.random_raw(-(-size // 4)).view(np.uint16)[:size]
    np.bitwise_and(bits, np.uint16(_SIGN_AND_MANTISSA), out=bits)
    np.bitwise_or(bits, np.uint16(_EXPONENT), out=bits)
    return bits.view(BF16).reshape(shape)


def random_bf16_on_device(key, shape):
    """The ``std=None`` values of :func:`random_bf16` made by JAX from ``key`` on the default device (no host
    copy; other values than numpy's for the same seed). Traceable: call it inside ``jax.jit``."""
    import jax
    import jax.numpy as jnp

    bits = jax.random.bits(key, shape, jnp.uint16)
    return jax.lax.bitcast_convert_type((bits & _SIGN_AND_MANTISSA) | _EXPONENT, jnp.bfloat16)
