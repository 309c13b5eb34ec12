"""``fiddler-jax generate``: load a checkpoint, continue a prompt (text or token ids), print it and tokens/s."""
from __future__ import annotations

from dataclasses import dataclass, field

import hydra
from hydra.core.config_store import ConfigStore
from omegaconf import OmegaConf

from fiddler_jax.errors import InvalidInputError
from fiddler_jax.experiments.common import CONF_DIR, clear_errors, resolve_model_path


@dataclass
class ModelConfig:
    path: str | None = None  # HF folder; null = the bundled tiny model
    dtype: str = "float32"


@dataclass
class GenerateConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    prompt: str | None = None  # text, through the folder's tokenizer
    prompt_ids: list[int] | None = None  # or token ids
    max_new_tokens: int = 64
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int = 0


ConfigStore.instance().store(name="generate_schema", node=GenerateConfig)
DEFAULT_PROMPT = "def fibonacci(n):"


@hydra.main(config_path=CONF_DIR, config_name="generate", version_base="1.3")
@clear_errors
def main(cfg) -> None:
    import numpy as np

    import fiddler_jax as fj

    path = resolve_model_path(cfg.model.path)
    model = fj.load_pretrained(path, dtype=cfg.model.dtype)
    tokenizer = fj.load_tokenizer(path)
    if cfg.prompt is not None and cfg.prompt_ids is not None:
        raise InvalidInputError("give either prompt=<text> or prompt_ids=[...], not both")
    if cfg.prompt_ids is not None:
        ids = np.asarray(OmegaConf.to_container(cfg.prompt_ids), dtype=np.int64)[None, :]
    else:
        if tokenizer is None:
            raise InvalidInputError(f"{path} has no tokenizer files, so a text prompt cannot be encoded; pass "
                                    "prompt_ids=[1,2,3] instead")
        ids = np.asarray(tokenizer(cfg.prompt if cfg.prompt is not None else DEFAULT_PROMPT)["input_ids"])[None, :]
    out, stats = fj.generate_with_stats(model, ids, cfg.max_new_tokens, do_sample=cfg.do_sample, seed=cfg.seed,
                                        temperature=cfg.temperature, top_p=cfg.top_p)
    new = out[0, ids.shape[1]:]
    if tokenizer is not None:
        print(tokenizer.decode(out[0], skip_special_tokens=True))
    else:
        print("prompt ids:   ", ids[0].tolist())
        print("generated ids:", new.tolist())
    print(f"[{stats.prompt_tokens} prompt tokens, {stats.new_tokens} new; time to first token "
          f"{stats.prefill_s * 1e3:.0f} ms (compile included); decode {stats.decode_tokens_per_s:.1f} tokens/s "
          f"(steady state) on {model_device(model)}]")


def model_device(model) -> str:
    import jax
    return jax.devices()[0].platform


if __name__ == "__main__":
    main()
