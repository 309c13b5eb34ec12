"""``fiddler-jax quant-accuracy``: held-out perplexity, routing change and greedy agreement of a model whose
routed experts are int8 / int4 (dequantised: the weights a quantised lane computes with) against the model's own
weights (:mod:`fiddler_jax.analysis.expert_precision`). Prints a line per variant, the table last, and writes
``quant_accuracy.json``."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

import hydra
from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from omegaconf import OmegaConf

from fiddler_jax.errors import InvalidInputError
from fiddler_jax.experiments.common import CONF_DIR, check_output_path, clear_errors, write_output
from fiddler_jax.experiments.model_group import checkpoint_path
from fiddler_jax.experiments.schemas import ModelSchema


@dataclass
class QuantAccuracyConfig:
    model: ModelSchema = field(default_factory=ModelSchema)
    precisions: list[str] = field(default_factory=lambda: ["int8", "int4"])
    int4_groups: list[int] = field(default_factory=lambda: [32, 64, 128])
    data: str | None = None
    seq_len: int = 256
    max_tokens: int = 65536
    prompts: int = 32
    prompt_tokens: int = 32
    new_tokens: int = 32
    batch_size: int = 8
    out: str | None = None


ConfigStore.instance().store(name="quant_accuracy_schema", node=QuantAccuracyConfig)


def variants(precisions, groups) -> list[tuple[str, int | None]]:
    """(precision, group) pairs to measure: int8 once, int4 once per group; every one checked first."""
    from fiddler_jax.models.quantization import check_precision

    if not precisions:
        raise InvalidInputError("precisions is empty; name at least one of int8, int4")
    found = []
    for p in precisions:
        check_precision(p)
        if p == "bf16":
            raise InvalidInputError("precisions: bf16 is the reference every variant is compared with; list int8 "
                                    "and/or int4")
        if p == "int4":
            if not groups:
                raise InvalidInputError("int4 needs at least one group in int4_groups (32, 64 or 128)")
            for g in groups:
                check_precision(p, g)
                found.append((p, int(g)))
        else:
            found.append((p, None))
    return found


def table(rows: list[dict]) -> str:
    head = (f"{'precision':<10}{'group':>6}{'bytes/expert':>14}{'x bf16':>8}{'perplexity':>12}{'change':>9}"
            f"{'routing chg':>13}{'greedy agree':>14}{'prompts eq':>12}")
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['precision']:<10}{r['group'] or '':>6}{r['bytes_per_expert']:>14,}"
                     f"{r['bytes_ratio']:>8.3f}{r['perplexity']:>12.4f}{r['perplexity_change']:>+9.2%}"
                     f"{r['routing_change']:>13.2%}{r['greedy_token_agreement']:>14.2%}"
                     f"{r['greedy_prompts_equal']:>12.2%}")
    return "\n".join(lines)


@hydra.main(config_path=CONF_DIR, config_name="quant_accuracy", version_base="1.3")
@clear_errors
def main(cfg) -> None:
    import numpy as np

    import fiddler_jax as fj
    from fiddler_jax.analysis import expert_precision as X
    from fiddler_jax.experiments.profile import text_documents, token_windows
    from fiddler_jax.provenance import provenance

    todo = variants(list(cfg.precisions), list(cfg.int4_groups))
    for name in ("seq_len", "max_tokens", "prompts", "prompt_tokens", "new_tokens", "batch_size"):
        if cfg[name] < 1:
            raise InvalidInputError(f"{name} must be >= 1, got {cfg[name]}")
    if cfg.prompt_tokens > cfg.seq_len:
        raise InvalidInputError(f"prompt_tokens={cfg.prompt_tokens} exceeds seq_len={cfg.seq_len}: prompts are "
                                "the starts of held-out windows")
    if cfg.model.dtype != "float32":
        raise InvalidInputError(f"model.dtype={cfg.model.dtype}: quant-accuracy runs in float32 (the dequantised "
                                "weights are exact there); leave model.dtype=float32")
    out = check_output_path(cfg.out or HydraConfig.get().runtime.output_dir, "the results folder", folder=True)
    path = checkpoint_path(cfg.model)
    model = fj.load_pretrained(path, dtype="float32", progress=False)
    tokenizer = fj.load_tokenizer(path)
    if tokenizer is None:
        raise InvalidInputError(f"{path} has no tokenizer files; quant-accuracy needs one to encode the text")
    docs, source = text_documents(cfg.data)
    windows = token_windows(tokenizer, docs, cfg.seq_len + 1, cfg.max_tokens + cfg.max_tokens // cfg.seq_len)
    if len(windows) < 1:
        raise InvalidInputError(f"{source} holds fewer than {cfg.seq_len + 1} tokens: nothing to measure; give "
                                "more text or a smaller seq_len")
    windows = np.stack(windows).astype(np.int32)
    prompts = windows[np.linspace(0, len(windows) - 1, min(cfg.prompts, len(windows))).astype(int),
                      :cfg.prompt_tokens]
    experts = X.routed_expert_weights(model)
    print(f"{path}: {len(experts)} MoE layers; {windows.shape[0]} windows of {cfg.seq_len} tokens from {source}; "
          f"{len(prompts)} prompts of {cfg.prompt_tokens} tokens, {cfg.new_tokens} new each", flush=True)
    bf16_bytes = X.set_expert_precision(experts, "bf16")
    reference = X.measure(model, windows, prompts, cfg.new_tokens, cfg.batch_size)
    rows = []
    for precision, group in todo:
        nbytes = X.set_expert_precision(experts, precision, group or 64)
        row = {"precision": precision, "group": group, "bytes_per_expert": nbytes,
               "bytes_ratio": nbytes / bf16_bytes,
               **X.compare(reference, X.measure(model, windows, prompts, cfg.new_tokens, cfg.batch_size))}
        rows.append(row)
        print(f"{precision} {group or '':>3}: perplexity {row['perplexity']:.4f} ({row['perplexity_change']:+.2%}), "
              f"routing change {row['routing_change']:.2%}, greedy agreement {row['greedy_token_agreement']:.2%}",
              flush=True)
    X.set_expert_precision(experts, "bf16")
    result = {"model": path, "source": source, "heldout_targets": reference["targets"],
              "reference_perplexity": rows[0]["reference_perplexity"], "bf16_bytes_per_expert": bf16_bytes,
              "variants": rows, "config": OmegaConf.to_container(cfg, resolve=True), **provenance()}
    target = os.path.join(out, "quant_accuracy.json")
    write_output(target, "the results", lambda p: open(p, "w").write(json.dumps(result, indent=1)))
    print(f"reference perplexity {result['reference_perplexity']:.4f} over {reference['targets']} held-out tokens; "
          f"wrote {target}")
    print(table(rows))


if __name__ == "__main__":
    main()
