"""Routing statistics against hand-counted cases."""
from __future__ import annotations

import numpy as np
import pytest

from fiddler_jax.analysis import routing_stats as rs
from fiddler_jax.errors import InvalidInputError

# 2 layers, 4 tokens, top-2 of 4 experts.
CHOICES = np.array([
    [[0, 1], [0, 1], [1, 2], [3, 0]],
    [[2, 3], [2, 3], [2, 0], [1, 2]],
])


def test_popularity_and_imbalance():
    shares = rs.popularity(CHOICES, 4)
    np.testing.assert_allclose(shares[0], [3 / 8, 3 / 8, 1 / 8, 1 / 8])
    np.testing.assert_allclose(shares[1], [1 / 8, 1 / 8, 4 / 8, 2 / 8])
    np.testing.assert_allclose(rs.load_imbalance(shares), [1.5, 2.0])
    np.testing.assert_allclose(rs.load_imbalance(np.full((1, 4), 0.25)), [1.0])


def test_coactivation_counts_pairs_per_token():
    co = rs.coactivation(CHOICES, 4)
    assert co[0, 0, 1] == co[0, 1, 0] == 2 / 4  # tokens 0 and 1
    assert co[0, 0, 0] == 3 / 4 and co[0, 2, 3] == 0
    assert co[1, 2, 3] == 2 / 4 and co[1, 2, 2] == 1.0


def test_temporal_reuse():
    # layer 0: {0,1}->{0,1} 2 shared, {0,1}->{1,2} 1, {1,2}->{3,0} 0 ; layer 1: 2, 1, 1
    np.testing.assert_allclose(rs.temporal_reuse(CHOICES, 4), [(2 + 1 + 0) / 6, (2 + 1 + 1) / 6])
    assert rs.chance_reuse(8, 2) == 0.25
    with pytest.raises(InvalidInputError, match="two tokens"):
        rs.temporal_reuse(CHOICES[:, :1], 4)


def test_layer_transition_rows_are_conditional_distributions():
    t = rs.layer_transition(CHOICES, 4)
    assert t.shape == (1, 4, 4)
    # expert 0 at layer 0 (tokens 0, 1, 3) is followed by {2,3}, {2,3}, {1,2}: 2 of 6 pairs go to 3
    np.testing.assert_allclose(t[0, 0], [0, 1 / 6, 3 / 6, 2 / 6])
    np.testing.assert_allclose(t[0].sum(axis=1), 1.0)
    choices = np.array([[[0, 1]] * 3, [[0, 1]] * 3])
    assert not rs.layer_transition(choices, 4)[0, 2].any()  # an unused expert's row stays zero


def test_token_categories_and_split():
    assert [rs.token_category(p) for p in ("def", " return", "  ", "\n", "foo_bar", " x1", "(", "):", "42",
                                           "3.5", "é", "a-b", "match")] == [
        "keyword", "keyword", "whitespace", "whitespace", "identifier", "identifier", "punctuation",
        "punctuation", "number", "number", "identifier", "other", "keyword"]
    split = rs.routing_by_category(CHOICES, ["keyword", "keyword", "identifier", "keyword"], 4)
    assert set(split) == {"keyword", "identifier"}
    np.testing.assert_allclose(split["identifier"][0], [0, 0.5, 0.5, 0])
    with pytest.raises(InvalidInputError, match="categories for 4 tokens"):
        rs.routing_by_category(CHOICES, ["keyword"], 4)


def test_bad_choices():
    with pytest.raises(InvalidInputError, match="outside"):
        rs.popularity(CHOICES, 3)
    with pytest.raises(InvalidInputError, match="integer array"):
        rs.popularity(CHOICES.astype(float), 4)


def test_route_text_matches_the_models_router():
    import jax.numpy as jnp

    import fiddler_jax as fj
    from fiddler_jax.assets import default_model_path

    model = fj.load_pretrained(default_model_path(), progress=False)
    ids = np.arange(40) % model.config.vocab_size
    choices = rs.route_text(model, ids, window=16)  # three windows, the last one short
    assert choices.shape == (model.config.num_hidden_layers, 40, model.config.num_experts_per_tok)
    _, _, router_logits = model(jnp.asarray(ids[None, 16:32]), model.init_cache(1, 16), 0, return_router_logits=True)
    top = np.argsort(-np.asarray(router_logits[1]), axis=1)[:, :2]
    assert (np.sort(top, axis=1) == np.sort(choices[1, 16:32], axis=1)).all()
    with pytest.raises(InvalidInputError, match="another tokenizer"):
        rs.route_text(model, np.array([model.config.vocab_size]))


def test_static_capture_is_the_share_a_per_layer_popularity_placement_keeps():
    rng = np.random.default_rng(0)
    E, k, T = 16, 2, 4000
    uniform = np.stack([np.stack([rng.choice(E, k, replace=False) for _ in range(T)]) for _ in range(2)])
    capture = rs.static_capture(uniform[:, : T // 2], uniform[:, T // 2:], E, [0.0, 0.25, 0.5, 1.0])
    np.testing.assert_allclose(capture, [0.0, 0.25, 0.5, 1.0], atol=0.03)
    # skewed routing: expert e chosen with weight 2^-e; keeping the top quarter captures most assignments,
    # and exactly what the evaluation tokens put on the profile's favourites
    p = 0.5 ** np.arange(E)
    p /= p.sum()
    skew = np.stack([np.stack([rng.choice(E, k, replace=False, p=p) for _ in range(T)]) for _ in range(2)])
    got = rs.static_capture(skew[:, : T // 2], skew[:, T // 2:], E, [0.25])
    shares = rs.popularity(skew[:, T // 2:], E)
    top = np.argsort(-rs.popularity(skew[:, : T // 2], E), axis=1, kind="stable")[:, :4]
    assert got[0] == pytest.approx(np.take_along_axis(shares, top, axis=1).sum(axis=1).mean())
    assert got[0] > 0.8
    # profiled on other tokens than measured: a profile that favours experts the evaluation never uses keeps
    # nothing (measured on the profile's own tokens it would keep almost everything)
    flipped = (E - 1) - skew
    assert rs.static_capture(flipped[:, : T // 2], skew[:, T // 2:], E, [0.25])[0] < 0.02
    assert rs.kept_experts(1 / 16, 8) == 1 and rs.kept_experts(3 / 16, 8) == 2  # half up, not to even
    with pytest.raises(InvalidInputError, match=r"budget fraction must be in \[0, 1\]"):
        rs.static_capture(skew, skew, E, [1.5])
