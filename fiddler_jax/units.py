"""Byte counts written for people: "24GiB", "512MiB", "5GB" (decimal and binary units) and back."""
from __future__ import annotations

import re

import numpy as np

from fiddler_jax.errors import InvalidInputError

_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_bytes(size: int | str) -> int:
    """Bytes from an int or a string such as "24GiB", "12MiB", "1.5GB", "4096"."""
    if isinstance(size, (int, np.integer)) and not isinstance(size, bool):
        if size < 0:
            raise InvalidInputError(f"a byte count must be non-negative, got {size}")
        return int(size)
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B?)\s*", str(size), re.IGNORECASE)
    unit = m and m.group(2).upper()
    if not m or unit not in _UNITS:
        raise InvalidInputError(f"{size!r} is not a size; write e.g. 24GiB, 512MiB, 80GB or a byte count")
    return int(float(m.group(1)) * _UNITS[unit])


def format_bytes(n: float) -> str:
    """A byte count in the largest binary unit that keeps it below 1024, e.g. "22.3 GiB"."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    raise AssertionError
