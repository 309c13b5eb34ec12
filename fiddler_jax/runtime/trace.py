"""Per-layer timeline of the hybrid engine: what each planned layer step asked for, what the planner decided,
and when each lane was busy — saved as Chrome/Perfetto trace-event JSON (one track per lane) with a summary.

Times are host wall-clock (``time.perf_counter``) relative to the trace's creation; each lane's span runs from
the moment the engine starts or queues its work to the moment the host sees that work done: ``plan`` (the
routing sync and the planner), ``pcie`` (first copy queued → all copies landed), ``cpu`` (the worker thread's
activations fetch and kernel), ``gpu`` (resident work queued → all expert work of the step done; under a
concurrent plan it contains the copies it waits for). A streamed step (no sync) timed with events on the GPU stream
has its ``cpu`` span as the host ran it and GPU spans on the host clock: ``attention`` (the layer's attention and
router), ``gpu`` (the resident mix, beside the CPU lane) and ``cpu_wait`` (the stream held for the CPU lane's
output) -- :meth:`fiddler_jax.runtime.lanes.streamed.StreamedLane.drain`. ``overlap_s`` in the summary is the
time the CPU and PCIe lanes were busy at once — the concurrency Fiddler's sequential execution leaves unused.
Open the file in https://ui.perfetto.dev or chrome://tracing.
"""
from __future__ import annotations

import dataclasses
import json
import os
import time

import numpy as np

from fiddler_jax.runtime.planning.plan import Lane

LANES = ("plan", "pcie", "cpu", "gpu", "attention", "cpu_wait")


@dataclasses.dataclass(frozen=True)
class StepRecord:
    """One planned layer step. ``spans`` maps a lane to its (start, end) seconds on the trace clock."""

    layer: int
    counts: np.ndarray  # tokens routed to each expert
    lanes: np.ndarray  # Lane code of each expert
    predicted_s: float  # the planner's predicted makespan
    spans: dict[str, tuple[float, float]]
    prefetched: np.ndarray | None = None  # bool [E]: experts whose copy was started during the previous step
    staged_used: np.ndarray | None = None  # bool [E]: prefetched experts the plan ran on the GPU

    def busy_s(self, lane: str) -> float:
        start, end = self.spans.get(lane, (0.0, 0.0))
        return end - start

    def overlap_s(self, a: str, b: str) -> float:
        """Seconds both lanes were busy in this step."""
        if a not in self.spans or b not in self.spans:
            return 0.0
        (s1, e1), (s2, e2) = self.spans[a], self.spans[b]
        return max(0.0, min(e1, e2) - max(s1, s2))

    @property
    def wall_s(self) -> float:
        return max(end for _, end in self.spans.values()) - min(start for start, _ in self.spans.values())


class Trace:
    """The records of every planned layer step since creation or ``clear()``."""

    def __init__(self):
        self.steps: list[StepRecord] = []
        self.t0 = time.perf_counter()

    def now(self) -> float:
        return time.perf_counter() - self.t0

    def add(self, record: StepRecord) -> None:
        self.steps.append(record)

    def clear(self) -> None:
        self.steps.clear()
        self.t0 = time.perf_counter()

    def __len__(self) -> int:
        return len(self.steps)

    def summary(self) -> dict:
        """GPU-hit rate over active experts, experts and busy seconds per lane, idle time, predicted makespan, and
        how many steps copied 0, 1, 2, ... experts (``steps_by_copies``: a planner that copies in every step shows
        no 0)."""
        if not self.steps:
            return {"planned_steps": 0}
        active = np.concatenate([s.counts > 0 for s in self.steps])
        lanes = np.concatenate([s.lanes for s in self.steps])[active]
        wall = sum(s.wall_s for s in self.steps)
        busy = {lane: sum(s.busy_s(lane) for s in self.steps) for lane in LANES}
        return {
            "planned_steps": len(self.steps),
            "gpu_hit_rate": float((lanes == Lane.GPU).mean()),
            "experts_per_lane": {lane.name.lower(): int((lanes == lane).sum())
                                 for lane in (Lane.GPU, Lane.CPU, Lane.TRANSFER)},
            "busy_s": busy,
            "wall_s": wall,
            "idle_s": {lane: wall - b for lane, b in busy.items()},
            "overlap_s": {"cpu+pcie": sum(s.overlap_s("cpu", "pcie") for s in self.steps),
                          "cpu+gpu": sum(s.overlap_s("cpu", "gpu") for s in self.steps)},
            "predicted_s": float(sum(s.predicted_s for s in self.steps)),
            "steps_by_copies": self._steps_by_copies(),
            **self._prefetch_summary(),
        }

    def _steps_by_copies(self) -> dict[str, int]:
        """Steps per number of active experts the plan ran from a copy (keys as strings, for JSON)."""
        copies = [int(((s.counts > 0) & (s.lanes == Lane.TRANSFER)).sum()) for s in self.steps]
        return {str(n): copies.count(n) for n in sorted(set(copies))}

    def _prefetch_summary(self) -> dict:
        """Prefetched copies: how many, how many the step's routing then asked for (the prediction was right),
        how many ran on the GPU from the copy."""
        steps = [s for s in self.steps if s.prefetched is not None and s.prefetched.any()]
        if not steps:
            return {}
        copies = sum(int(s.prefetched.sum()) for s in steps)
        wanted = sum(int((s.prefetched & (s.counts > 0)).sum()) for s in steps)
        used = sum(int(s.staged_used.sum()) for s in steps)
        return {"prefetch": {"copies": copies, "wanted": wanted, "used": used,
                             "precision": wanted / copies, "steps_with_copies": len(steps)}}

    def to_chrome(self) -> dict:
        """Trace-event JSON: one complete ("X") event per lane span, lanes as threads of one process."""
        events = [{"ph": "M", "name": "process_name", "pid": 1, "args": {"name": "fiddler-jax engine"}}]
        events += [{"ph": "M", "name": "thread_name", "pid": 1, "tid": i, "args": {"name": lane}}
                   for i, lane in enumerate(LANES)]
        for n, step in enumerate(self.steps):
            active = np.flatnonzero(step.counts > 0)
            args = {"step": n, "layer": step.layer, "predicted_ms": round(step.predicted_s * 1e3, 3),
                    "experts": {int(e): {"tokens": int(step.counts[e]), "lane": Lane(int(step.lanes[e])).name}
                                for e in active}}
            for lane, (start, end) in step.spans.items():
                events.append({"ph": "X", "pid": 1, "tid": LANES.index(lane), "name": f"L{step.layer} {lane}",
                               "ts": start * 1e6, "dur": max(end - start, 0.0) * 1e6, "args": args})
        return {"traceEvents": events, "displayTimeUnit": "ms", "otherData": {"summary": self.summary()}}

    def save(self, path: str | os.PathLike) -> None:
        """Write the Perfetto/Chrome trace JSON (the summary rides along under ``otherData``)."""
        with open(path, "w") as f:
            json.dump(self.to_chrome(), f)
