"""Memory-mapped reading of ``.safetensors`` files, with every header field validated.

Format (huggingface/safetensors): 8 bytes little-endian header length n, n bytes of JSON
``{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}``, then the raw little-endian
tensor bytes, offsets relative to the end of the header. We map the file once with ``np.memmap`` and hand out
zero-copy numpy views (bfloat16 through ``ml_dtypes``, which numpy alone lacks), so a 90 GB checkpoint is never
held twice in host memory. A truncated, corrupt or unreadable file raises :class:`CheckpointError` naming file
and tensor; :func:`all_finite` checks a tensor for NaN/inf at about memory speed as it is loaded.
"""
from __future__ import annotations

import json
import math
import os
import struct

import ml_dtypes
import numpy as np

from fiddler_jax.errors import CheckpointError

DTYPES = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "I64": np.dtype(np.int64), "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16), "I8": np.dtype(np.int8), "U8": np.dtype(np.uint8), "BOOL": np.dtype(np.bool_),
}
_MAX_HEADER = 100 * 1024 * 1024
FLOAT_DTYPES = frozenset({DTYPES["F64"], DTYPES["F32"], DTYPES["F16"], DTYPES["BF16"]})
# IEEE layout of each float dtype as (unsigned int of its width, all bits but the sign, the exponent bits): a value
# is NaN or ±inf exactly when its bits without the sign are ≥ the exponent bits (all exponent bits set).
_NONFINITE_BITS = {
    DTYPES["F16"]: (np.uint16, 0x7FFF, 0x7C00), DTYPES["BF16"]: (np.uint16, 0x7FFF, 0x7F80),
    DTYPES["F32"]: (np.uint32, 0x7FFF_FFFF, 0x7F80_0000), DTYPES["F64"]: (np.uint64, 2**63 - 1, 0x7FF << 52),
}
_CHUNK = 1 << 20  # elements per step of all_finite: the scratch buffer stays in cache


def unreadable(path: str, err: OSError) -> str:
    """The one-line message for a file the OS will not let us read (``cannot read <path>: <reason>; <fix>``)."""
    if isinstance(err, PermissionError):
        return (f"cannot read {path}: permission denied; make it readable by the user running fiddler-jax "
                "(chmod a+r, and a+x on its folders)")
    if isinstance(err, IsADirectoryError):
        return f"cannot read {path}: it is a folder, not a file; replace it with the file it should be"
    reason = (err.strerror or str(err) or type(err).__name__).lower()
    return f"cannot read {path}: {reason}; check the file and the disk it is on"


def all_finite(a: np.ndarray) -> bool:
    """Whether float array ``a`` holds no NaN or inf: one vectorised pass over its bits, in cache-sized chunks (no
    full-size temporary; about memory speed, so a check of weights on their way to the device costs little)."""
    if a.size == 0:
        return True
    uint, body, exponent = _NONFINITE_BITS[a.dtype]
    bits = np.ascontiguousarray(a).reshape(-1).view(uint)
    if bits.size <= _CHUNK:
        return int(np.bitwise_and(bits, uint(body)).max()) < exponent
    scratch = np.empty(_CHUNK, uint)
    for start in range(0, bits.size, _CHUNK):
        chunk = bits[start:start + _CHUNK]
        masked = np.bitwise_and(chunk, uint(body), out=scratch[:chunk.size])
        if int(masked.max()) >= exponent:
            return False
    return True


def count_nonfinite(a: np.ndarray) -> int:
    """How many NaN or inf values float array ``a`` holds (the slow, exact count for an error message)."""
    return int(np.count_nonzero(~np.isfinite(a.astype(np.float32) if a.dtype.itemsize < 4 else a)))


class SafetensorsFile:
    """One safetensors file, header parsed and validated at open, tensors as read-only mmap views."""

    def __init__(self, path: str):
        self.path = path
        try:
            size = os.path.getsize(path)
        except OSError as e:
            raise CheckpointError(unreadable(path, e)) from None
        hint = "the file is truncated or corrupt; download or save the checkpoint again"
        if size < 8:
            raise CheckpointError(f"{path}: {size} bytes is too short for a safetensors file; {hint}")
        try:
            with open(path, "rb") as f:
                (header_len,) = struct.unpack("<Q", f.read(8))
                if header_len > min(size - 8, _MAX_HEADER):
                    raise CheckpointError(f"{path}: header length {header_len} does not fit the file ({size} "
                                          f"bytes); {hint}")
                raw_header = f.read(header_len)
        except OSError as e:
            if isinstance(e, CheckpointError):
                raise
            raise CheckpointError(unreadable(path, e)) from None
        try:
            header = json.loads(raw_header)
        except (ValueError, RecursionError) as e:  # bad UTF-8 or JSON, an over-long integer, absurd nesting
            raise CheckpointError(f"{path}: the header is not valid JSON ({e}); {hint}") from None
        if not isinstance(header, dict):
            raise CheckpointError(f"{path}: the header is not a JSON object; {hint}")
        self.metadata = header.pop("__metadata__", None) or {}
        data_len = size - 8 - header_len
        self._offset = 8 + header_len
        self._entries: dict[str, tuple[np.dtype, tuple[int, ...], int, int]] = {}
        for name, info in header.items():
            try:
                dtype = DTYPES[info["dtype"]]
                shape = tuple(int(s) for s in info["shape"])
                begin, end = (int(o) for o in info["data_offsets"])
            except (KeyError, TypeError, ValueError) as e:
                raise CheckpointError(f"{path}: tensor {name!r} has an invalid header entry ({e!r}); {hint}") \
                    from None
            nbytes = math.prod(shape) * dtype.itemsize
            if not 0 <= begin <= end <= data_len or end - begin != nbytes:
                raise CheckpointError(
                    f"{path}: tensor {name!r} ({info['dtype']} {list(shape)}) needs bytes [{begin}, {begin + nbytes})"
                    f" but the file holds {data_len} data bytes; {hint}")
            self._entries[name] = (dtype, shape, begin, end)
        try:
            self._map = np.memmap(path, dtype=np.uint8, mode="r") if size > 0 else None
        except OSError as e:
            raise CheckpointError(unreadable(path, e)) from None

    def keys(self) -> list[str]:
        return list(self._entries)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._entries[name][1]

    def dtype(self, name: str) -> np.dtype:
        return self._entries[name][0]

    def tensor(self, name: str) -> np.ndarray:
        """A zero-copy, read-only view of tensor ``name``."""
        dtype, shape, begin, end = self._entries[name]
        raw = self._map[self._offset + begin:self._offset + end]
        return raw.view(dtype).reshape(shape)
