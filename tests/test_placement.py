"""Placement: budget accounting, fill order of each policy, and its errors."""
from __future__ import annotations

import numpy as np
import pytest

from fiddler_jax.errors import InvalidInputError
from fiddler_jax.models import ModelConfig
from fiddler_jax.runtime import placement as P
from tests.conftest import FAMILY_GEOMETRIES
from tests.test_config_and_sampling import HUB_MIXTRAL_8X7B

MIXTRAL = ModelConfig.from_hf_dict(HUB_MIXTRAL_8X7B)
TINY = ModelConfig.from_hf_dict(dict(HUB_MIXTRAL_8X7B, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                                       num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
                                       vocab_size=100, max_position_embeddings=64))


def test_quantised_residents_are_placed_at_their_stored_size():
    """A budget holds about 1.8x the int8 and 3.3x the int4 experts it holds at bf16 (2x and 3.8x fewer bytes, less
    the reserve for the widest layer's dequantised stack); the staging slots stay bf16-sized (the PCIe lane
    writes W' into them)."""
    placed = {p: P.place(MIXTRAL, "24GiB", max_context=1024, staging_slots=2, expert_precision=p)
              for p in ("bf16", "int8", "int4")}
    n = {p: placed[p].memory.resident_count for p in placed}
    assert placed["int8"].memory.expert == 3 * (4096 * 14336 + 14336 * 4) - 3 * 14336 * 4 + (2 * 14336 + 4096) * 4
    assert placed["int4"].memory.expert == P.expert_bytes(MIXTRAL, 2, "int4", 64) < P.expert_bytes(MIXTRAL, 2) // 3
    for p in placed:
        memory = placed[p].memory
        assert memory.slots == 2 * P.expert_bytes(MIXTRAL, 2)
        widest = int(placed[p].resident.sum(axis=1).max())
        assert memory.dequantized == (0 if p == "bf16" else 3 * widest * 14336 * 4096 * 2)
        assert memory.used <= 24 * 2**30
    assert (n["bf16"], n["int8"], n["int4"]) == (55, 101, 180)  # README's numbers


def test_parse_bytes():
    assert P.parse_bytes("24GiB") == 24 * 2**30
    assert P.parse_bytes("12 MiB") == 12 * 2**20
    assert P.parse_bytes("1.5GB") == 1_500_000_000
    assert P.parse_bytes(4096) == P.parse_bytes("4096") == 4096
    for bad in ("24 GiX", "lots", "-5", -5):
        with pytest.raises(InvalidInputError):
            P.parse_bytes(bad)


def test_mixtral_8x7b_accounting_matches_the_design_numbers():
    assert 3 * 4096 * 14336 * 2 == P.expert_bytes(MIXTRAL, 2)  # 352 MB per expert
    non_expert = P.non_expert_bytes(MIXTRAL, 2)
    assert 3.0e9 < non_expert < 3.4e9  # Mixtral-8x7B: ~1.6 B non-expert parameters
    p = P.place(MIXTRAL, "24GiB", max_context=1024)
    # a budget estimate without workspaces: "about 56 of 256 experts fit"; with XLA's workspaces counted (ragged
    # relayout, scratch, autotuning for two resident experts per layer) it is 55.
    assert 52 <= p.resident_count <= 60
    assert p.memory.autotune == P.autotune_bytes(MIXTRAL, 2, 2) == 2 * 14336 * 4096 * 2 * 5 // 4
    assert p.memory.used <= 24 * 2**30 < p.memory.used + p.memory.expert


