"""The GPU lane's resident experts: each layer's resident experts as one stack of GPU weights, and the slot map
that says which expert sits in which row, so that a step's resident share -- with the shared expert's output,
for families with one, as its base -- is one queued ``stack_mix`` whatever the routing (plans never change
shapes, never recompile)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from fiddler_jax.models.moe import Routing
from fiddler_jax.runtime.segments import stack_mix


class GpuLane:
    """The resident experts' stacks and slot maps of every layer, and zeros for steps with no share."""

    def __init__(self, model, resident: np.ndarray, device: jax.Device):
        self.device, self.resident = device, resident
        self._stacks = [(l.mlp.w1[...], l.mlp.w3[...], l.mlp.w2[...]) if l.is_sparse else None for l in model.layers]
        self._slot_of = []
        for row in resident:
            slot_of = np.full(len(row), -1, np.int32)
            slot_of[row] = np.arange(int(row.sum()), dtype=np.int32)
            self._slot_of.append(jnp.asarray(slot_of))
        self._zeros: dict = {}

    def resident_mix(self, layer: int, moe_in, routing: Routing, shared=None) -> jax.Array:
        """The resident experts' share of the layer's MoE output plus ``shared`` (the shared expert's output, or
        None), float32 (queued, not waited for)."""
        if self.resident[layer].any():
            return stack_mix(moe_in, routing, self._slot_of[layer], *self._stacks[layer], shared)
        return self.zeros(moe_in.shape) if shared is None else shared

    def resident_arrays(self, layer: int):
        """(slot map, w1, w3, w2) of the layer's resident experts, or None when it has none."""
        return (self._slot_of[layer], *self._stacks[layer]) if self.resident[layer].any() else None

    def zeros(self, shape, *, host: bool = False):
        """Float32 zeros made once per (place, shape): arrays are immutable (the numpy one is made read-only), so a
        lane with no share reuses them instead of making a fill every step. On the device they are committed (the
        jitted pieces then always see committed inputs); on the host they are the CPU lane's empty output, which
        is numpy so the next step's jit sees one argument type."""
        key = (host, shape)
        if key not in self._zeros:
            if host:
                zeros = np.zeros(shape, np.float32)
                zeros.flags.writeable = False
            else:
                zeros = jnp.zeros(shape, jnp.float32, device=self.device)
            self._zeros[key] = zeros
        return self._zeros[key]
