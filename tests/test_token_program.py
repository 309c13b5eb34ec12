"""A pass whose every layer is fused or streamed runs as one jitted program (runtime/token_program.py): it is
used exactly when no layer step needs the host, it computes the per-layer dispatches' logits and tokens (also
tests/test_streamed_lane.py), its streamed calls still reach the trace layer by layer, and a program that fails
leaves the lane usable."""
from __future__ import annotations

import numpy as np
import pytest

import fiddler_jax as fj
from fiddler_jax.assets import default_model_path
from fiddler_jax.runtime import engine as E
from fiddler_jax.runtime import step_loop as S
from fiddler_jax.runtime.options import EngineOptions
from tests.conftest import assert_recovers_from_injected_failure


@pytest.fixture(scope="module")
def engine():
    return E.Engine.from_pretrained(default_model_path(), gpu_budget=10**9, planner="cpu_only", resident_experts=8,
                                    dtype="bfloat16", progress=False)


def _prompt():
    path = default_model_path()
    return np.asarray(fj.load_tokenizer(path)("def fibonacci(n):\n    if n < 2:")["input_ids"])[None]


def test_decode_runs_as_one_program_with_the_per_layer_results(engine):
    ids = _prompt()
    engine.trace.clear()
    tokens = engine.generate(ids, 10, eos_token_id=[])
    program = engine.step_loop.program_for(1)
    layers = engine.config.num_hidden_layers
    assert program is not None and len(program[0]) == layers
    assert list(program[0]) == [not engine.placement.layer_all_resident(n) for n in range(layers)]
    # every streamed call of the program joined the trace as its layer's step
    decode = [s for s in engine.trace.steps if int(s.counts.sum()) == engine.config.num_experts_per_tok]
    assert len(decode) == 9 * sum(program[0])
    assert sorted({s.layer for s in decode}) == [n for n in range(layers) if program[0][n]]
    per_layer = engine.with_planner("cpu_only", options=EngineOptions(token_program=False))
    np.testing.assert_array_equal(per_layer.generate(ids, 10, eos_token_id=[]), tokens)
    assert per_layer.step_loop.program_for(1) is None
    np.testing.assert_array_equal(per_layer.logits(ids[:, :1]), engine.logits(ids[:, :1]))


def test_a_pass_that_needs_the_host_takes_the_per_layer_dispatches():
    """The paper's fiddler planner plans every step of a prompt on the host (with design latencies it copies
    experts for it): that pass has no program, and its tokens are those of the per-layer dispatches."""
    engine = E.Engine.from_pretrained(default_model_path(), gpu_budget=10**9, planner="fiddler", resident_experts=4,
                                      dtype="bfloat16", progress=False)
    ids = _prompt()
    tokens = engine.generate(ids, 4, eos_token_id=[])
    assert engine.step_loop.program_for(ids.shape[1]) is None
    assert any("plan" in s.spans for s in engine.trace.steps)  # the synced steps planned on the host
    per_layer = engine.with_planner("fiddler", options=EngineOptions(token_program=False))
    np.testing.assert_array_equal(per_layer.generate(ids, 4, eos_token_id=[]), tokens)


def test_a_program_that_raises_leaves_the_lane_usable(engine, monkeypatch):
    def failing(*args, **kwargs):
        def run(*a, **k):
            raise RuntimeError("injected program failure")
        return run

    assert_recovers_from_injected_failure(engine, monkeypatch, S, "token_program", failing)
