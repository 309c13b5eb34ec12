"""Config parsing (both HF layouts) and the sampling functions."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fiddler_jax.errors import ModelConfigError
from fiddler_jax.models import ModelConfig
from fiddler_jax.runtime import sampling

HUB_MIXTRAL_8X7B = {  # config.json of mistralai/Mixtral-8x7B-v0.1 (transformers-4 layout)
    "architectures": ["MixtralForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 1, "eos_token_id": 2,
    "hidden_act": "silu", "hidden_size": 4096, "initializer_range": 0.02, "intermediate_size": 14336,
    "max_position_embeddings": 32768, "model_type": "mixtral", "num_attention_heads": 32,
    "num_experts_per_tok": 2, "num_hidden_layers": 32, "num_key_value_heads": 8, "num_local_experts": 8,
    "output_router_logits": False, "rms_norm_eps": 1e-05, "rope_theta": 1000000.0, "router_aux_loss_coef": 0.02,
    "sliding_window": None, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
    "transformers_version": "4.36.0.dev0", "use_cache": True, "vocab_size": 32000,
}


def test_hub_mixtral_config():
    c = ModelConfig.from_hf_dict(HUB_MIXTRAL_8X7B)
    assert (c.head_dim, c.num_key_value_heads, c.rope_theta, c.sliding_window) == (128, 8, 1e6, None)
    assert c.eos_token_ids == (2,)


def test_transformers5_rope_parameters_and_round_trip():
    d = dict(HUB_MIXTRAL_8X7B, rope_parameters={"rope_type": "default", "rope_theta": 5e5})
    d.pop("rope_theta")
    c = ModelConfig.from_hf_dict(d)
    assert c.rope_theta == 5e5
    assert ModelConfig.from_hf_dict(c.to_hf_dict()) == c


def test_unsupported_rope_scaling():
    d = dict(HUB_MIXTRAL_8X7B, rope_parameters={"rope_type": "yarn", "factor": 4.0})
    with pytest.raises(ModelConfigError, match="rope_type 'yarn'"):
        ModelConfig.from_hf_dict(d)


def test_top_p_keeps_the_nucleus():
    logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]]))
    kept = np.isfinite(np.asarray(sampling.top_p_filter(logits, 0.7)))
    np.testing.assert_array_equal(kept, [[True, True, False, False]])
    kept = np.isfinite(np.asarray(sampling.top_p_filter(logits, 0.1)))
    np.testing.assert_array_equal(kept, [[True, False, False, False]])


def test_sample_follows_the_distribution():
    probs = np.array([0.6, 0.3, 0.1, 0.0])
    logits = jnp.log(jnp.tile(jnp.asarray(probs), (4000, 1)))
    draws = np.asarray(sampling.sample(logits, jax.random.key(0), 1.0, 1.0))
    freq = np.bincount(draws, minlength=4) / draws.size
    np.testing.assert_allclose(freq, probs, atol=0.03)
    assert (np.asarray(sampling.sample(logits, jax.random.key(0), 1.0, 0.5)) == 0).all()
