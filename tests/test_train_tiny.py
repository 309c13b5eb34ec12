"""``fiddler-jax train-tiny``: corpus split, tokenizer, the two MoE training paths, a seconds-long training run
(loss goes down, the folder loads in fiddler-jax and transformers, a rerun gives the same bytes) and the bad
inputs, each of which must give one clear line."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import fiddler_jax as fj
from fiddler_jax.errors import InvalidInputError
from fiddler_jax.training import corpus as corpus_lib
from fiddler_jax.training.tokenizer import MIN_VOCAB, train_tokenizer

# A small corpus: stdlib modules that exist in every CPython 3.11+ (json/ plus a few single files).
CORPUS_FILES = ["json/__init__.py", "json/decoder.py", "json/encoder.py", "json/scanner.py", "json/tool.py",
                "textwrap.py", "fnmatch.py", "shlex.py", "bisect.py", "heapq.py", "colorsys.py", "keyword.py",
                "numbers.py", "glob.py", "string.py", "stat.py", "this.py", "abc.py", "copy.py", "operator.py"]
SMOKE = ["train=smoke", "corpus.heldout_fraction=0.25", "progress=false", "demo_tokens=8"]


@pytest.fixture(scope="module")
def small_corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    std = corpus_lib.stdlib_dir()
    for rel in CORPUS_FILES:
        os.makedirs(root / os.path.dirname(rel), exist_ok=True)
        shutil.copy(os.path.join(std, rel), root / rel)
    return root


def cli(*args, cwd):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    return subprocess.run([sys.executable, "-m", "fiddler_jax.cli", "train-tiny", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)


def test_split_is_by_file_deterministic_and_disjoint(small_corpus):
    c = corpus_lib.find_corpus(small_corpus, heldout_fraction=0.25)
    assert set(c.train) | set(c.heldout) == set(CORPUS_FILES) and not set(c.train) & set(c.heldout)
    assert c == corpus_lib.find_corpus(small_corpus, heldout_fraction=0.25)
    assert all(corpus_lib.is_heldout(f, 0.25) for f in c.heldout)
    # the side a file lands on depends on its relative path alone: other files do not move it
    fewer = corpus_lib.find_corpus(small_corpus, heldout_fraction=0.25, include_tests=False)
    assert set(fewer.heldout) <= set(c.heldout)


def test_tokenizer_is_byte_level_and_round_trips(small_corpus, tmp_path):
    from transformers import AutoTokenizer

    from fiddler_jax.training.tokenizer import save_tokenizer

    c = corpus_lib.find_corpus(small_corpus, heldout_fraction=0.25)
    tok = train_tokenizer([c.read(r) for r in c.train], 400)
    save_tokenizer(tok, tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    text = "def fibonacci(n):\n\tif n < 2:  # ünïcødé ✓\n        return n\r\n"
    ids = loaded(text)["input_ids"]
    assert ids[0] == loaded.bos_token_id == 1 and loaded.eos_token_id == 2 and len(loaded) == 400
    assert loaded.decode(ids, skip_special_tokens=True) == text
    assert loaded.unk_token_id not in ids  # every byte is in the vocabulary


def test_sparse_and_dense_moe_paths_give_the_same_loss_and_gradients():
    from fiddler_jax.training.train import loss_fn

    cfg = fj.ModelConfig.from_hf_dict(dict(model_type="mixtral", vocab_size=97, hidden_size=32,
                                             intermediate_size=24, num_hidden_layers=2, num_attention_heads=4,
                                             num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
                                             max_position_embeddings=64, initializer_range=0.2))
    graphdef, params = nnx.split(fj.MoeForCausalLM(cfg, rngs=nnx.Rngs(1)), nnx.Param)
    batch = jnp.asarray(np.random.default_rng(0).integers(0, 97, (3, 17)), jnp.int32)
    out = {impl: jax.value_and_grad(loss_fn, has_aux=True)(params, graphdef, batch, aux_coef=0.1, top_k=2,
                                                           moe_impl=impl) for impl in ("sparse", "dense")}
    (ls, _), gs = out["sparse"]
    (ld, _), gd = out["dense"]
    np.testing.assert_allclose(ls, ld, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(gs), jax.tree.leaves(gd)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


@pytest.fixture(scope="module")
def trained(small_corpus, tmp_path_factory):
    """A smoke training run through the CLI (a subprocess, as users run it)."""
    work = tmp_path_factory.mktemp("train")
    out = work / "model"
    r = cli(*SMOKE, f"corpus.dir={small_corpus}", f"out={out}", "progress=true", cwd=work)
    assert r.returncode == 0, r.stderr[-3000:]
    return work, out, r


def test_training_run_lowers_the_loss_and_writes_a_loadable_folder(trained):
    from transformers import AutoTokenizer, MixtralForCausalLM

    _, out, r = trained
    assert "train-tiny" in r.stderr and "step/s" in r.stderr + r.stdout  # the progress bar
    for f in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "README.md",
              "loss_curve.png", "training_metrics.json"):
        assert (out / f).is_file(), f
    m = json.loads((out / "training_metrics.json").read_text())
    nll = m["history"]["nll"]
    assert np.mean(nll[-5:]) < nll[0] - 0.5, nll
    assert m["history"]["eval_nll"][-1] < m["history"]["eval_nll"][0]
    assert m["eval"]["heldout_perplexity"] < m["eval"]["unigram_perplexity"] * 1.5
    assert len(m["eval"]["routing"]) == 2 and "fiddler-jax train-tiny" in m["command"]
    cfg = json.loads((out / "config.json").read_text())
    tok = AutoTokenizer.from_pretrained(out)
    assert cfg["torch_dtype"] == "bfloat16" and cfg["vocab_size"] == len(tok) == 300
    assert (cfg["bos_token_id"], cfg["eos_token_id"]) == (tok.bos_token_id, tok.eos_token_id)
    ours = fj.logits(fj.load_pretrained(out, progress=False), np.array([[1, 40, 41, 42]]))
    import torch
    hf = MixtralForCausalLM.from_pretrained(out, dtype=torch.float32)
    with torch.no_grad():
        theirs = hf(torch.tensor([[1, 40, 41, 42]])).logits.numpy()
    np.testing.assert_allclose(ours, theirs, atol=2e-4)
    assert "held-out" in (out / "README.md").read_text()


def test_training_is_reproducible(trained, small_corpus, tmp_path):
    """Same seed and corpus, in-process this time: the same weights, byte for byte."""
    from hydra import compose, initialize_config_dir

    from fiddler_jax.experiments import train_tiny
    from fiddler_jax.experiments.common import CONF_DIR
    from fiddler_jax.training.loop import run_training

    _, out, _ = trained
    with initialize_config_dir(CONF_DIR, version_base="1.3"):
        cfg = compose("train_tiny", overrides=[*SMOKE, f"corpus.dir={small_corpus}"])
    assert train_tiny.TrainTinyConfig  # the schema the CLI validated against
    again = tmp_path / "again"
    run_training(cfg, str(again), command="test", log=lambda *_: None)
    assert (again / "model.safetensors").read_bytes() == (out / "model.safetensors").read_bytes()
    assert (again / "tokenizer.json").read_bytes() == (out / "tokenizer.json").read_bytes()


@pytest.mark.parametrize("case,message", [
    ("empty_corpus", "holds no non-empty .py files"),
    ("small_vocab", "smaller than the byte alphabet"),
    ("existing_model", "already holds a model"),
])
def test_bad_input_gives_one_clear_line(trained, tmp_path, case, message):
    work, out, _ = trained
    (tmp_path / "empty").mkdir()
    args = {"empty_corpus": [f"corpus.dir={tmp_path / 'empty'}", f"out={tmp_path / 'o'}"],
            "small_vocab": ["train.vocab_size=255", f"out={tmp_path / 'o'}"],
            "existing_model": [f"out={out}"]}[case]
    r = cli(*SMOKE, *args, cwd=work)
    assert r.returncode == 2, (r.stdout, r.stderr[-2000:])
    assert message in r.stderr and "Traceback" not in r.stderr, r.stderr[-2000:]
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, r.stderr


def test_overwrite_true_accepts_an_existing_model_and_vocab_bound_is_exact(trained):
    from hydra import compose, initialize_config_dir

    from fiddler_jax.experiments.common import CONF_DIR
    from fiddler_jax.experiments.train_tiny import check_config
    from fiddler_jax.training.tokenizer import check_vocab_size

    _, out, _ = trained
    with initialize_config_dir(CONF_DIR, version_base="1.3"):
        cfg = compose("train_tiny", overrides=[*SMOKE, f"out={out}", "overwrite=true"])
        assert check_config(cfg) == str(out)
        with pytest.raises(InvalidInputError, match="already holds a model"):
            check_config(compose("train_tiny", overrides=[*SMOKE, f"out={out}"]))
    check_vocab_size(MIN_VOCAB)
    with pytest.raises(InvalidInputError, match="at least 259"):
        check_vocab_size(MIN_VOCAB - 1)


def test_bench_names_the_faster_moe_path(capsys):
    from fiddler_jax.training import bench

    bench.main(["train=smoke", "warmup=1", "steps=1", "budget_s=5", "max_steps=300"])
    last = capsys.readouterr().out.strip().splitlines()[-1]
    impl, steps = (kv.split("=")[1] for kv in last.split())
    assert impl in ("sparse", "dense") and 100 <= int(steps) <= 300, last


def test_a_recipe_geometry_picks_the_family_and_counts_its_parameters():
    """train.geometry's model_type makes a Qwen3-MoE (null keys left to config.json's defaults), and the active
    count leaves out the E - k unused experts of each MoE layer: tiny-mixtral's expert parameters split four
    ways, top-4, has the same total and half the active expert parameters."""
    from fiddler_jax.experiments.schemas import ModelShape
    from fiddler_jax.training.loop import count_parameters, model_config

    class Tok:
        bos_token_id, eos_token_id = 1, 2

    base = dict(hidden_size=256, intermediate_size=256, num_hidden_layers=4, num_attention_heads=8,
                num_key_value_heads=2, head_dim=32, rope_theta=10000.0, tie_word_embeddings=True)
    coarse = model_config(ModelShape(**base), 4096, Tok, 0.02)
    fine = model_config(ModelShape(**base, model_type="qwen3_moe", moe_intermediate_size=64, num_local_experts=32,
                                   num_experts_per_tok=4, norm_topk_prob=True), 4096, Tok, 0.02)
    assert (coarse.model_type, fine.model_type) == ("mixtral", "qwen3_moe")
    assert (fine.num_experts, fine.moe_intermediate_size, fine.norm_topk_prob, fine.qk_norm) == (32, 64, True, "head")
    assert count_parameters(coarse) == (8005888, 3287296)  # tiny-mixtral's published counts
    total, active = count_parameters(fine)
    router_growth = 4 * 256 * (32 - 8)
    qk_norms = 4 * 2 * 32
    assert total == 8005888 + router_growth + qk_norms
    coarse_active_experts = 4 * 2 * 3 * 256 * 256  # layers x top-2 x one expert
    assert active == 3287296 + router_growth + qk_norms - coarse_active_experts // 2


def test_a_hydra_geometry_with_dense_layers_makes_the_model_in_train_tiny_and_init_random(tmp_path):
    """Under Hydra the geometry is a DictConfig: its lists (mlp_only_layers) and nulls reach config.json's
    parser as plain values -- in train-tiny's model and in init-random's written model."""
    import subprocess
    import sys

    from omegaconf import OmegaConf

    from fiddler_jax.experiments.schemas import ModelShape
    from fiddler_jax.training.loop import model_config

    class Tok:
        bos_token_id, eos_token_id = 1, 2

    shape = OmegaConf.structured(ModelShape(model_type="qwen3_moe", hidden_size=32, intermediate_size=64,
                                            moe_intermediate_size=16, num_hidden_layers=3, num_local_experts=8,
                                            num_experts_per_tok=2, mlp_only_layers=[1]))
    cfg = model_config(shape, 300, Tok, 0.02)
    assert cfg.model_type == "qwen3_moe" and cfg.moe_layers == (0, 2) and cfg.norm_topk_prob is False
    out = tmp_path / "random"
    r = subprocess.run([sys.executable, "-m", "fiddler_jax.cli", "init-random", f"out={out}",
                        "geometry.model_type=qwen3_moe", "geometry.moe_intermediate_size=16",
                        "geometry.mlp_only_layers=[1]", "geometry.num_hidden_layers=2", "geometry.hidden_size=32"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "random qwen3_moe model" in r.stdout
    written = fj.ModelConfig.from_pretrained(out)
    assert written.model_type == "qwen3_moe" and written.moe_layers == (0,)
