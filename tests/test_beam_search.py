"""Beam search (runtime.beam_search) against transformers' generate(num_beams=k, do_sample=False) on random-weight
Mixtral models in float32: k = 2, 4, early stopping True / False / "never", length penalties, EOS hit early,
batches; the hybrid engine against the plain model; KV reorder; bad input."""
from __future__ import annotations

import numpy as np
import pytest

import fiddler_jax
from fiddler_jax.errors import InvalidInputError
from fiddler_jax.runtime import beam_search as bs
from tests.conftest import GEOMETRIES, make_hf_model

PROMPT_LEN, NEW = 6, 12


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """(transformers model, our model, folder, prompt [1, T], an EOS id that greedy decoding emits often)."""
    import torch

    hf = make_hf_model(GEOMETRIES["gqa_headdim_window"])
    path = str(tmp_path_factory.mktemp("beam"))
    hf.save_pretrained(path)
    ids = np.random.default_rng(0).integers(3, 97, (1, PROMPT_LEN))
    greedy = hf.generate(torch.as_tensor(ids), max_new_tokens=30, do_sample=False, eos_token_id=2,
                         pad_token_id=2).numpy()[0, PROMPT_LEN:]
    frequent = int(np.bincount(greedy).argmax())
    return hf, fiddler_jax.load_pretrained(path), path, ids, frequent


def hf_beams(hf, ids, n, k, early_stopping, length_penalty, eos, pad=None):
    import torch

    out = hf.generate(torch.as_tensor(ids), max_new_tokens=n, num_beams=k, do_sample=False,
                      early_stopping=early_stopping, length_penalty=length_penalty, eos_token_id=eos,
                      pad_token_id=eos if pad is None else pad)
    return out.numpy()


def assert_same(ours, ref):
    assert ours.shape == ref.shape, (ours, ref)
    np.testing.assert_array_equal(ours, ref)


@pytest.mark.parametrize("k", [2, 4])
@pytest.mark.parametrize("early_stopping", [False, True])
@pytest.mark.parametrize("length_penalty,frequent_eos", [(1.0, False), (2.0, True), (0.5, True)])
def test_matches_transformers(setup, k, early_stopping, length_penalty, frequent_eos):
    hf, model, _, ids, frequent = setup
    eos = frequent if frequent_eos else 2
    ours = fiddler_jax.generate(model, ids, NEW, num_beams=k, early_stopping=early_stopping,
                                length_penalty=length_penalty, eos_token_id=eos)
    assert_same(ours, hf_beams(hf, ids, NEW, k, early_stopping, length_penalty, eos))


@pytest.mark.parametrize("length_penalty", [2.0, -1.0])
def test_early_stopping_never(setup, length_penalty):
    hf, model, _, ids, frequent = setup
    ours = fiddler_jax.generate(model, ids, NEW, num_beams=2, early_stopping="never",
                                length_penalty=length_penalty, eos_token_id=frequent)
    assert_same(ours, hf_beams(hf, ids, NEW, 2, "never", length_penalty, frequent))


@pytest.mark.parametrize("length_penalty", [0.5, 1.0])
def test_stop_rule_takes_as_many_steps(setup, monkeypatch, length_penalty):
    """The stop rules of early_stopping True / False / "never" end the search after as many model steps as
    transformers does (counted by forward hooks there, by candidate selections here), and they differ."""
    hf, model, _, ids, frequent = setup
    hf_calls, our_calls, real = [], [], bs.top_candidates
    hook = hf.register_forward_hook(lambda *_: hf_calls.append(1))
    monkeypatch.setattr(bs, "top_candidates", lambda *a: our_calls.append(1) or real(*a))
    steps = {}
    try:
        for es in (False, "never", True):
            hf_calls.clear(), our_calls.clear()
            ours = fiddler_jax.generate(model, ids, NEW, num_beams=2, early_stopping=es,
                                        length_penalty=length_penalty, eos_token_id=frequent)
            assert_same(ours, hf_beams(hf, ids, NEW, 2, es, length_penalty, frequent))
            assert len(our_calls) == len(hf_calls), es
            steps[es] = len(our_calls)
    finally:
        hook.remove()
    assert len(set(steps.values())) > 1, steps


def test_eos_finishes_a_hypothesis_early(setup):
    """A frequent token as EOS: the best hypothesis ends with it before max_new_tokens, and early_stopping
    True and False give different answers (finished-hypothesis bookkeeping and the stop rule both matter)."""
    hf, model, _, ids, frequent = setup
    outs = {}
    for es in (False, True):
        outs[es] = fiddler_jax.generate(model, ids, NEW, num_beams=2, early_stopping=es, length_penalty=2.0,
                                        eos_token_id=frequent)
        assert_same(outs[es], hf_beams(hf, ids, NEW, 2, es, 2.0, frequent))
    assert outs[True].shape[1] < PROMPT_LEN + NEW and outs[True][0, -1] == frequent
    assert outs[True].shape != outs[False].shape or (outs[True] != outs[False]).any()


