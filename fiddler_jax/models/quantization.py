"""Expert weights at lower precision: the formats of ``expert_precision`` and their reference (numpy) arithmetic.

An expert matrix W [out, in] (w1, w3: [ffn, hidden]; w2: [hidden, ffn]) is stored as:
  * ``bf16``: itself (the default and the reference);
  * ``int8``: q int8 [out, in] and one float32 scale per output row, symmetric:
    scale[o] = max_i |W[o, i]| / 127, q[o, i] = round_half_even(W[o, i] / scale[o]) in [-127, 127];
  * ``int4``: q in [-8, 7] packed two per byte along ``in`` (element 2j in the low nibble, 2j + 1 in the high
    nibble, two's complement) as uint8 [out, in / 2], and one float16 scale per group of ``group`` consecutive
    inputs of a row (a row shorter than ``group`` is one group): scale[o, g] = max over the group of |W| / 7,
    q = clip(round_half_even(W / scale), -8, 7).
A zero row or group gets scale 0 and q 0. Dequantised, W'[o, i] = q[o, i] * scale (of its row or group), in float32
-- the weights every quantised path (CPU kernel, GPU expert FFN) must reproduce: an expert's output
y = W' x is Σ_i q[o, i] x[i] times the scale, each exact in float32 up to the summation.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from fiddler_jax.errors import InvalidInputError

EXPERT_PRECISIONS = ("bf16", "int8", "int4")
INT4_GROUPS = (32, 64, 128)
DEFAULT_INT4_GROUP = 64


@dataclasses.dataclass(frozen=True)
class QuantizedMatrix:
    """One quantised matrix (module docstring): ``q`` (int8 [out, in], or uint8 [out, in / 2] for int4),
    ``scales`` (float32 [out] for int8; float16 [out, in / group] for int4), the precision, the group (int4) and
    the matrix's shape."""

    q: np.ndarray
    scales: np.ndarray
    precision: str
    shape: tuple[int, int]
    group: int | None = None

    @property
    def nbytes(self) -> int:
        """Bytes the stored matrix takes (what a lane reads or copies)."""
        return int(self.q.nbytes + self.scales.nbytes)


def check_precision(precision: str, group: int | None = None) -> None:
    """Refuse an unknown precision, or an int4 group not in ``INT4_GROUPS``."""
    if precision not in EXPERT_PRECISIONS:
        raise InvalidInputError(f"unknown expert_precision {precision!r}; valid: {', '.join(EXPERT_PRECISIONS)}")
    if precision == "int4" and group is not None and group not in INT4_GROUPS:
        raise InvalidInputError(f"int4 group {group!r} is not supported; use one of "
                                f"{', '.join(map(str, INT4_GROUPS))}")


def int4_group_fits(inputs: int, group: int) -> bool:
    """Whether int4 groups of ``group`` inputs (a row shorter than a group being one group) fit rows of ``inputs``:
    an even row, the group dividing it, and a multiple of 32 inputs or the whole row (what the CPU kernel steps
    through, 32 inputs at a time inside one group)."""
    g = min(group, inputs)
    return g >= 1 and inputs % 2 == 0 and inputs % g == 0 and (g % 32 == 0 or g == inputs)


def precision_tag(precision: str, group: int = DEFAULT_INT4_GROUP) -> str:
    """A precision as one name ("bf16", "int8", "int4g64"): what a latency model and its file record."""
    check_precision(precision, group)
    return f"int4g{group}" if precision == "int4" else precision


def parse_precision_tag(tag: str) -> tuple[str, int]:
    """(precision, int4 group) of a :func:`precision_tag`."""
    if isinstance(tag, str) and tag.startswith("int4g") and tag[5:].isdigit():
        precision, group = "int4", int(tag[5:])
    else:
        precision, group = tag, DEFAULT_INT4_GROUP
    check_precision(precision, group)
    return precision, group


