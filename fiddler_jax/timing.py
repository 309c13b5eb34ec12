"""The one timing loop of the package's measurements (calibration, ceilings, the kernel benchmark): warm-up calls,
then timed calls until both a minimum count and a time budget are met, at most a maximum count. The median is
what every caller reports (robust to a noisy shared machine). Pure Python: no JAX, nothing to synchronise;
``fn`` must wait for its own work (``block_until_ready``) before it returns."""
from __future__ import annotations

import statistics
import time
from collections.abc import Callable


def sample(fn: Callable[[], object], budget_s: float = 0.0, min_reps: int = 3, max_reps: int = 50,
           warmup: int = 1) -> list[float]:
    """Seconds of each timed call of ``fn`` after ``warmup`` untimed ones (page faults, compilation): at least
    ``min_reps`` calls, more while ``budget_s`` seconds of timing last, never more than ``max_reps``."""
    for _ in range(warmup):
        fn()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < max_reps and (len(times) < min_reps or time.perf_counter() - start < budget_s):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


def median_time(fn: Callable[[], object], budget_s: float = 0.0, min_reps: int = 3, max_reps: int = 50,
                warmup: int = 1) -> float:
    """The median of :func:`sample`'s times (same arguments)."""
    return statistics.median(sample(fn, budget_s, min_reps, max_reps, warmup))


def median_of(fn: Callable[[], object], reps: int, warmup: int = 1) -> float:
    """The median seconds of exactly ``reps`` timed calls after ``warmup`` untimed ones."""
    return median_time(fn, 0.0, reps, reps, warmup)