def test_multiple_eos_and_batch_with_padding(setup):
    """Two EOS ids (3·k candidates per step) and a batch of two prompts whose best hypotheses differ in length:
    the shorter row is padded with pad_token_id (here the first EOS id, as generate passes by default)."""
    hf, model, _, _, frequent = setup
    ids = np.random.default_rng(1).integers(3, 97, (2, 5))
    eos = [2, frequent]
    ours = fiddler_jax.generate(model, ids, 10, num_beams=4, early_stopping=True, length_penalty=1.5,
                                eos_token_id=eos)
    assert_same(ours, hf_beams(hf, ids, 10, 4, True, 1.5, eos, pad=2))
    assert (ours[:, -1] == 2).any()  # a padded row


@pytest.mark.parametrize("geometry", ["mha_tied_top1", "mqa_3experts"])
def test_other_geometries(tmp_path, geometry):
    hf = make_hf_model(GEOMETRIES[geometry], seed=3)
    hf.save_pretrained(tmp_path)
    model = fiddler_jax.load_pretrained(tmp_path)
    ids = np.random.default_rng(2).integers(3, 97, (1, 5))
    for eos in (2, 26):
        ours = fiddler_jax.generate(model, ids, 10, num_beams=4, length_penalty=1.5, eos_token_id=eos)
        assert_same(ours, hf_beams(hf, ids, 10, 4, False, 1.5, eos))


def test_kv_cache_is_reordered(setup, monkeypatch):
    """Beams change parents during the search, and skipping the cache reorder changes the answer."""
    hf, model, _, ids, frequent = setup
    kwargs = dict(num_beams=4, length_penalty=1.0, eos_token_id=2)
    parents, real = [], bs.reorder_cache

    def spy(cache, idx):
        parents.append(np.asarray(idx))
        return real(cache, idx)

    monkeypatch.setattr(bs, "reorder_cache", spy)
    good = fiddler_jax.generate(model, ids, NEW, **kwargs)
    assert_same(good, hf_beams(hf, ids, NEW, 4, False, 1.0, 2))
    assert any((p != np.arange(4)).any() and (p != 0).any() for p in parents[1:])
    monkeypatch.setattr(bs, "reorder_cache", lambda cache, idx: cache)
    assert (fiddler_jax.generate(model, ids, NEW, **kwargs) != good).any()


def test_num_beams_one_is_greedy(setup):
    _, model, _, ids, _ = setup
    assert_same(fiddler_jax.generate(model, ids, NEW, num_beams=1), fiddler_jax.generate(model, ids, NEW))


@pytest.fixture(scope="module")
def engine(setup):
    from fiddler_jax.runtime.engine import Engine

    return Engine.from_pretrained(setup[2], gpu_budget=10**9, resident_experts=2, dtype="float32", max_batch=4,
                                  progress=False)


@pytest.mark.parametrize("k,early_stopping", [(2, False), (4, True)])
def test_engine_matches_plain_model(setup, engine, k, early_stopping):
    _, model, _, ids, frequent = setup
    kwargs = dict(num_beams=k, early_stopping=early_stopping, length_penalty=2.0, eos_token_id=frequent)
    before = len(engine.trace)
    assert_same(engine.generate(ids, NEW, **kwargs), fiddler_jax.generate(model, ids, NEW, **kwargs))
    assert len(engine.trace) > before  # the hybrid step loop ran (experts off the "GPU")


@pytest.mark.parametrize("bad", [dict(num_beams=0), dict(num_beams=-2), dict(num_beams=2.0), dict(num_beams=True),
                                 dict(num_beams=2, do_sample=True), dict(num_beams=2, early_stopping="always"),
                                 dict(num_beams=2, length_penalty=float("nan"))])
def test_bad_arguments(setup, engine, bad):
    _, model, _, ids, _ = setup
    with pytest.raises(InvalidInputError):
        fiddler_jax.generate(model, ids, 4, **bad)
    with pytest.raises(InvalidInputError):
        engine.generate(ids, 4, **bad)


def test_context_too_long(setup, engine):
    """Plain model: prompt + max_new_tokens beyond max_position_embeddings (128). Engine: beams × cache slots
    beyond the KV reserve placed for max_batch=4 × 128 tokens; the message names max_batch."""
    _, model, _, _, _ = setup
    with pytest.raises(InvalidInputError, match="max_position_embeddings"):
        fiddler_jax.generate(model, np.full((1, 120), 5), 10, num_beams=2)
    long = np.full((1, 100), 5)
    with pytest.raises(InvalidInputError, match="max_batch=5"):
        engine.generate(long, 20, num_beams=5)
    engine.generate(long[:, :30], 2, num_beams=5)  # 5 beams × 64 slots fit in 4 × 128
