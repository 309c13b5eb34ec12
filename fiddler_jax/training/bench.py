"""Time the training step of a geometry with both MoE paths, to pick ``train.moe_impl`` (and a step count that
fits a time budget) before a long run:

    python -m fiddler_jax.training.bench [train=tiny] [budget_s=300] [max_steps=4000] [warmup=3] [steps=10] [deterministic=true]

Prints one line per path and, last, ``MOE_IMPL=<fastest> STEPS=<n>`` for a shell to ``eval``.
"""
from __future__ import annotations

import os
import sys
import time


def main(argv: list[str]) -> None:
    opts = dict(a.split("=", 1) for a in argv)
    if opts.get("deterministic", "true") == "true" and "xla_gpu_deterministic_ops" not in os.environ.get("XLA_FLAGS",
                                                                                                        ""):
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_gpu_deterministic_ops=true").strip()
    import jax
    import numpy as np
    from hydra import compose, initialize_config_dir

    from fiddler_jax.experiments.common import CONF_DIR
    from fiddler_jax.experiments import train_tiny  # noqa: F401  (registers the schema)
    from fiddler_jax.training.loop import model_config
    from fiddler_jax.training.train import MOE_IMPLS, Trainer, init_model, make_optimizer

    with initialize_config_dir(CONF_DIR, version_base="1.3"):
        cfg = compose("train_tiny", overrides=[f"train={opts.get('train', 'tiny')}"])
    t = cfg.train

    class Tok:  # the special-token ids of the trained tokenizer (<s> = 1, </s> = 2)
        bos_token_id, eos_token_id = 1, 2

    mcfg = model_config(t.geometry, t.vocab_size, Tok, t.aux_loss_coef)
    rng = np.random.default_rng(0)
    batch = rng.integers(0, t.vocab_size, (t.batch_size, t.seq_len + 1)).astype(np.int32)
    timings = {}
    for impl in MOE_IMPLS:
        tx = make_optimizer(t.lr, t.steps, t.warmup_steps, t.final_lr_fraction, t.weight_decay, t.clip_norm)
        trainer = Trainer(init_model(mcfg, 0), tx, aux_coef=t.aux_loss_coef, moe_impl=impl)
        tic = time.perf_counter()
        for _ in range(int(opts.get("warmup", 3))):
            jax.block_until_ready(trainer.step(batch))
        compile_s = time.perf_counter() - tic
        n = int(opts.get("steps", 10))
        tic = time.perf_counter()
        for _ in range(n):
            m = trainer.step(batch)
        jax.block_until_ready(m)
        timings[impl] = (time.perf_counter() - tic) / n
        print(f"{impl}: {timings[impl] * 1e3:.1f} ms/step ({compile_s:.0f} s compile+warm-up) on "
              f"{jax.devices()[0].device_kind}", flush=True)
    best = min(timings, key=timings.get)
    steps = min(int(opts.get("max_steps", t.steps)), int(float(opts.get("budget_s", 300)) / timings[best]))
    steps = max(100, steps // 250 * 250)
    print(f"MOE_IMPL={best} STEPS={steps}")


if __name__ == "__main__":
    main(sys.argv[1:])
