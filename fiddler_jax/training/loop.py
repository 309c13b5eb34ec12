"""The whole ``train-tiny`` run: data → model → training loop (progress bar, periodic held-out NLL) → bfloat16
export → final evaluation on the exported weights → loss curve, metrics and model card."""
from __future__ import annotations

import math
import os
import platform
import tempfile
import time

import jax
import numpy as np
from tqdm.auto import tqdm

from fiddler_jax.models.checkpoint import load_pretrained, save_pretrained
from fiddler_jax.models.config import ModelConfig
from fiddler_jax.runtime.generate import generate
from fiddler_jax.training import data as data_lib
from fiddler_jax.training import report
from fiddler_jax.training.evaluate import evaluate
from fiddler_jax.training.tokenizer import save_tokenizer
from fiddler_jax.training.train import Trainer, init_model, make_optimizer


GEOMETRY_ALWAYS = ("model_type", "rope_theta", "num_experts", "num_local_experts", "moe_intermediate_size",
                   "norm_topk_prob")  # in the metrics' geometry whatever keys the recipe spelled


def model_config(geometry, vocab_size: int, tokenizer, aux_coef: float) -> ModelConfig:
    """The model of a ``train.geometry`` (``ModelShape``: its ``model_type`` picks the family; null keys take
    config.json's defaults)."""
    from fiddler_jax.experiments.schemas import geometry_keys

    keys = geometry_keys(geometry)
    return ModelConfig.from_hf_dict({
        "model_type": "mixtral", **keys, "vocab_size": vocab_size,
        "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id, "pad_token_id": None,
        "router_aux_loss_coef": aux_coef}, source="train-tiny geometry")


def count_parameters(cfg: ModelConfig) -> tuple[int, int]:
    """(total, active per token) parameter counts, from the model's structure: the active count leaves out, in
    each MoE layer, the routed experts a token does not use (E - k of them)."""
    from flax import nnx

    from fiddler_jax.runtime.engine import abstract_model

    total = sum(math.prod(p.shape) for p in jax.tree.leaves(nnx.state(abstract_model(cfg), nnx.Param)))
    expert = 3 * cfg.hidden_size * cfg.moe_intermediate_size
    idle = sum(cfg.is_sparse(n) for n in range(cfg.num_hidden_layers)) * (cfg.num_experts - cfg.num_experts_per_tok)
    return total, total - idle * expert


