"""Letting go of compiled XLA programs between jobs that share one process.

XLA:CPU places each compiled program's machine code, constants and data in memory mappings of their own (three
per program), and JAX keeps every program it compiled in its caches for the life of the process. Linux caps a
process at ``vm.max_map_count`` mappings (65530 by default); past it ``mmap`` fails inside the compiler and the
process dies with a segmentation fault or an abort, wherever it happens to be compiling. One engine build and
decode compiles a few hundred programs (each layer shape, step size and lane), so a process that runs many jobs
one after another -- a Hydra multirun on the basic launcher, ``fiddler-jax bench-jobs``, a notebook sweeping
configs, the test suite -- reaches the cap after some tens of engines.

``release_compiled_programs`` clears JAX's caches and collects garbage, so the programs that nothing references
any more are freed and their mappings unmapped. Programs still referenced (a live engine's jitted functions) are
compiled again on their next call; results do not change. The Hydra commands call it after each job; an engine
build, and ``bench-jobs`` between jobs (which may share an engine), call ``release_if_near_mapping_limit`` (a
notebook building engine after engine never reaches the cap).
"""
from __future__ import annotations

import gc
import sys


def mapping_count() -> int | None:
    """How many memory mappings this process has (``/proc/self/maps``), or None where that is not readable."""
    try:
        with open("/proc/self/maps", "rb") as f:
            return sum(1 for _ in f)
    except OSError:
        return None


def mapping_limit() -> int | None:
    """The kernel's cap on mappings per process (``vm.max_map_count``), or None where that is not readable."""
    try:
        with open("/proc/sys/vm/max_map_count") as f:
            return int(f.read().strip())
    except (OSError, ValueError):
        return None


def release_compiled_programs() -> None:
    """Clear JAX's compilation caches and collect garbage: the compiled programs nobody references are freed
    (module docstring). Cheap when little was compiled; the next call of each jitted function compiles again.
    Nothing to do in a process that never imported JAX (it compiled nothing)."""
    jax = sys.modules.get("jax")
    if jax is None:
        return
    jax.clear_caches()
    gc.collect()


def release_if_near_mapping_limit(fraction: float = 0.5) -> bool:
    """Release the compiled programs when this process holds more than ``fraction`` of the kernel's cap on
    mappings, leaving room for what comes next (an engine build compiles a few hundred programs). Returns whether
    it released; where either count is unknown it does nothing."""
    count, limit = mapping_count(), mapping_limit()
    if count is None or limit is None or count <= fraction * limit:
        return False
    release_compiled_programs()
    return True
