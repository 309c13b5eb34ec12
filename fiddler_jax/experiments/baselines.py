"""Peer baselines for ``fiddler-jax bench baseline=...``, run on the same scenario, prompt and GPU budget.

``hf_accelerate``: transformers' Mixtral with accelerate's ``device_map="auto"`` and ``max_memory`` = the GPU
budget (the rest on the CPU): layers that do not fit run from host memory, weights moved per forward — the
DeepSpeed/accelerate-style offloading the paper compares against. Needs torch with CUDA and accelerate:
``pip install 'fiddler-jax[baselines]'``.
"""
from __future__ import annotations

import statistics
import time

from omegaconf import OmegaConf

from fiddler_jax.errors import InvalidInputError
from fiddler_jax.units import format_bytes, parse_bytes


INSTALL = "pip install 'fiddler-jax[baselines]'"  # the extra with accelerate (which brings torch)


def _require():
    for package in ("torch", "accelerate"):
        try:
            __import__(package)
        except ImportError:
            raise InvalidInputError(f"baseline=hf_accelerate needs {package}, which is not installed: {INSTALL} "
                                    "(torch with CUDA), or drop the baseline") from None
    import torch

    if not torch.cuda.is_available():
        raise InvalidInputError("baseline=hf_accelerate needs a CUDA GPU visible to torch; this machine has none")
    return torch


def _hf_model(cfg, torch, budget: int):
    import accelerate
    import transformers

    dtype = {"bfloat16": torch.bfloat16, "float32": torch.float32}[cfg.model.dtype]
    max_memory = {0: budget, "cpu": "100000GiB"}
    if not cfg.model.random:
        from fiddler_jax.experiments.model_group import checkpoint_path

        path = checkpoint_path(cfg.model)
        model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=dtype, device_map="auto",
                                                                  max_memory=max_memory)
        return model, transformers.AutoTokenizer.from_pretrained(path) if _has_tokenizer(path) else None
    geometry = OmegaConf.to_container(cfg.model.geometry)
    hf_config = transformers.MixtralConfig(**{k: v for k, v in geometry.items() if k != "model_type"})
    torch.manual_seed(cfg.model.weight_seed)
    with accelerate.init_empty_weights():
        model = transformers.AutoModelForCausalLM.from_config(hf_config, dtype=dtype)
    model.to_empty(device="cpu")
    _fill_random(model, torch, hf_config.initializer_range, cfg.model.weight_seed)
    device_map = accelerate.infer_auto_device_map(model, max_memory=max_memory,
                                                  no_split_module_classes=["MixtralDecoderLayer"])
    return accelerate.dispatch_model(model, device_map=device_map), None


TILE = 1_000_003  # a prime: no weight row (4096 or 14336 long) repeats the tile in step with its neighbours


def _fill_random(model, torch, std: float, seed: int) -> None:
    """Random values for a 47B-parameter model at memory speed: each parameter is a seeded normal(0, std) tile
    repeated (``normal_`` on every element took over 220 s for Mixtral-8x7B on the device's 16 cores). Speed
    does not depend on the values; norms are 1."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
                continue
            tile = (torch.randn(TILE, generator=gen) * std).to(p.dtype)
            flat = p.view(-1)
            whole = flat.numel() // TILE
            if whole:
                flat[: whole * TILE].view(whole, TILE).copy_(tile.expand(whole, TILE))
            rest = flat.numel() - whole * TILE
            if rest:
                flat[whole * TILE:].copy_(tile[:rest])


def _has_tokenizer(path: str) -> bool:
    import os
    return os.path.exists(os.path.join(path, "tokenizer.json"))


def run_hf_accelerate(cfg) -> tuple[dict, dict]:
    """The scenario through transformers + accelerate at the same budget: (metrics, extra result fields)."""
    torch = _require()
    from fiddler_jax.experiments.build import gpu_budget
    from fiddler_jax.experiments.workload import prompt_ids, prompt_text, summarize

    budget = parse_bytes(gpu_budget(cfg.hardware))
    model, tokenizer = _hf_model(cfg, torch, budget)
    s = cfg.scenario
    ids = prompt_ids(tokenizer, prompt_text(cfg.prompts_file), s.input_tokens, model.config.vocab_size, cfg.seed)
    inputs = torch.as_tensor(ids, device="cuda:0")

    def generate(new: int):
        torch.cuda.synchronize()
        tic = time.perf_counter()
        out = model.generate(inputs, max_new_tokens=new, min_new_tokens=new, do_sample=False,
                             num_beams=s.num_beams, length_penalty=s.length_penalty,
                             early_stopping=s.early_stopping, pad_token_id=0)
        torch.cuda.synchronize()
        return out, time.perf_counter() - tic

    runs = []
    for i in range(cfg.warmup + cfg.repeats):
        ttft = generate(1)[1]
        out, total = generate(s.output_tokens) if s.output_tokens > 1 else (None, ttft)
        made = s.output_tokens if out is None else out.shape[1] - ids.shape[1]
        run = {"ttft_s": ttft, "latency_s": total, "new_tokens": made}
        if s.name == "decode":
            run["tokens_per_s"] = made / total
        if s.name == "beam":
            run["tokens_per_s"] = s.num_beams * made / total
        if i >= cfg.warmup:
            runs.append(run)
    devices = sorted({str(d) for d in getattr(model, "hf_device_map", {}).values()})
    extra = {"baseline": {"name": "hf_accelerate", "budget": format_bytes(budget), "devices": devices,
                          "peak_cuda_bytes": int(torch.cuda.max_memory_allocated()),
                          "ttft_median_s": statistics.median(r["ttft_s"] for r in runs)},
             "gpu_memory": {"peak_bytes_in_use": int(torch.cuda.max_memory_allocated()), "source": "torch.cuda"}}
    del model
    torch.cuda.empty_cache()
    return summarize(runs), extra


__all__ = ["run_hf_accelerate"]
