"""What a planner returns: one layer step's lane for each expert, the copy order and the predicted costs.

Lanes: ``GPU`` (weights resident, in the dynamic cache, or a prefetched copy), ``CPU`` (activations go to the
CPU kernel), ``TRANSFER`` (copy the weights into a GPU staging slot, then compute on the GPU), ``IDLE`` (no
tokens). A ``Plan`` holds no buffers and no state: the executor runs it over the lanes.
"""
from __future__ import annotations

import dataclasses
import enum

import numpy as np

from fiddler_jax.errors import InvalidInputError


class PlannerError(InvalidInputError):
    """A planner that cannot plan: unknown name or parameter, bad counts, or experts that do not fit its rule."""


class Lane(enum.IntEnum):
    IDLE = 0
    GPU = 1
    CPU = 2
    TRANSFER = 3


IDLE, GPU, CPU, TRANSFER = (int(lane) for lane in Lane)  # plain ints: enum lookups cost on the hot path


@dataclasses.dataclass(frozen=True, eq=False)
class Plan:
    """One layer step's decision. ``lanes`` (int8 [E]) holds Lane codes; copy i of ``transfer_order`` uses
    staging slot ``i % staging_slots``; ``cached`` marks GPU experts served by the dynamic cache rather than
    static placement, ``staged`` those served by a prefetched copy."""

    planner: str
    counts: np.ndarray  # int32 [E]
    lanes: np.ndarray  # int8 [E], Lane codes
    transfer_order: np.ndarray  # int32 [copies], expert ids in copy order
    staging_slots: int
    concurrent: bool
    predicted_s: float
    lane_busy_s: dict  # "gpu", "cpu", "pcie": predicted seconds of work on each lane
    cached: np.ndarray  # bool [E]
    staged: np.ndarray = None  # bool [E]: GPU experts served by a prefetched copy (planning.prefetch)

    def __post_init__(self):
        if self.staged is None:
            object.__setattr__(self, "staged", np.zeros(len(self.lanes), bool))

    def experts(self, lane: Lane) -> np.ndarray:
        return np.flatnonzero(self.lanes == lane)

    @property
    def transfer_slots(self) -> np.ndarray:
        return np.arange(len(self.transfer_order), dtype=np.int32) % max(self.staging_slots, 1)

    def __str__(self) -> str:
        def group(ids):
            return " ".join(f"{e}:{self.counts[e]}" for e in ids) or "-"

        busy = " ".join(f"{k} {v * 1e3:.2f}" for k, v in self.lane_busy_s.items())
        return (f"{self.planner} {self.predicted_s * 1e3:.2f} ms {'concurrent' if self.concurrent else 'sequential'}"
                f" | gpu {group(self.experts(Lane.GPU))} | cpu {group(self.experts(Lane.CPU))}"
                f" | transfer {group(self.transfer_order)} | busy ms {busy}")
