"""Parity with transformers' Qwen3-MoE, OLMoE and Qwen2-MoE (the references) on random-weight checkpoints they
saved, in both expert layouts (per expert, sharded; fused, one file), and the way back through save_pretrained."""
from __future__ import annotations

import json

import numpy as np
import pytest

import fiddler_jax as fj
from fiddler_jax.errors import ModelConfigError
from tests.conftest import cached_decoding_error, greedy_against_transformers, hf_logits, token_ids

SEQ = 20


def _rel(a, b) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


def test_config_reads_the_family(family_checkpoint):
    name, hf, path, _ = family_checkpoint
    cfg = fj.ModelConfig.from_pretrained(path)
    c = hf.config
    assert cfg.model_type == c.model_type
    assert cfg.num_experts == c.num_experts and cfg.num_experts_per_tok == c.num_experts_per_tok
    assert cfg.norm_topk_prob == c.norm_topk_prob
    dense = [n for n in range(c.num_hidden_layers) if not hf.model.layers[n].mlp.__class__.__name__.endswith("Block")]
    assert [n for n in range(cfg.num_hidden_layers) if not cfg.is_sparse(n)] == dense
    assert fj.ModelConfig.from_hf_dict(cfg.to_hf_dict()) == cfg


@pytest.mark.parametrize("layout", ["per_expert", "fused"])
def test_logits_match_transformers(family_checkpoint, layout):
    name, hf, sharded, fused = family_checkpoint
    ids = token_ids(hf.config.vocab_size, (2, SEQ))
    ref = hf_logits(hf, ids)
    ours = fj.logits(fj.load_pretrained(sharded if layout == "per_expert" else fused, progress=False), ids)
    assert ours.shape == ref.shape
    assert _rel(ours, ref) <= 1e-4, f"{name} ({layout}): max |Δ| / max |ref| = {_rel(ours, ref):.2e}"


def test_greedy_32_tokens_match_transformers(family_checkpoint):
    name, hf, path, _ = family_checkpoint
    ours, ref = greedy_against_transformers(hf, path, 32)
    np.testing.assert_array_equal(ours, ref, err_msg=name)


def test_kv_cached_decoding_equals_full_forward(family_checkpoint):
    name, hf, path, _ = family_checkpoint
    assert cached_decoding_error(fj.load_pretrained(path, progress=False), hf.config.vocab_size, SEQ) <= 1e-5, name


def test_round_trip_through_transformers(family_checkpoint, tmp_path):
    """Our save_pretrained → transformers' from_pretrained gives our logits (sharded and not)."""
    import transformers

    name, hf, path, _ = family_checkpoint
    model = fj.load_pretrained(path, progress=False)
    ids = token_ids(hf.config.vocab_size, (1, 12), seed=9)
    ours = fj.logits(model, ids)
    for shard in ("20KB", "5GB"):
        out = tmp_path / shard
        fj.save_pretrained(model, out, max_shard_size=shard, progress=False)
        back = getattr(transformers, type(hf).__name__).from_pretrained(out, attn_implementation="eager").eval()
        np.testing.assert_allclose(hf_logits(back, ids), ours, atol=1e-4 * np.abs(ours).max(), err_msg=name)
        np.testing.assert_array_equal(fj.logits(fj.load_pretrained(out, progress=False), ids), ours)


def test_unsupported_model_type_names_the_supported_ones(small_checkpoint, tmp_path):
    import shutil

    shutil.copytree(small_checkpoint[1], tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    (tmp_path / "m" / "config.json").write_text(json.dumps(cfg | {"model_type": "deepseek_v3"}))
    with pytest.raises(ModelConfigError, match="'deepseek_v3'.*'mixtral'.*'qwen3_moe'.*'olmoe'.*'qwen2_moe'"):
        fj.load_pretrained(tmp_path / "m", progress=False)


def test_per_layer_sliding_windows_are_refused():
    d = {"model_type": "qwen3_moe", "vocab_size": 97, "hidden_size": 32, "intermediate_size": 48,
         "moe_intermediate_size": 16, "num_hidden_layers": 2, "num_attention_heads": 4, "num_experts": 4,
         "num_experts_per_tok": 2, "use_sliding_window": True, "sliding_window": 8}
    with pytest.raises(ModelConfigError, match="use_sliding_window"):
        fj.ModelConfig.from_hf_dict(d)
    assert fj.ModelConfig.from_hf_dict(d | {"use_sliding_window": False}).sliding_window is None
