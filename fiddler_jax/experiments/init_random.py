"""``fiddler-jax init-random``: write a Mixtral HF folder with seeded random weights (N(0, initializer_range²),
norms at 1), for demos and benchmarks on machines without a trained checkpoint."""
from __future__ import annotations

import os
from dataclasses import dataclass, field

import hydra
from hydra.core.config_store import ConfigStore
from omegaconf import OmegaConf

from fiddler_jax.errors import InvalidInputError
from fiddler_jax.experiments.common import CONF_DIR, check_output_path, clear_errors, write_output
from fiddler_jax.experiments.schemas import ModelShape, geometry_keys


@dataclass
class InitRandomConfig:
    out: str = "???"
    seed: int = 0
    dtype: str = "float32"
    overwrite: bool = False
    geometry: ModelShape = field(default_factory=lambda: ModelShape(vocab_size=512))


ConfigStore.instance().store(name="init_random_schema", node=InitRandomConfig)


@hydra.main(config_path=CONF_DIR, config_name="init_random", version_base="1.3")
@clear_errors
def main(cfg) -> None:
    from flax import nnx

    import fiddler_jax as fj
    from fiddler_jax.models.checkpoint import resolve_dtype

    if OmegaConf.is_missing(cfg, "out"):
        raise InvalidInputError("init-random needs out=<folder>: where to write the model")
    out = os.path.expanduser(cfg.out)
    if os.path.exists(os.path.join(out, "config.json")) and not cfg.overwrite:
        raise InvalidInputError(f"{out} already holds a model; pass overwrite=true to replace it")
    check_output_path(out, "the model", folder=True)
    config = fj.ModelConfig.from_hf_dict({"model_type": "mixtral", **geometry_keys(cfg.geometry)},
                                         source="init-random geometry")
    model = fj.MoeForCausalLM(config, dtype=resolve_dtype(cfg.dtype), rngs=nnx.Rngs(cfg.seed))
    write_output(out, "the model", lambda path: fj.save_pretrained(model, path), folder=True)
    print(f"wrote a random {config.model_type} model (seed {cfg.seed}, {config.num_hidden_layers} layers, "
          f"{config.num_experts} experts, hidden {config.hidden_size}) to {out}")


if __name__ == "__main__":
    main()
