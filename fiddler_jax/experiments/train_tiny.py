"""``fiddler-jax train-tiny``: train the bundled tiny Mixtral from scratch (optax) on Python source and write an
HF folder: config.json, model.safetensors (bfloat16), tokenizer files, loss_curve.png, training_metrics.json and
a model card README.md.

Steps: corpus (stdlib ``*.py``, split by file) → byte-level BPE tokenizer → token streams (optionally cached in
``data.prepared``) → AdamW training with the load-balancing loss → bfloat16 export → held-out perplexity vs a
unigram baseline, routing statistics and a greedy demo, measured on the exported weights.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

import hydra
from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig

from fiddler_jax.errors import InvalidInputError
from fiddler_jax.experiments.common import CONF_DIR, clear_errors
from fiddler_jax.experiments.schemas import ModelShape


@dataclass
class CorpusConfig:
    dir: str | None = None  # folder of .py files; null = this interpreter's standard library
    heldout_fraction: float = 0.03  # of the files, chosen by a hash of their relative path
    include_tests: bool = True  # also the stdlib's test suites (test/, tests/, idle_test/)


@dataclass
class DataConfig:
    prepared: str | None = None  # cache folder for tokenizer + token streams: reused when present, else written


@dataclass
class TrainConfig:
    # the model's size (vocab_size stays null: the vocabulary is the tokenizer's, train.vocab_size)
    geometry: ModelShape = field(default_factory=lambda: ModelShape(
        hidden_size=256, intermediate_size=256, head_dim=32, rope_theta=10000.0, tie_word_embeddings=True))
    vocab_size: int = 4096  # byte-level BPE vocabulary (≥ 259: 256 bytes + 3 special tokens)
    steps: int = 4000
    batch_size: int = 32
    seq_len: int = 512
    lr: float = 3e-3
    warmup_steps: int = 200
    final_lr_fraction: float = 0.1
    weight_decay: float = 0.1
    clip_norm: float = 1.0
    aux_loss_coef: float = 0.02  # × mean over layers of the load-balancing loss
    moe_impl: str = "dense"  # sparse (the model's ragged_dot forward) | dense (all experts, same function)
    eval_every: int = 250
    eval_tokens: int = 65536  # held-out tokens for the periodic evaluation
    final_eval_tokens: int = 262144  # held-out tokens for the final perplexity / routing statistics
    eval_batch_size: int = 16
    log_every: int = 10


@dataclass
class TrainTinyConfig:
    out: str | None = None  # output folder; null = <hydra run dir>/model
    overwrite: bool = False
    seed: int = 0
    progress: bool = True
    deterministic: bool = True  # XLA deterministic GPU ops (reproducible weights on GPU)
    demo_prompt: str = "def fibonacci(n):"
    demo_tokens: int = 48
    corpus: CorpusConfig = field(default_factory=CorpusConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


ConfigStore.instance().store(name="train_tiny_schema", node=TrainTinyConfig)

MODEL_FILES = ("config.json", "model.safetensors", "model.safetensors.index.json")


def check_config(cfg) -> str:
    """Validate what can be validated before any work; returns the output folder."""
    from fiddler_jax.training.tokenizer import check_vocab_size
    from fiddler_jax.training.train import MOE_IMPLS

    out = os.path.expanduser(cfg.out) if cfg.out else os.path.join(HydraConfig.get().runtime.output_dir, "model")
    held = [f for f in MODEL_FILES if os.path.exists(os.path.join(out, f))]
    if held and not cfg.overwrite:
        raise InvalidInputError(f"output folder {out} already holds a model ({', '.join(held)}); pass "
                                "overwrite=true to replace it, or choose another out=")
    if os.path.exists(out) and not os.path.isdir(out):
        raise InvalidInputError(f"out={out} exists and is not a folder")
    t = cfg.train
    check_vocab_size(t.vocab_size, "train.vocab_size")
    if t.moe_impl not in MOE_IMPLS:
        raise InvalidInputError(f"train.moe_impl={t.moe_impl!r}; use one of {list(MOE_IMPLS)}")
    for name in ("steps", "batch_size", "seq_len", "eval_every", "eval_tokens", "final_eval_tokens",
                 "eval_batch_size", "log_every"):
        if getattr(t, name) <= 0:
            raise InvalidInputError(f"train.{name} must be positive, got {getattr(t, name)}")
    if t.geometry.vocab_size is not None:
        raise InvalidInputError(f"train.geometry.vocab_size={t.geometry.vocab_size} is not used: the vocabulary is "
                                "the trained tokenizer's; set train.vocab_size instead")
    if t.seq_len > t.geometry.max_position_embeddings:
        raise InvalidInputError(f"train.seq_len ({t.seq_len}) exceeds geometry.max_position_embeddings "
                                f"({t.geometry.max_position_embeddings})")
    if not t.lr > 0:
        raise InvalidInputError(f"train.lr must be positive, got {t.lr}")
    return out


def command_line() -> str:
    overrides = HydraConfig.get().overrides.task
    return " ".join(["fiddler-jax train-tiny", *overrides])


@hydra.main(config_path=CONF_DIR, config_name="train_tiny", version_base="1.3")
@clear_errors
def main(cfg) -> None:
    out = check_config(cfg)
    if cfg.deterministic and "xla_gpu_deterministic_ops" not in os.environ.get("XLA_FLAGS", ""):
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_gpu_deterministic_ops=true").strip()
    from fiddler_jax.training.loop import run_training

    run_training(cfg, out, command=command_line())


if __name__ == "__main__":
    main()
