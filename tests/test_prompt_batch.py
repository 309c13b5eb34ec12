"""Batches of prompts of different lengths (fiddler_jax.runtime.prompt_batch): greedy generation of a left-padded
batch equals transformers' ``generate(input_ids, attention_mask=...)`` row by row in float32, equals generating
each prompt alone, and the same through the engine with most experts offloaded, for every planner; bad batches
get one clear error."""
from __future__ import annotations

import numpy as np
import pytest

import fiddler_jax as fj
from fiddler_jax.errors import InvalidInputError
from fiddler_jax.runtime import engine as E
from fiddler_jax.runtime.prompt_batch import left_padded, strip_padding
from tests.conftest import make_family_model

NEW = 10
LENGTHS = (7, 3, 12, 5)  # one row of the longest, the others padded by 5, 9 and 7


def _prompts(vocab: int, seed: int = 4) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(3, vocab, n) for n in LENGTHS]  # 0-2 are pad, bos and eos


@pytest.fixture(scope="module", params=["mixtral", "qwen3_moe"])
def model_pair(request, tmp_path_factory):
    """(transformers model, its folder) of a small random model: Mixtral with a sliding window shorter than the
    longest sequence, and Qwen3-MoE with q/k norms."""
    overrides = {"mixtral": dict(hidden_size=32, intermediate_size=48, num_attention_heads=4, num_key_value_heads=2,
                                 num_local_experts=4, num_experts_per_tok=2, sliding_window=9),
                 "qwen3_moe": dict(hidden_size=32, intermediate_size=48, moe_intermediate_size=24,
                                   num_attention_heads=4, num_key_value_heads=2, head_dim=8, num_experts=8,
                                   num_experts_per_tok=2, norm_topk_prob=True)}[request.param]
    hf = make_family_model(request.param, overrides, seed=3)
    path = tmp_path_factory.mktemp(f"batch_{request.param}")
    hf.save_pretrained(path)
    return hf, str(path)


def _transformers_batch(hf, prompts) -> np.ndarray:
    import torch

    ids, pad = left_padded(prompts, pad_token_id=0)
    mask = (np.arange(ids.shape[1])[None, :] >= pad[:, None]).astype(np.int64)
    with torch.no_grad():
        out = hf.generate(torch.as_tensor(ids), attention_mask=torch.as_tensor(mask), max_new_tokens=NEW,
                          min_new_tokens=NEW, do_sample=False, eos_token_id=None, pad_token_id=0)
    return out.numpy()


def test_left_padded_batches_equal_transformers_and_each_prompt_alone(model_pair):
    hf, path = model_pair
    model = fj.load_pretrained(path, progress=False)
    prompts = _prompts(hf.config.vocab_size)
    ours = fj.generate(model, prompts, NEW, eos_token_id=[])
    assert ours.shape == (len(prompts), max(LENGTHS) + NEW)
    np.testing.assert_array_equal(ours, _transformers_batch(hf, prompts))
    ids, pad = left_padded(prompts, pad_token_id=0)
    for row, prompt in zip(strip_padding(ours, pad), prompts):  # each row is what its prompt alone gives
        np.testing.assert_array_equal(row, fj.generate(model, prompt[None], NEW, eos_token_id=[])[0])
    # the array form with transformers' attention_mask is the same batch
    mask = np.arange(ids.shape[1])[None, :] >= pad[:, None]
    np.testing.assert_array_equal(fj.generate(model, ids, NEW, eos_token_id=[], attention_mask=mask.astype(int)), ours)


def test_a_row_that_stops_early_changes_no_other_row(model_pair):
    """The EOS of one row (its first greedy token, made the EOS id) leaves every other row as it was."""
    hf, path = model_pair
    model = fj.load_pretrained(path, progress=False)
    prompts = _prompts(hf.config.vocab_size)
    free = fj.generate(model, prompts, NEW, eos_token_id=[])
    width = max(LENGTHS)
    eos = int(free[1, width])  # row 1 stops at once
    if eos in free[[0, 2, 3], width:]:
        pytest.skip("the chosen EOS id also appears in another row")
    stopped = fj.generate(model, prompts, NEW, eos_token_id=eos)
    assert (stopped[1, width:] == eos).all()
    np.testing.assert_array_equal(stopped[[0, 2, 3]], free[[0, 2, 3]])