def run_training(cfg, out: str, command: str, log=print) -> dict:
    t = cfg.train
    tic_all = time.perf_counter()
    data = data_lib.prepare_or_load(cfg.data.prepared, cfg.corpus.dir, t.vocab_size, cfg.corpus.heldout_fraction,
                                    cfg.corpus.include_tests, log=log)
    tokenizer = data.tokenizer
    mcfg = model_config(t.geometry, len(tokenizer), tokenizer, t.aux_loss_coef)
    total_params, active_params = count_parameters(mcfg)
    device = jax.devices()[0]
    log(f"model: {total_params / 1e6:.2f} M parameters ({active_params / 1e6:.2f} M active); training on "
        f"{device.device_kind} ({device.platform}), {t.steps} steps x {t.batch_size} x {t.seq_len} tokens")

    model = init_model(mcfg, cfg.seed)
    tx = make_optimizer(t.lr, t.steps, t.warmup_steps, t.final_lr_fraction, t.weight_decay, t.clip_norm)
    trainer = Trainer(model, tx, aux_coef=t.aux_loss_coef, moe_impl=t.moe_impl)
    del model
    rng = np.random.default_rng(cfg.seed)
    eval_windows = data_lib.eval_windows(data.heldout, t.seq_len, t.eval_tokens)

    history = {"step": [], "loss": [], "nll": [], "aux": [], "grad_norm": [], "eval_step": [], "eval_nll": []}
    pending: list = []
    bar = tqdm(range(1, t.steps + 1), desc="train-tiny", unit="step", disable=not cfg.progress, mininterval=1.0)
    compile_s, tic = 0.0, time.perf_counter()
    for step in bar:
        pending.append((step, trainer.step(data_lib.sample_batch(data.train, rng, t.batch_size, t.seq_len))))
        if step == 1:
            jax.block_until_ready(pending[-1][1])
            compile_s = time.perf_counter() - tic
            tic = time.perf_counter()
        if step % t.log_every == 0 or step == t.steps:
            for s, m in jax.device_get(pending):
                for key, value in zip(("loss", "nll", "aux", "grad_norm"), m):
                    history[key].append(float(value))
                history["step"].append(s)
            pending.clear()
            if not math.isfinite(history["loss"][-1]):
                raise FloatingPointError(f"training diverged at step {step} (loss {history['loss'][-1]}); "
                                         "lower train.lr")
            bar.set_postfix(nll=f"{history['nll'][-1]:.3f}", aux=f"{history['aux'][-1]:.3f}",
                            heldout=f"{history['eval_nll'][-1]:.3f}" if history["eval_nll"] else "-")
        if step % t.eval_every == 0 or step == t.steps:
            history["eval_step"].append(step)
            history["eval_nll"].append(trainer.eval_nll(eval_windows, t.eval_batch_size))
            bar.write(f"step {step}: train NLL {history['nll'][-1]:.3f} (aux {history['aux'][-1]:.3f}), held-out "
                      f"NLL {history['eval_nll'][-1]:.3f}, {time.perf_counter() - tic:.0f} s")
            bar.set_postfix(nll=f"{history['nll'][-1]:.3f}", heldout=f"{history['eval_nll'][-1]:.3f}")
    jax.block_until_ready(trainer.params)
    train_s = time.perf_counter() - tic + compile_s
    bar.close()
    tokens_per_s = (t.steps - 1) * t.batch_size * t.seq_len / max(train_s - compile_s, 1e-9)
    log(f"trained {t.steps} steps in {train_s:.0f} s ({compile_s:.0f} s compiling; {tokens_per_s / 1e3:.0f} k "
        f"tokens/s); last train NLL {history['nll'][-1]:.3f}, held-out NLL {history['eval_nll'][-1]:.3f}")

    # Export: float32 master weights → bfloat16 HF folder (+ tokenizer), then measure what was shipped.
    os.makedirs(out, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        save_pretrained(trainer.model(), tmp, progress=False)
        save_pretrained(load_pretrained(tmp, dtype="bfloat16", progress=False), out, progress=False)
    save_tokenizer(tokenizer, out)
    shipped = load_pretrained(out, dtype="float32", progress=False)
    final_windows = data_lib.eval_windows(data.heldout, t.seq_len, t.final_eval_tokens)
    ev = evaluate(shipped, final_windows, data.train, batch_size=t.eval_batch_size)
    prompt_ids = np.asarray(tokenizer(cfg.demo_prompt)["input_ids"])[None, :]
    demo_ids = generate(shipped, prompt_ids, cfg.demo_tokens)
    demo = tokenizer.decode(demo_ids[0], skip_special_tokens=True)

    m = data.manifest
    metrics = {
        "command": command,
        "seed": cfg.seed,
        "vocab_size": mcfg.vocab_size,
        "parameters": total_params,
        "active_parameters": active_params,
        "geometry": {k: v for k, v in mcfg.to_hf_dict().items()  # vocab: above; the experts under the family's key
                     if (k in dict(t.geometry) and k != "vocab_size") or k in GEOMETRY_ALWAYS},
        "train": {k: v for k, v in dict(t).items() if k != "geometry"},
        "data": {"python": m["python"], "corpus_root": m["corpus_root"], "corpus_sha256": m["corpus_sha256"],
                 "include_tests": m["include_tests"], "heldout_fraction": m["heldout_fraction"],
                 "train_files": len(m["train_files"]), "heldout_files": len(m["heldout_files"]),
                 "train_tokens": m["train_tokens"], "heldout_tokens": m["heldout_tokens"],
                 "train_chars": m["train_chars"], "heldout_file_list": m["heldout_files"]},
        "device": f"{device.device_kind} ({device.platform})",
        "host": platform.node(),
        "jax_version": jax.__version__,
        "train_seconds": train_s,
        "compile_seconds": compile_s,
        "tokens_per_second": tokens_per_s,
        "total_seconds": time.perf_counter() - tic_all,
        "eval": ev,
        "demo_prompt": cfg.demo_prompt,
        "demo_tokens": cfg.demo_tokens,
        "demo": demo,
        "history": history,
    }
    report.plot_loss_curve(history, os.path.join(out, "loss_curve.png"), unigram_nll=math.log(ev["unigram_perplexity"]),
                           title=f"{report.model_name(metrics['geometry'])} training")
    report.write_report(metrics, out)
    log(f"held-out perplexity {ev['heldout_perplexity']:.2f} (unigram {ev['unigram_perplexity']:.1f}) on "
        f"{ev['heldout_tokens']} tokens")
    for r in ev["routing"]:
        log(f"  layer {r['layer']}: imbalance {r['imbalance']:.2f}, load entropy {r['load_entropy']:.3f}, router "
            f"entropy {r['router_entropy']:.3f}, min share {r['min_share']:.1%}")
    log(f"demo: {demo!r}")
    log(f"wrote {out}")
    return metrics
