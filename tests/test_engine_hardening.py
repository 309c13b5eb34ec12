"""The engine refuses what would go wrong before it does: calls that share one engine from several threads run
one at a time and give the single-threaded results; every call's rows and cache length are checked against the
KV reserve placed inside the budget; gpu_only with offloaded experts, a profile of another model and offloaded
experts that cannot fit in host memory are refused before anything is loaded; placement and latency-file errors
say exactly what is wrong."""
from __future__ import annotations

import threading

import numpy as np
import pytest

import fiddler_jax as fj
from fiddler_jax.errors import InvalidInputError
from fiddler_jax.runtime import engine as E
from fiddler_jax.runtime import host_experts
from fiddler_jax.runtime.latency import LatencyModel, LatencyModelError
from fiddler_jax.runtime.placement import place
from fiddler_jax.runtime.planning import PlannerError
from fiddler_jax.runtime.profiling import RoutingProfile
from tests.conftest import GEOMETRIES, make_hf_model, token_ids


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("hardening")
    make_hf_model(GEOMETRIES["gqa_headdim_window"], seed=4).save_pretrained(path)  # 2 layers x 4 experts, top-2
    return str(path), fj.load_pretrained(path, progress=False)


def _engine(path, **kw):
    kw = {"gpu_budget": 10**9, "resident_experts": 2, "dtype": "float32", "progress": False, **kw}
    return E.Engine.from_pretrained(path, **kw)


@pytest.mark.parametrize("planner", ["fiddler_overlap", "transfer", "lru"])
def test_threads_sharing_an_engine_get_the_single_threaded_results(checkpoint, planner):
    path, reference = checkpoint
    engine = _engine(path, planner=planner, max_batch=2)
    prompts = [token_ids(97, (1, 6), seed=s) for s in range(4)]
    expected = [fj.generate(reference, p, 12, eos_token_id=[]) for p in prompts]
    errors, results = [], {}

    def work(i):
        try:
            for _ in range(2):
                results[i] = engine.generate(prompts[i], 12, eos_token_id=[])
        except Exception as e:  # noqa: BLE001 -- the test reports every failure
            errors.append(repr(e))

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors
    for i, want in enumerate(expected):
        np.testing.assert_array_equal(results[i], want)
    # engines made by with_planner share the buffers, so they share the lock too
    assert engine.with_planner(planner).resources.lock is engine.resources.lock


def test_calls_beyond_the_kv_reserve_are_refused(checkpoint):
    path, reference = checkpoint
    engine = _engine(path, planner="cpu_only", max_batch=1, max_context=64)
    with pytest.raises(InvalidInputError, match=r"generate: 2 sequence\(s\) × 64 cache positions .*max_batch"):
        engine.generate_with_stats(token_ids(97, (2, 20)), 10, eos_token_id=[])
    with pytest.raises(InvalidInputError, match=r"logits: 2 sequence\(s\) × 40 cache positions"):
        engine.logits(token_ids(97, (2, 40)))
    with pytest.raises(InvalidInputError, match="KV cache"):
        engine.generate(token_ids(97, (1, 60)), 20, eos_token_id=[])  # a prompt + output longer than max_context
    ids = token_ids(97, (1, 20))  # within the reserve: runs, and gives the plain model's tokens
    np.testing.assert_array_equal(engine.generate(ids, 10, eos_token_id=[]),
                                  fj.generate(reference, ids, 10, eos_token_id=[]))
    assert engine.logits(token_ids(97, (1, 64))).shape == (1, 64, 97)


def _no_loading(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the checkpoint was loaded before the error")

    monkeypatch.setattr(E, "load_split", refuse)


def test_gpu_only_with_offloaded_experts_is_refused_before_loading(checkpoint, monkeypatch):
    path, _ = checkpoint
    engine = _engine(path, planner="cpu_only")
    with pytest.raises(PlannerError, match="gpu_only: 6 of 8 experts are not on the GPU.*raise gpu_budget"):
        engine.with_planner("gpu_only")
    _no_loading(monkeypatch)
    with pytest.raises(PlannerError, match="gpu_only"):
        _engine(path, planner="gpu_only")


def test_a_profile_of_another_model_is_refused_before_loading(checkpoint, tmp_path, monkeypatch):
    path, model = checkpoint
    other = RoutingProfile(np.ones((2, 4), np.int64), 10, "0" * 64, "another model")
    other.save(tmp_path / "other.json")
    _no_loading(monkeypatch)
    with pytest.raises(InvalidInputError, match="measured on another model"):
        _engine(path, profile=tmp_path / "other.json")


def test_offloaded_experts_beyond_the_host_memory_are_refused_before_loading(checkpoint, monkeypatch):
    path, _ = checkpoint
    monkeypatch.setattr(host_experts, "available_host_memory", lambda: 1000)
    _no_loading(monkeypatch)
    with pytest.raises(host_experts.HostMemoryError, match=r"need .* of pinned host memory, but this machine has "
                                                           r"1000 B available"):
        _engine(path)


def test_placement_errors_say_which_value_and_why():
    from fiddler_jax.models.config import ModelConfig

    cfg = ModelConfig.from_hf_dict({"model_type": "mixtral", "hidden_size": 64, "intermediate_size": 128,
                                      "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
                                      "vocab_size": 97, "max_position_embeddings": 128, "num_local_experts": 4,
                                      "num_experts_per_tok": 2})
    memory = place(cfg, "1GiB", itemsize=4).memory
    minimum = memory.fixed - memory.autotune  # what a budget needs before any expert is placed
    with pytest.raises(InvalidInputError) as e:
        place(cfg, minimum - 1, itemsize=4)  # one byte short: the rounded sizes read the same
    assert f"({minimum - 1:,} bytes) is below the minimum" in str(e.value)
    assert f"({minimum:,} bytes)" in str(e.value)
    for key, value in (("max_batch", 0), ("max_context", 0), ("max_step_tokens", 0), ("staging_slots", -1)):
        with pytest.raises(InvalidInputError, match=rf"^{key} must be ≥ \d; got {value}$"):
            place(cfg, "1GiB", **{key: value})


def test_a_routing_profile_passed_as_latency_says_so(tmp_path):
    RoutingProfile(np.ones((2, 4), np.int64), 10, "0" * 64, "").save(tmp_path / "profile.json")
    with pytest.raises(LatencyModelError, match="is a routing profile .* pass it as profile="):
        LatencyModel.load(tmp_path / "profile.json")
    (tmp_path / "list.json").write_text("[1, 2]")
    with pytest.raises(LatencyModelError, match="is not a latency model"):
        LatencyModel.load(tmp_path / "list.json")


def test_the_readme_engine_example_runs_as_written(tmp_path):
    """README's engine lines on the bundled model (its profile and calibration arguments left out)."""
    from fiddler_jax.assets import default_model_path

    path = default_model_path()
    input_ids = np.asarray(fj.load_tokenizer(path)("def fibonacci(n):")["input_ids"])[None]
    engine = fj.Engine.from_pretrained(path, gpu_budget="24GiB", planner="fiddler_overlap", dtype="bfloat16",
                                       progress=False)
    engine.logits(input_ids)
    beams = engine.generate(input_ids, 64, num_beams=4)
    tokens, stats = engine.generate_with_stats(input_ids, 64)
    assert beams.shape[1] <= input_ids.shape[1] + 64 and tokens.shape == (1, input_ids.shape[1] + 64)
    engine.trace.save(tmp_path / "trace.json")
    engine.with_planner("fiddler")