def test_every_byte_is_counted_against_the_budget():
    cfg = TINY
    e = P.expert_bytes(cfg, 4)
    base = P.place(cfg, 10**9, itemsize=4, max_context=64, resident_experts=0).memory.fixed
    two = P.autotune_bytes(cfg, 4, 2)  # 5 experts over 3 layers in spread order: at most 2 in a layer
    assert two == (2 * e // 3) * 5 // 4  # one of an expert's three weights for each of the two, and a quarter
    p = P.place(cfg, base + 5 * e + two + e // 2, itemsize=4, max_context=64)
    assert p.resident_count == 5 and p.memory.autotune == two
    p = P.place(cfg, base + 5 * e + e // 2, itemsize=4, max_context=64)
    assert p.resident_count == 4  # without room for the autotuning scratch the fifth expert does not fit
    p = P.place(cfg, base + 5 * e + two + e // 2 + 4 * e, itemsize=4, max_context=64, staging_slots=1,
                cache_slots=1)
    assert p.resident_count == 5 and p.memory.slots == 4 * e  # 1 staging slot + 1 cache slot in each of 3 layers
    assert P.place(cfg, 10**9, itemsize=4).resident_count == 12  # everything fits


def test_budget_below_the_non_expert_part_states_the_minimum():
    with pytest.raises(InvalidInputError, match=r"below the minimum .*GiB.*raise gpu_budget"):
        P.place(MIXTRAL, "2GiB")


def test_resident_experts_override():
    assert P.place(TINY, 10**9, itemsize=4, resident_experts=3).resident_count == 3
    e = P.expert_bytes(TINY, 4)
    base = P.place(TINY, 10**9, itemsize=4, max_context=64, resident_experts=0).memory.fixed
    with pytest.raises(InvalidInputError, match="resident_experts=5 does not fit with XLA's autotuning scratch"):
        P.place(TINY, base + 5 * e + e // 2, itemsize=4, max_context=64, resident_experts=5)
    with pytest.raises(InvalidInputError, match="holds at most 12 of 12"):
        P.place(TINY, 10**9, itemsize=4, resident_experts=13)


def test_fill_orders():
    assert P.placement_order(2, 3, "first")[:4] == [(0, 0), (0, 1), (0, 2), (1, 0)]
    assert P.placement_order(2, 3, "popularity")[:4] == [(0, 0), (1, 0), (0, 1), (1, 1)]  # spread, no profile
    profile = np.array([[5, 0, 9], [5, 1, 0]])
    assert P.placement_order(2, 3, "popularity", profile)[:4] == [(0, 2), (0, 0), (1, 0), (1, 1)]
    a, b = (P.placement_order(4, 8, "random", seed=s) for s in (0, 1))
    assert sorted(a) == sorted(b) == P.placement_order(4, 8, "first") and a != b
    assert a == P.placement_order(4, 8, "random", seed=0)


def test_popularity_places_the_most_routed_experts():
    profile = np.arange(12).reshape(3, 4)
    p = P.place(TINY, 10**9, itemsize=4, profile=profile, resident_experts=4)
    np.testing.assert_array_equal(np.argwhere(p.resident), [[1, 3], [2, 0], [2, 1], [2, 2], [2, 3]][1:])
    assert not p.layer_all_resident(0) and p.layer_all_resident(2)


def test_bad_policy_and_profile():
    with pytest.raises(InvalidInputError, match="unknown placement 'hot'.*popularity, first, random"):
        P.place(TINY, 10**9, policy="hot")
    with pytest.raises(InvalidInputError, match="profile this model again"):
        P.place(TINY, 10**9, profile=np.ones((2, 4)))


def test_planning_modules_import_without_jax():
    """placement, planners and latency are pure Python: importing them must not load JAX or flax."""
    import subprocess
    import sys

    code = ("import sys; import fiddler_jax.runtime.placement, fiddler_jax.runtime.planning, "
            "fiddler_jax.runtime.latency; print(sorted(m for m in ('jax', 'flax') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


@pytest.mark.parametrize("name", sorted(FAMILY_GEOMETRIES))
def test_non_expert_bytes_are_every_parameter_but_the_routed_experts(name):
    """The accounting equals the model's own parameters (attention biases, q/k norms, shared experts, dense
    layers included), for every family."""
    from flax import nnx

    from fiddler_jax.models.causal_lm import MoeForCausalLM
    from fiddler_jax.models.config import ModelConfig
    from fiddler_jax.runtime.placement import expert_bytes, non_expert_bytes
    family, overrides = FAMILY_GEOMETRIES[name]
    d = {"model_type": family, "vocab_size": 97, "num_hidden_layers": 2, **overrides}
    d["attention_bias" if family != "qwen2_moe" else "qkv_bias"] = True
    cfg = ModelConfig.from_hf_dict(d)
    model = nnx.eval_shape(lambda: MoeForCausalLM(cfg, rngs=nnx.Rngs(0)))
    sizes = {"/".join(map(str, path)): int(np.prod(p.shape)) for path, p in nnx.iter_graph(model)
             if isinstance(p, nnx.Param)}
    experts = sum(v for k, v in sizes.items() if k.split("/")[-1] in ("w1", "w2", "w3"))
    assert experts * 4 == len(cfg.moe_layers) * cfg.num_experts * expert_bytes(cfg, 4)
    assert (sum(sizes.values()) - experts) * 4 == non_expert_bytes(cfg, 4)
