"""Keeping a GPU budget: XLA may allocate no more than the budget, and every run reports what it used.

By default XLA preallocates 75% of the GPU when JAX starts, so "24 GiB on an 80 GB card" would be a number in
the engine's accounting only. ``cap_xla_allocator(budget)`` makes it real before JAX's GPU client starts:
``XLA_PYTHON_CLIENT_PREALLOCATE=false`` (allocate on demand) and ``XLA_PYTHON_CLIENT_MEM_FRACTION`` =
budget / the card's total memory (read from the CUDA driver), so XLA's allocator limit — ``bytes_limit`` in
``device.memory_stats()`` — is the budget and anything beyond it is an out-of-memory error, not silent overuse.
``usage()`` reads the allocator's statistics; ``check_within(budget)`` turns a peak above the budget into an
error. The CUDA context and cuBLAS workspaces live outside XLA's allocator (a few hundred MiB) and are not
counted, as in every framework's memory statistics.

The limit is fixed when JAX's GPU client starts: one process keeps one budget (sweep budgets in separate
processes: one ``fiddler-jax bench -m`` per budget).
"""
from __future__ import annotations

import ctypes
import math
import os

from fiddler_jax.errors import FiddlerError, InvalidInputError
from fiddler_jax.units import format_bytes, parse_bytes

PREALLOCATE, FRACTION = "XLA_PYTHON_CLIENT_PREALLOCATE", "XLA_PYTHON_CLIENT_MEM_FRACTION"


class BudgetExceededError(FiddlerError):
    """A run whose peak GPU memory went above its budget (a failed run)."""


def cuda_total_memory(ordinal: int = 0) -> int | None:
    """Total memory of CUDA device ``ordinal`` (after CUDA_VISIBLE_DEVICES) from the driver, or None without
    a CUDA driver. Creates no context."""
    try:
        cuda = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return None
    dev, total = ctypes.c_int(), ctypes.c_size_t()
    if cuda.cuInit(0) != 0 or cuda.cuDeviceGet(ctypes.byref(dev), ordinal) != 0:
        return None
    if cuda.cuDeviceTotalMem_v2(ctypes.byref(total), dev) != 0:
        return None
    return int(total.value)


def jax_started() -> bool:
    """Whether JAX has created its backends (after which the allocator settings no longer apply)."""
    try:
        from jax._src import xla_bridge
    except ImportError:  # pragma: no cover - layout of a future jax
        return True
    started = getattr(xla_bridge, "backends_are_initialized", None)
    return bool(started()) if started is not None else bool(getattr(xla_bridge, "_backends", {}))


def cap_xla_allocator(budget: int | str) -> dict:
    """Limit XLA's GPU allocator to ``budget`` (call before the first JAX computation). Returns what was set;
    ``{"capped": False, "why": ...}`` when there is no CUDA GPU, and an error when JAX already started with a
    different limit."""
    nbytes = parse_bytes(budget)
    total = cuda_total_memory()
    if total is None:
        return {"capped": False, "why": "no CUDA driver: nothing to cap"}
    if nbytes > total:
        raise InvalidInputError(f"gpu_budget {format_bytes(nbytes)} is more than the GPU has "
                                f"({format_bytes(total)}); lower hardware.gpu_budget")
    # Rounded down: XLA's limit is fraction x total, and rounding up gave a 48 GiB limit 2 MiB above the budget
    # (the run then failed its budget by those 2 MiB).
    fraction = f"{math.floor(nbytes / total * 1e6) / 1e6:.6f}"
    if jax_started():
        limit = current_limit()
        if limit is not None and abs(limit - nbytes) > max(64 << 20, nbytes // 200):
            raise InvalidInputError(
                f"JAX already started with a GPU allocator limit of {format_bytes(limit)}, so this process cannot "
                f"keep a {format_bytes(nbytes)} budget: XLA fixes the limit at start-up. Run one process per "
                "budget (one `fiddler-jax bench -m ...` per hardware.gpu_budget)")
        return {"capped": limit is not None, "bytes_limit": limit, "total": total}
    os.environ[PREALLOCATE] = "false"
    os.environ[FRACTION] = fraction
    return {"capped": True, "fraction": float(fraction), "total": total}


def current_limit() -> int | None:
    import jax

    stats = jax.devices()[0].memory_stats() or {}
    return stats.get("bytes_limit")


def usage() -> dict:
    """XLA allocator statistics of the first device: bytes in use, peak, limit (None on backends without)."""
    import jax

    stats = jax.devices()[0].memory_stats() or {}
    return {"bytes_in_use": stats.get("bytes_in_use"), "peak_bytes_in_use": stats.get("peak_bytes_in_use"),
            "bytes_limit": stats.get("bytes_limit")}


def check_within(budget: int | str, peak: int | None) -> None:
    """Raise BudgetExceededError when ``peak`` is above ``budget``."""
    nbytes = parse_bytes(budget)
    if peak is not None and peak > nbytes:
        raise BudgetExceededError(f"peak GPU memory {format_bytes(peak)} exceeded the {format_bytes(nbytes)} budget "
                                  f"by {format_bytes(peak - nbytes)}: the run failed its budget")
