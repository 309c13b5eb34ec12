"""The measured cost of a synced layer step over a streamed one (runtime.sync_penalty) and ``planner.sync_s``."""
from __future__ import annotations

import dataclasses
import warnings

import numpy as np
import pytest

from fiddler_jax.assets import default_model_path
from fiddler_jax.errors import InvalidInputError
from fiddler_jax.runtime import sync_penalty
from fiddler_jax.runtime.engine import Engine
from fiddler_jax.runtime.generate import GenerationStats
from fiddler_jax.runtime.options import EngineOptions


@pytest.fixture(scope="module")
def engine():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return Engine.from_pretrained(default_model_path(), gpu_budget=10**9, planner="fiddler_overlap",
                                      resident_experts=4, dtype="float32")


def fake_decode(monkeypatch, synced_s: float, streamed_s: float, calls: list):
    """Engines' decode timed as ``synced_s`` / ``streamed_s`` by their streamed-lane option, noting each call."""
    def generate_with_stats(self, prompt, tokens, *args, **kwargs):
        calls.append((self.planner.name, self.options.streamed_cpu_lane, tokens))
        decode = streamed_s if self.options.streamed_cpu_lane else synced_s
        return np.asarray(prompt), GenerationStats(new_tokens=tokens, decode_s=decode)

    monkeypatch.setattr(Engine, "generate_with_stats", generate_with_stats)


def test_the_penalty_is_the_synced_decode_over_the_streamed_per_planned_layer_step(engine, monkeypatch):
    layers = sync_penalty.planned_layers(engine)
    assert layers == int((~engine.placement.resident).any(1).sum()) and layers > 0
    calls = []
    fake_decode(monkeypatch, synced_s=0.5, streamed_s=0.1, calls=calls)
    penalty = sync_penalty.measure_sync_penalty(engine, tokens=5, repeats=3)
    assert penalty == pytest.approx(0.4 / (3 * layers))  # decode_s: the 5 new tokens but the first two
    assert len(calls) == 2 + 2 * 3 and {c[0] for c in calls} == {"cpu_only"} and {c[2] for c in calls} == {5}
    assert sorted(c[1] for c in calls) == [False] * 4 + [True] * 4  # both ways, compiled once untimed
    calls.clear()
    fake_decode(monkeypatch, synced_s=0.1, streamed_s=0.1, calls=calls)
    assert sync_penalty.measure_sync_penalty(engine) == engine.latency.sync_s  # never under the round trip


def test_an_engine_that_cannot_stream_pays_the_round_trip_without_measuring(engine, monkeypatch):
    monkeypatch.setattr(Engine, "generate_with_stats", lambda *a, **k: pytest.fail("measured"))
    for options in (EngineOptions(streamed_cpu_lane=False), EngineOptions(cpu_backend="xla")):
        synced = engine.with_planner("fiddler_overlap", options=options)
        assert sync_penalty.measure_sync_penalty(synced) == engine.latency.sync_s
    with pytest.raises(InvalidInputError, match="tokens >= 3"):
        sync_penalty.measure_sync_penalty(engine, tokens=2)


def test_measured_on_the_engine_itself_it_is_at_least_the_round_trip(engine):
    """Real decodes on the bundled model (CPU): the streamed and synced engines run; the result is a number no
    smaller than the calibrated round trip (on a CPU-only host the difference itself is microseconds)."""
    zero = engine.with_planner("fiddler_overlap", latency=dataclasses.replace(engine.latency, sync_s=0.0))
    penalty = sync_penalty.measure_sync_penalty(zero, tokens=4, repeats=1)
    assert np.isfinite(penalty) and penalty >= 0.0
    assert sync_penalty.measure_sync_penalty(engine, tokens=4, repeats=1) >= engine.latency.sync_s
