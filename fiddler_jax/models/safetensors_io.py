"""Memory-mapped reading of ``.safetensors`` files, with every header field validated.

Format (huggingface/safetensors): 8 bytes little-endian header length n, n bytes of JSON
``{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}``, then the raw little-endian
tensor bytes, offsets relative to the end of the header. We map the file once with ``np.memmap`` and hand out
zero-copy numpy views (bfloat16 through ``ml_dtypes``, which numpy alone lacks), so a 90 GB checkpoint is never
held twice in host memory. A truncated or corrupt file raises :class:`CheckpointError` naming file and tensor.
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


class SafetensorsFile:
    """One safetensors file, header parsed and validated at open, tensors as read-only mmap views."""

    def __init__(self, path: str):
        self.path = path
        try:
            size = os.path.getsize(path)
        except OSError as e:
            raise CheckpointError(f"cannot read {path}: {e.strerror}") from None
        hint = "the file is truncated or corrupt; download or save the checkpoint again"
        if size < 8:
            raise CheckpointError(f"{path}: {size} bytes is too short for a safetensors file; {hint}")
        with open(path, "rb") as f:
            (header_len,) = struct.unpack("<Q", f.read(8))
            if header_len > min(size - 8, _MAX_HEADER):
                raise CheckpointError(f"{path}: header length {header_len} does not fit the file ({size} bytes); "
                                      f"{hint}")
            try:
                header = json.loads(f.read(header_len))
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
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
        self._map = np.memmap(path, dtype=np.uint8, mode="r") if size > 0 else None

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
