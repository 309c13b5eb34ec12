"""What a layer step that syncs with the host costs this engine over one that streams, measured on the engine.

The latency model's ``sync_s`` is calibrated as a tiny jitted op's round trip (:mod:`~fiddler_jax.runtime.calibrate`):
the host waits for a small result. A decode step that leaves the streamed lane costs the engine more than that:
the GPU's queue drains while the host waits for the routing counts and plans, the layer's pieces are dispatched
one by one instead of inside the token's program, and the CPU lane no longer starts beside the resident mix. The
planner weighs that cost against what a copy saves (a plan that copies cannot stream), so an undercounted sync
makes it copy where streaming is faster.

Measurement: the same greedy decode on this engine's resources with the ``cpu_only`` planner (whose every step
could stream) twice -- streamed (the engine's options) and with every step synced (``streamed_cpu_lane=False``) --
alternating, each compiled by an untimed run first. The penalty is the median over ``repeats`` pairs of
(synced − streamed) steady-state decode seconds (``GenerationStats.decode_s``: the new tokens but the first two)
over the layer steps that streamed in one and synced in the other (those tokens × the layers whose one-token step
takes the streamed lane), and never less than the latency model's ``sync_s`` (the round trip is a part of it). An
engine none of whose steps can stream (nothing offloaded, a dynamic cache, the streamed lane switched off, the XLA
CPU backend, weights without kernel tables such as float32) has no alternative to the sync: its penalty is
``sync_s``, and nothing is run.
"""
from __future__ import annotations

import statistics

import numpy as np

from fiddler_jax.errors import InvalidInputError


def streamed_layers(engine) -> int:
    """The layers whose one-token decode step takes the streamed lane under the ``cpu_only`` planner (an expert of
    theirs is offloaded and the lane can run them: it is on, the backend is the kernel, the weights have kernel
    tables); the other layers sync, or never plan, in both runs. An engine with a dynamic cache has none."""
    if engine.cache_slots:  # cpu_only has no cache to bind to these buffers, and a cached engine never streams
        return 0
    return _streamed_layers(engine.with_planner("cpu_only", options=engine.options))


def _streamed_layers(cpu_only) -> int:
    offloaded = (~cpu_only.placement.resident).any(axis=1)
    return sum(cpu_only.streamed.tables_id(layer, 1) is not None for layer in np.flatnonzero(offloaded))


def measure_sync_penalty(engine, *, tokens: int = 10, prompt_tokens: int = 8, repeats: int = 3) -> float:
    """Seconds one synced layer step costs ``engine`` over a streamed one (module docstring)."""
    if tokens < 3 or prompt_tokens < 1 or repeats < 1:
        raise InvalidInputError(f"measure_sync_penalty needs tokens >= 3, prompt_tokens >= 1 and repeats >= 1; got "
                                f"{tokens}, {prompt_tokens}, {repeats}")
    if engine.cache_slots:
        return engine.latency.sync_s
    options = engine.options
    streamed = engine.with_planner("cpu_only", options=options)
    layers = _streamed_layers(streamed)
    if layers == 0:
        return engine.latency.sync_s
    from fiddler_jax.kernels import streamed_lane

    streamed_lane.set_timing(False)  # untraced steps, as an engine runs them unless asked to trace
    synced = engine.with_planner("cpu_only", options=options.replace(streamed_cpu_lane=False))
    prompt = (np.arange(prompt_tokens)[None] * 7 + 3) % engine.config.vocab_size

    def decode_s(e) -> float:
        _, stats = e.generate_with_stats(prompt, tokens, eos_token_id=[])
        return stats.decode_s

    decode_s(streamed), decode_s(synced)  # compile both
    steps = (tokens - 2) * layers  # decode_s times the one-token steps after the first (GenerationStats)
    differences = [(decode_s(synced) - decode_s(streamed)) / steps for _ in range(repeats)]
    return max(engine.latency.sync_s, float(statistics.median(differences)))
