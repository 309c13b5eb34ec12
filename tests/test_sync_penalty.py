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


def bundled(dtype: str, resident_experts: int = 4, planner: str = "fiddler_overlap", cache_slots: int = 0) -> Engine:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return Engine.from_pretrained(default_model_path(), gpu_budget=10**9, planner=planner,
                                      resident_experts=resident_experts, dtype=dtype, cache_slots=cache_slots)


@pytest.fixture(scope="module")
def engine():
    """The bundled model in bfloat16 with most experts offloaded: every layer's decode step streams."""
    return bundled("bfloat16")


def fake_decode(monkeypatch, synced_s: float, streamed_s: float, calls: list):
    """Engines' decode timed as ``synced_s`` / ``streamed_s`` by their streamed-lane option, noting each call."""
    def generate_with_stats(self, prompt, tokens, *args, **kwargs):
        calls.append((self.planner.name, self.options.streamed_cpu_lane, tokens))
        decode = streamed_s if self.options.streamed_cpu_lane else synced_s
        return np.asarray(prompt), GenerationStats(new_tokens=tokens, decode_s=decode)

    monkeypatch.setattr(Engine, "generate_with_stats", generate_with_stats)


def test_the_penalty_is_the_synced_decode_over_the_streamed_per_streamed_layer_step(engine, monkeypatch):
    layers = sync_penalty.streamed_layers(engine)
    assert layers == engine.config.num_hidden_layers  # every layer offloads experts and streams
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
    float32, resident = bundled("float32"), bundled("bfloat16", resident_experts=32)
    assert sync_penalty.streamed_layers(float32) == 0  # no kernel tables: no step streams
    assert sync_penalty.streamed_layers(resident) == 0  # nothing offloaded: no step plans
    lru = bundled("bfloat16", planner="lru", cache_slots=1)  # a dynamic cache: never streams
    monkeypatch.setattr(Engine, "generate_with_stats", lambda *a, **k: pytest.fail("measured"))
    for options in (EngineOptions(streamed_cpu_lane=False), EngineOptions(cpu_backend="xla")):
        synced = engine.with_planner("fiddler_overlap", options=options)
        assert sync_penalty.measure_sync_penalty(synced) == engine.latency.sync_s
    for other in (float32, resident, lru):
        assert sync_penalty.measure_sync_penalty(other) == other.latency.sync_s
    with pytest.raises(InvalidInputError, match="tokens >= 3"):
        sync_penalty.measure_sync_penalty(engine, tokens=2)


def test_measured_on_the_engine_itself(engine):
    """Real decodes on the bundled model in bfloat16 (CPU): both engines run and stream as they should -- no step
    of the streamed one is planned on the host, every step of the synced one is -- and the result is finite, no smaller
    than the calibrated round trip (on a CPU-only host the difference itself is microseconds)."""
    runs = []
    real = Engine.generate_with_stats

    def noted(self, *args, **kwargs):
        out = real(self, *args, **kwargs)
        runs.append((self.options.streamed_cpu_lane, sum("plan" in step.spans for step in self.trace.steps)))
        return out

    zero = engine.with_planner("fiddler_overlap", latency=dataclasses.replace(engine.latency, sync_s=0.0))
    with pytest.MonkeyPatch.context() as m:
        m.setattr(Engine, "generate_with_stats", noted)
        penalty = sync_penalty.measure_sync_penalty(zero, tokens=4, repeats=1)
    assert np.isfinite(penalty) and penalty >= 0.0
    layers = engine.config.num_hidden_layers
    assert {streamed: planned for streamed, planned in runs if streamed} == {True: 0}
    assert all(planned >= 4 * layers for streamed, planned in runs if not streamed)