def test_each_row_stops_at_its_own_max_new_tokens(model_pair):
    """Per-row limits: row b's new tokens are the first limits[b] of an unlimited run (a row's limit changes no
    other row), then the fill token; a row's EOS still stops it first; the stats count each row's tokens; the
    engine gives the same; beam search refuses them."""
    from fiddler_jax.runtime.generate import fill_token

    hf, path = model_pair
    model = fj.load_pretrained(path, progress=False)
    prompts = _prompts(hf.config.vocab_size)
    width, limits = max(LENGTHS), [3, 0, NEW, 6]
    free = fj.generate(model, prompts, NEW, eos_token_id=[])
    out, stats = fj.generate_with_stats(model, prompts, limits, eos_token_id=[])
    fill = fill_token(model.config)
    assert out.shape == free.shape and stats.row_new_tokens == limits
    for b, n in enumerate(limits):
        np.testing.assert_array_equal(out[b, :width + n], free[b, :width + n])
        assert (out[b, width + n:] == fill).all()
    short, stats = fj.generate_with_stats(model, prompts, [2, 1, 4, 3], eos_token_id=[])
    assert short.shape == (len(prompts), width + 4) and stats.new_tokens == 4  # no step past the longest limit
    eos = int(free[2, width + 1])  # row 2's second token: it stops there, before its limit
    if eos in free[[0, 3], width:width + 6] or eos == int(free[2, width]):
        pytest.skip("the chosen EOS id also appears earlier or in another row")
    stopped, stats = fj.generate_with_stats(model, prompts, limits, eos_token_id=eos)
    assert stats.row_new_tokens == [3, 0, 2, 6] and (stopped[2, width + 1:] == eos).all()
    engine = E.Engine.from_pretrained(path, gpu_budget=10**9, planner="cpu_only", resident_experts=2,
                                      dtype="float32", max_batch=len(prompts), progress=False)
    np.testing.assert_array_equal(engine.generate(prompts, limits, eos_token_id=eos), stopped)
    with pytest.raises(InvalidInputError, match="beam search takes one max_new_tokens"):
        fj.generate(model, prompts, limits, num_beams=2)
    for bad in ([1, 2], [1, -1, 2, 3], [1.5, 1, 1, 1], "3"):
        with pytest.raises(InvalidInputError, match="max_new_tokens must be a non-negative integer"):
            fj.generate(model, prompts, bad)


@pytest.mark.parametrize("planner", ["fiddler_overlap", "fiddler", "cpu_only", "transfer", "lru"])
def test_the_engine_with_experts_offloaded_gives_the_batch_of_the_plain_model(model_pair, planner):
    hf, path = model_pair
    model = fj.load_pretrained(path, progress=False)
    prompts = _prompts(hf.config.vocab_size)
    expected = fj.generate(model, prompts, NEW, eos_token_id=[])
    engine = E.Engine.from_pretrained(path, gpu_budget=10**9, planner=planner, resident_experts=2, dtype="float32",
                                      max_batch=len(prompts), progress=False)
    np.testing.assert_array_equal(engine.generate(prompts, NEW, eos_token_id=[]), expected)
    assert engine.trace_summary()["experts_per_lane"]["gpu"] > 0


def test_beam_search_of_a_batch_searches_each_prompt_without_its_padding(model_pair):
    hf, path = model_pair
    model = fj.load_pretrained(path, progress=False)
    prompts = _prompts(hf.config.vocab_size)[:2]
    out = fj.generate(model, prompts, 6, num_beams=3, eos_token_id=[])
    _, pad = left_padded(prompts, pad_token_id=0)
    for row, prompt in zip(strip_padding(out, pad), prompts):
        np.testing.assert_array_equal(row, fj.generate(model, prompt[None], 6, num_beams=3, eos_token_id=[])[0])


def test_bad_batches_get_one_clear_error():
    with pytest.raises(InvalidInputError, match="not left-padded"):
        left_padded(np.ones((2, 4), int), np.array([[1, 1, 0, 0], [1, 1, 1, 1]]))
    with pytest.raises(InvalidInputError, match="row 1 of attention_mask has no token"):
        left_padded(np.ones((2, 3), int), np.array([[0, 1, 1], [0, 0, 0]]))
    with pytest.raises(InvalidInputError, match=r"attention_mask has shape \[2, 2\], but input_ids has \[2, 3\]"):
        left_padded(np.ones((2, 3), int), np.ones((2, 2), int))
    with pytest.raises(InvalidInputError, match="0 \\(padding\\) and 1 \\(a token\\) only"):
        left_padded(np.ones((1, 3), int), np.array([[0, 2, 1]]))
    with pytest.raises(InvalidInputError, match="prompt 1 of the batch is empty"):
        left_padded([[5, 6], []])
    with pytest.raises(InvalidInputError, match="goes with an input_ids array"):
        left_padded([[5, 6], [7]], np.ones((2, 2), int))
    from fiddler_jax.experiments.model_group import random_model_config
    from fiddler_jax.runtime.placement import place

    with pytest.raises(InvalidInputError, match="max_step_tokens=4 is below max_batch=8: a decode step holds"):
        place(random_model_config(None), "24GiB", max_batch=8, max_context=256, max_step_tokens=4)
    ids, pad = left_padded([[5, 6], [7]], pad_token_id=9)
    assert ids.tolist() == [[5, 6], [9, 7]] and pad.tolist() == [0, 1]
    assert [r.tolist() for r in strip_padding(ids, pad)] == [[5, 6], [7]]


