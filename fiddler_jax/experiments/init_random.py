"""``fiddler-jax init-random``: write a Mixtral HF folder with seeded random weights (N(0, initializer_range²),
norms at 1), for demos and benchmarks on machines without a trained checkpoint."""
from __future__ import annotations

import os
from dataclasses import dataclass, field

import hydra
from hydra.core.config_store import ConfigStore

from fiddler_jax.errors import InvalidInputError
from fiddler_jax.experiments.common import CONF_DIR, clear_errors


@dataclass
class Geometry:
    vocab_size: int = 512
    hidden_size: int = 128
    intermediate_size: int = 256
    num_hidden_layers: int = 4
    num_attention_heads: int = 8
    num_key_value_heads: int = 2
    num_local_experts: int = 8
    num_experts_per_tok: int = 2
    max_position_embeddings: int = 2048
    sliding_window: int | None = None
    tie_word_embeddings: bool = False


@dataclass
class InitRandomConfig:
    out: str = "???"
    seed: int = 0
    dtype: str = "float32"
    overwrite: bool = False
    geometry: Geometry = field(default_factory=Geometry)


ConfigStore.instance().store(name="init_random_schema", node=InitRandomConfig)


@hydra.main(config_path=CONF_DIR, config_name="init_random", version_base="1.3")
@clear_errors
def main(cfg) -> None:
    from flax import nnx

    import fiddler_jax as fj
    from fiddler_jax.models.checkpoint import resolve_dtype

    out = os.path.expanduser(cfg.out)
    if os.path.exists(os.path.join(out, "config.json")) and not cfg.overwrite:
        raise InvalidInputError(f"{out} already holds a model; pass overwrite=true to replace it")
    g = cfg.geometry
    config = fj.MixtralConfig.from_hf_dict({"model_type": "mixtral", **dict(g)}, source="init-random geometry")
    model = fj.Mixtral(config, dtype=resolve_dtype(cfg.dtype), rngs=nnx.Rngs(cfg.seed))
    fj.save_pretrained(model, out)
    print(f"wrote a random Mixtral (seed {cfg.seed}, {g.num_hidden_layers} layers, {g.num_local_experts} experts, "
          f"hidden {g.hidden_size}) to {out}")


if __name__ == "__main__":
    main()