def _as_matrix(w, who: str) -> np.ndarray:
    w = np.asarray(w)
    if w.ndim != 2 or not w.size:
        raise InvalidInputError(f"{who}: expects a non-empty 2-D weight matrix, got shape {w.shape}")
    w = w.astype(np.float32)
    if not np.isfinite(w).all():
        raise InvalidInputError(f"{who}: the weights hold NaN or infinite values; they cannot be quantised")
    return w


def quantize(w, precision: str, group: int = DEFAULT_INT4_GROUP) -> QuantizedMatrix:
    """W [out, in] (any float dtype) at ``precision`` "int8" or "int4" (module docstring)."""
    check_precision(precision, group)
    if precision == "bf16":
        raise InvalidInputError("quantize: bf16 is the unquantised format; keep the weights as they are")
    w = _as_matrix(w, "quantize")
    out, inp = w.shape
    group = min(group, inp)  # a row shorter than a group is one group
    if precision == "int8":
        peak = np.abs(w).max(axis=1)
        scales = (peak / 127.0).astype(np.float32)
        safe = np.where(scales > 0, scales, 1.0)[:, None]
        q = np.clip(np.rint(w / safe), -127, 127).astype(np.int8)
        return QuantizedMatrix(q, scales, "int8", (out, inp))
    if inp % group:
        raise InvalidInputError(f"quantize: int4 groups of {group} must divide the matrix's {inp} inputs; use a "
                                f"group among {', '.join(str(g) for g in INT4_GROUPS if inp % g == 0) or 'none'}")
    grouped = w.reshape(out, inp // group, group)
    # the scale is stored as float16: quantise with the rounded scale, so dequantisation is exact
    scales = (np.abs(grouped).max(axis=2) / 7.0).astype(np.float16)
    s32 = scales.astype(np.float32)
    safe = np.where(s32 > 0, s32, 1.0)[:, :, None]
    q = np.clip(np.rint(grouped / safe), -8, 7).astype(np.int8).reshape(out, inp)
    return QuantizedMatrix(pack_int4(q), scales, "int4", (out, inp), group)


def pack_int4(q: np.ndarray) -> np.ndarray:
    """int8 values in [-8, 7], [out, in] with ``in`` even -> uint8 [out, in / 2] (element 2j low nibble)."""
    nib = (q.astype(np.int16) & 0xF).astype(np.uint8)
    return (nib[:, 0::2] | (nib[:, 1::2] << 4)).astype(np.uint8)


def unpack_int4(packed: np.ndarray) -> np.ndarray:
    """The inverse of :func:`pack_int4`: int8 [out, 2 * cols] in [-8, 7]."""
    low = (packed & 0xF).astype(np.int8)
    high = (packed >> 4).astype(np.int8)
    out = np.empty((packed.shape[0], packed.shape[1] * 2), np.int8)
    out[:, 0::2], out[:, 1::2] = low, high
    return np.where(out > 7, out - 16, out).astype(np.int8)


def dequantize(m: QuantizedMatrix) -> np.ndarray:
    """W' float32 [out, in]: q times its row's (int8) or group's (int4) scale."""
    if m.precision == "int8":
        return m.q.astype(np.float32) * m.scales.astype(np.float32)[:, None]
    out, inp = m.shape
    q = unpack_int4(m.q).astype(np.float32).reshape(out, inp // m.group, m.group)
    return (q * m.scales.astype(np.float32)[:, :, None]).reshape(out, inp)


def expert_matrix_bytes(out: int, inp: int, precision: str, group: int = DEFAULT_INT4_GROUP,
                        bf16_itemsize: int = 2) -> int:
    """Stored bytes of one [out, in] expert matrix at ``precision`` (bf16: ``bf16_itemsize`` bytes a weight)."""
    check_precision(precision, group)
    if precision == "bf16":
        return out * inp * bf16_itemsize
    if precision == "int8":
        return out * inp + out * 4
    return out * inp // 2 + out * (inp // min(group, inp)) * 2
