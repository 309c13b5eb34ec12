"""Routing profiles: counts equal a direct count of the router's top-k, fingerprints tie them to one model."""
from __future__ import annotations

import dataclasses
import json

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import fiddler_jax as fj
from fiddler_jax.assets import default_model_path
from fiddler_jax.errors import InvalidInputError
from fiddler_jax.runtime.placement import place
from fiddler_jax.runtime.profiling import RoutingProfile, model_fingerprint, profile_routing
from tests.conftest import token_ids
from tests.test_cli import cli


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    from tests.conftest import GEOMETRIES, make_hf_model

    out = []
    for seed in (0, 1):
        path = tmp_path_factory.mktemp(f"prof{seed}")
        make_hf_model(GEOMETRIES["gqa_headdim_window"], seed=seed).save_pretrained(path)
        out.append(path)
    return out


def test_counts_equal_a_direct_count_of_the_top_k(models):
    model = fj.load_pretrained(models[0], progress=False)
    windows = list(token_ids(model.config.vocab_size, (5, 12), seed=4))
    profile = profile_routing(model, windows, batch_size=2, progress=False)
    _, _, router_logits = model(jnp.asarray(np.stack(windows)), model.init_cache(5, 12), 0,
                                return_router_logits=True)
    k, e = model.config.num_experts_per_tok, model.config.num_experts
    expected = np.stack([np.bincount(np.argsort(-np.asarray(rl), axis=1)[:, :k].ravel(), minlength=e)
                         for rl in router_logits])
    np.testing.assert_array_equal(profile.counts, expected)
    assert profile.tokens == 60 and (profile.counts.sum(axis=1) == 60 * k).all()
    np.testing.assert_allclose(profile.shares().sum(axis=1), 1.0)


def test_fingerprint_is_per_model_not_per_dtype(models, tmp_path):
    a32 = fj.load_pretrained(models[0], progress=False)
    a16 = fj.load_pretrained(models[0], dtype="bfloat16", progress=False)
    b = fj.load_pretrained(models[1], progress=False)
    assert model_fingerprint(a32) == model_fingerprint(a16)
    assert model_fingerprint(a32) == model_fingerprint(b)  # same geometry, other weights: same placement problem
    other = fj.MoeForCausalLM(dataclasses.replace(a32.config, num_hidden_layers=1), rngs=nnx.Rngs(0))
    assert model_fingerprint(other) != model_fingerprint(a32)
    profile = profile_routing(a32, list(token_ids(97, (2, 8))), progress=False)
    profile.save(tmp_path / "p.json")
    assert RoutingProfile.load(tmp_path / "p.json", a16).tokens == 16
    with pytest.raises(InvalidInputError, match="measured on another model.*fiddler-jax profile"):
        RoutingProfile.load(tmp_path / "p.json", other)


def test_bad_profile_files(tmp_path):
    with pytest.raises(InvalidInputError, match="does not exist"):
        RoutingProfile.load(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text(json.dumps({"format": "something else"}))
    with pytest.raises(InvalidInputError, match="not a routing profile"):
        RoutingProfile.load(tmp_path / "bad.json")


def test_profile_command_on_the_bundled_model_feeds_placement(tmp_path):
    out = tmp_path / "profile.json"
    r = cli("profile", "max_tokens=2048", "seq_len=128", f"out={out}", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "layer  3:" in r.stdout
    model = fj.load_pretrained(default_model_path(), progress=False)
    profile = RoutingProfile.load(out, model)
    assert profile.tokens == 2048
    p = place(model.config, 10**9, itemsize=2, profile=profile.counts, resident_experts=4)
    assert profile.counts[p.resident].min() >= profile.counts[~p.resident].max()