def test_a_batch_longer_than_one_step_runs_in_several_with_the_same_result(model_pair):
    """max_step_tokens=8 sizes the workspace for 8 tokens: the 4 x 12 prompt batch runs as six steps of two
    positions (and engine.logits as well), with the tokens and logits of the plain model; each step's counts are
    its real tokens."""
    hf, path = model_pair
    model = fj.load_pretrained(path, progress=False)
    prompts = _prompts(hf.config.vocab_size)
    engine = E.Engine.from_pretrained(path, gpu_budget=10**9, planner="fiddler_overlap", resident_experts=2,
                                      dtype="float32", max_batch=len(prompts), max_step_tokens=8, progress=False)
    assert engine.placement.memory.step_tokens == 8
    np.testing.assert_array_equal(engine.generate(prompts, NEW, eos_token_id=[]),
                                  fj.generate(model, prompts, NEW, eos_token_id=[]))
    # six steps of two positions; the planner counts each step's real tokens (the padding is routed with weight 0)
    _, pad = left_padded(prompts, pad_token_id=0)
    real = [int(sum(max(0, min(a + 2, 12) - max(a, p)) for p in pad)) for a in range(0, 12, 2)]
    prefill_steps = [s for s in engine.trace.steps if s.layer == 0][:6]
    assert [int(s.counts.sum()) for s in prefill_steps] == [r * model.config.num_experts_per_tok for r in real]
    assert sum(real) == sum(LENGTHS)
    ids = np.random.default_rng(0).integers(3, hf.config.vocab_size, (2, 11))
    np.testing.assert_allclose(engine.logits(ids), fj.logits(model, ids), rtol=0, atol=1e-5)


def test_cpu_only_decode_steps_of_a_batch_stream_with_the_synced_tokens(model_pair):
    """Four prompts decode in steps of four tokens. cpu_only is proved all-CPU for any number of tokens
    (all_cpu_by_bound, no count vector examined), so its batch steps take the streamed lane (bfloat16, the C++
    kernel), with the tokens of the same engine with the lane off."""
    from fiddler_jax.runtime.options import EngineOptions

    hf, path = model_pair
    prompts = _prompts(hf.config.vocab_size)
    engine = E.Engine.from_pretrained(path, gpu_budget=10**9, planner="cpu_only", resident_experts=2,
                                      dtype="bfloat16", max_batch=len(prompts), progress=False)
    streamed = engine.generate(prompts, NEW, eos_token_id=[])
    assert any(ok for (layer, rows), ok in engine.streamed.qualifies.items() if rows == len(prompts))
    synced = engine.with_planner("cpu_only", options=EngineOptions(streamed_cpu_lane=False))
    np.testing.assert_array_equal(synced.generate(prompts, NEW, eos_token_id=[]), streamed)


@pytest.mark.gpu
def test_on_the_gpu_a_batch_through_the_engine_equals_the_plain_model(model_pair):
    """The device run of the engine test: prompts of different lengths through the engine on the GPU (streamed
    and synced steps, copies, the pinned host experts) equal the plain model on the GPU, in float32."""
    hf, path = model_pair
    model = fj.load_pretrained(path, progress=False)
    prompts = _prompts(hf.config.vocab_size)
    expected = fj.generate(model, prompts, NEW, eos_token_id=[])
    for planner in ("fiddler_overlap", "cpu_only", "transfer"):
        engine = E.Engine.from_pretrained(path, gpu_budget=10**9, planner=planner, resident_experts=2,
                                          dtype="float32", max_batch=len(prompts), max_step_tokens=16,
                                          progress=False)
        np.testing.assert_array_equal(engine.generate(prompts, NEW, eos_token_id=[]), expected, err_msg=planner)
