"""Shared fixtures: random-weight transformers models of every supported family saved as HF folders (the reference
nobody here wrote), in the geometries the parity tests sweep."""
from __future__ import annotations

import numpy as np
import pytest


# name -> ModelConfig overrides; each varies one thing the forward pass must get right.
GEOMETRIES = {
    # multi-head attention (GQA ratio 1), tied embeddings, 2 experts, top-1
    "mha_tied_top1": dict(hidden_size=32, intermediate_size=40, num_attention_heads=4, num_key_value_heads=4,
                          num_local_experts=2, num_experts_per_tok=1, tie_word_embeddings=True),
    # GQA 4:2, head_dim != hidden/heads, sliding window shorter than the sequence, 4 experts, top-2
    "gqa_headdim_window": dict(hidden_size=48, intermediate_size=56, num_attention_heads=4, num_key_value_heads=2,
                               head_dim=16, sliding_window=7, num_local_experts=4, num_experts_per_tok=2),
    # multi-query attention (one KV head), 3 experts, top-2, untied
    "mqa_3experts": dict(hidden_size=40, intermediate_size=24, num_attention_heads=5, num_key_value_heads=1,
                         num_local_experts=3, num_experts_per_tok=2),
}


def make_hf_model(overrides: dict, seed: int = 0):
    import torch
    import transformers

    torch.manual_seed(seed)
    base = dict(vocab_size=97, num_hidden_layers=2, max_position_embeddings=128, rms_norm_eps=1e-5,
                rope_theta=10000.0, initializer_range=0.1, bos_token_id=1, eos_token_id=2)
    cfg = transformers.MixtralConfig(**(base | overrides))
    cfg._attn_implementation = "eager"
    model = transformers.MixtralForCausalLM(cfg).eval()
    with torch.no_grad():  # norms away from 1 so a missing or misplaced norm weight shows up
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.3 * torch.randn_like(p))
    return model


# name -> (family, transformers config overrides) of the fine-grained families; each varies what that family
# adds to Mixtral. Small experts, many of them, top-k > 2, as the real models.
FAMILY_GEOMETRIES = {
    # Qwen3-MoE: per-head q/k norm, head_dim != hidden/heads, renormalised top-4 of 8, one dense layer
    "qwen3_dense_layer": ("qwen3_moe", dict(hidden_size=32, intermediate_size=48, moe_intermediate_size=16,
                                            num_attention_heads=4, num_key_value_heads=2, head_dim=12,
                                            num_experts=8, num_experts_per_tok=4, norm_topk_prob=True,
                                            num_hidden_layers=3, mlp_only_layers=[1])),
    # Qwen3-MoE: no renormalisation, attention biases, every second layer sparse (decoder_sparse_step)
    "qwen3_bias_step2": ("qwen3_moe", dict(hidden_size=32, intermediate_size=40, moe_intermediate_size=12,
                                           num_attention_heads=4, num_key_value_heads=4, num_experts=6,
                                           num_experts_per_tok=3, norm_topk_prob=False, attention_bias=True,
                                           num_hidden_layers=4, decoder_sparse_step=2)),
    # OLMoE: q/k norm over the whole projection, clip_qkv, top-3 of 8 without renormalisation
    "olmoe_clip": ("olmoe", dict(hidden_size=32, intermediate_size=16, num_attention_heads=4,
                                 num_key_value_heads=2, num_experts=8, num_experts_per_tok=3, clip_qkv=0.4)),
    # Qwen2-MoE: a shared expert behind a sigmoid gate, q/k/v biases, a dense first layer
    "qwen2_shared": ("qwen2_moe", dict(hidden_size=32, intermediate_size=40, moe_intermediate_size=12,
                                       shared_expert_intermediate_size=24, num_attention_heads=4,
                                       num_key_value_heads=2, num_experts=8, num_experts_per_tok=2,
                                       num_hidden_layers=3, mlp_only_layers=[0])),
}
_HF_CLASSES = {"mixtral": ("MixtralConfig", "MixtralForCausalLM"), "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM"),
               "olmoe": ("OlmoeConfig", "OlmoeForCausalLM"), "qwen2_moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM")}


def make_family_model(family: str, overrides: dict, seed: int = 0):
    """A random transformers model of ``family``, its norms and biases moved away from 1 and 0 so that a missing
    or misplaced one shows up."""
    import torch
    import transformers

    config_class, model_class = (getattr(transformers, n) for n in _HF_CLASSES[family])
    torch.manual_seed(seed)
    base = dict(vocab_size=97, num_hidden_layers=2, max_position_embeddings=128, rms_norm_eps=1e-5,
                rope_theta=10000.0, initializer_range=0.1, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    cfg = config_class(**(base | overrides))
    cfg._attn_implementation = "eager"
    model = model_class(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.3 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn_like(p))
    return model


@pytest.fixture(scope="session", params=sorted(FAMILY_GEOMETRIES))
def family_checkpoint(request, tmp_path_factory):
    """(name, transformers model, folder saved by transformers per expert in small shards, folder saved with the
    experts fused in one file)."""
    family, overrides = FAMILY_GEOMETRIES[request.param]
    model = make_family_model(family, overrides)
    sharded = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(sharded, max_shard_size="20KB")
    fused = tmp_path_factory.mktemp(request.param + "_fused")
    model.save_pretrained(fused, save_original_format=False)
    return request.param, model, str(sharded), str(fused)


def hf_logits(model, ids: np.ndarray) -> np.ndarray:
    import torch

    with torch.no_grad():
        return model(torch.as_tensor(ids)).logits.float().numpy()


@pytest.fixture(scope="session", params=sorted(GEOMETRIES))
def hf_checkpoint(request, tmp_path_factory):
    """(name, transformers model, folder saved by transformers, sharded into small files)."""
    model = make_hf_model(GEOMETRIES[request.param])
    path = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(path, max_shard_size="20KB")
    return request.param, model, str(path)


@pytest.fixture(scope="session")
def small_checkpoint(tmp_path_factory):
    """One transformers-saved folder (single file, unsharded) for the error-path tests to copy and damage."""
    model = make_hf_model(GEOMETRIES["gqa_headdim_window"], seed=1)
    path = tmp_path_factory.mktemp("small")
    model.save_pretrained(path)
    return model, str(path)


def cached_decoding_error(model, vocab: int, seq: int) -> float:
    """Prefill 5 tokens, then feed one token at a time: max |Δ| / max |full| of every position's logits against
    the full forward's."""
    import jax.numpy as jnp
    from flax import nnx

    import fiddler_jax as fj
    from fiddler_jax.runtime.generate import _forward

    ids = token_ids(vocab, (2, seq), seed=5)
    full = fj.logits(model, ids)
    graphdef, state = nnx.split(model)
    cache = model.init_cache(2, 32)
    out, cache = _forward(graphdef, state, cache, jnp.asarray(ids[:, :5]), jnp.int32(0))
    steps = [np.asarray(out)]
    for t in range(5, seq):
        out, cache = _forward(graphdef, state, cache, jnp.asarray(ids[:, t:t + 1]), jnp.int32(t))
        steps.append(np.asarray(out))
    return float(np.abs(np.concatenate(steps, axis=1) - full).max() / np.abs(full).max())


def greedy_against_transformers(hf, path, tokens: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """(ours, transformers') greedy continuations of ``tokens`` new tokens of one 6-token random prompt: the
    transformers model ``hf`` and our load of its saved folder ``path``, neither stopping at an eos."""
    import torch

    import fiddler_jax as fj

    prompt = token_ids(hf.config.vocab_size, (1, 6), seed=3)
    with torch.no_grad():
        ref = hf.generate(torch.as_tensor(prompt), max_new_tokens=tokens, do_sample=False, eos_token_id=None,
                          pad_token_id=0, min_new_tokens=tokens).numpy()
    return fj.generate(fj.load_pretrained(path, progress=False), prompt, tokens, eos_token_id=[]), ref


def token_ids(vocab: int, shape, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, vocab, shape)


def pytest_collection_modifyitems(config, items):
    """Tests marked ``gpu`` are skipped where JAX has no GPU (CI); they run on the device machine."""
    gpu_tests = [item for item in items if "gpu" in item.keywords]
    if not gpu_tests:
        return
    import jax

    if jax.devices()[0].platform != "gpu":
        skip = pytest.mark.skip(reason="needs a GPU (run on the device machine)")
        for item in gpu_tests:
            item.add_marker(skip)


@pytest.fixture
def folder(small_checkpoint, tmp_path):
    """A private copy of ``small_checkpoint`` (float32, 2 layers, 4 experts, one file), free to damage."""
    import shutil

    dst = tmp_path / "ckpt"
    shutil.copytree(small_checkpoint[1], dst)
    return dst


@pytest.fixture
def sharded(small_checkpoint, tmp_path):
    """The same model saved by fiddler-jax in several shards plus an index, free to damage."""
    import fiddler_jax as fj

    model = fj.load_pretrained(small_checkpoint[1], progress=False)
    dst = tmp_path / "sharded"
    fj.save_pretrained(model, dst, max_shard_size="30KB", progress=False)
    return dst


@pytest.fixture
def restore_kernel_settings():
    """Put the kernel's process-wide settings (path, threads, pool) back to their defaults after a test."""
    yield
    import fiddler_jax.kernels as K

    K.set_kernel_path("auto")
    K.set_num_threads(0)
    K.set_pool(spin_us=50, wait_all=False, streamed_spin_us=-1)
    K.set_quant_dense_min_tokens(None)


def assert_recovers_from_injected_failure(engine, monkeypatch, owner, name: str, failing) -> None:
    """A forward pass of ``engine`` whose ``owner.name`` is replaced by ``failing`` (raising "injected ...")
    raises, leaves no streamed call open, and once ``owner.name`` is back the next pass gives the logits of a pass
    that never failed."""
    one = np.asarray([[5]])
    want = np.asarray(engine.logits(one))
    original = getattr(owner, name)
    monkeypatch.setattr(owner, name, failing)
    with pytest.raises(RuntimeError, match="injected"):
        engine.logits(one)
    assert not engine.streamed.open
    monkeypatch.setattr(owner, name, original)
    np.testing.assert_array_equal(np.asarray(engine.logits(one)), want)


# one module adds at most ~15k mappings (test_engine_families); 0.3 of the usual cap (65530) is ~20k
MAPPINGS_FRACTION_BEFORE_RELEASE = 0.3


@pytest.fixture(autouse=True, scope="module")
def release_compiled_programs_when_many():
    """The suite compiles thousands of XLA programs in one process; each holds memory mappings until released,
    and past the kernel's cap (``vm.max_map_count``, 65530) XLA:CPU crashes inside a compile
    (:mod:`fiddler_jax.runtime.compiled_programs`). When a test module ends past
    ``MAPPINGS_FRACTION_BEFORE_RELEASE`` of the cap, the programs are released (not after every module: the next
    modules reuse many of them)."""
    yield
    from fiddler_jax.runtime.compiled_programs import release_if_near_mapping_limit

    release_if_near_mapping_limit(MAPPINGS_FRACTION_BEFORE_RELEASE)
