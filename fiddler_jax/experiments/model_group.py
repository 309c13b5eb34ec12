"""Which model a config's ``model`` group names, without loading a weight: a random model's ``ModelConfig`` (its
geometry), or its checkpoint folder -- ``model.path``, or the folder of a bundled model (``model=tiny``,
``model=tiny_qwen3_moe``) -- and that folder's ``ModelConfig``. It imports none of the commands' modules, so the
config resolvers (:mod:`.cluster`) use it as the engine builder (:mod:`.build`) does."""
from __future__ import annotations

import os

from omegaconf import OmegaConf

from fiddler_jax.errors import InvalidInputError
from fiddler_jax.experiments import CONF_DIR


def random_model_config(geometry=None, name: str = "mixtral_8x7b_random"):
    """The ``ModelConfig`` of a random model's geometry (default: ``conf/model/mixtral_8x7b_random.yaml``)."""
    from fiddler_jax.models.config import ModelConfig

    if geometry is None:
        geometry = OmegaConf.load(os.path.join(CONF_DIR, "model", "mixtral_8x7b_random.yaml")).geometry
    return ModelConfig.from_hf_dict({"model_type": "mixtral", **OmegaConf.to_container(geometry)},
                                      source=f"model={name}")


def checkpoint_path(model) -> str:
    """The checkpoint folder of the ``model`` group: ``model.path``, or the bundled model of ``model=tiny`` /
    ``model=tiny_qwen3_moe``."""
    from fiddler_jax.assets import BUNDLED, bundled_model_path
    from fiddler_jax.errors import CheckpointError

    if model.random:
        raise InvalidInputError(f"model={model.name} has random weights made in memory and no checkpoint folder; "
                                "this needs a checkpoint: pass model.path=<HF Mixtral folder>")
    if model.path:
        return os.path.expanduser(str(model.path))
    if model.name not in BUNDLED:
        raise InvalidInputError(f"model={model.name} needs its checkpoint folder: add model.path=<HF MoE folder> "
                                "(or use model=mixtral_8x7b_random on a machine without it)")
    folder = bundled_model_path(model.name)
    if folder is None and model.name == "tiny":
        raise CheckpointError("no model.path given and this installation ships no bundled model; pass "
                              "model.path=<HF Mixtral folder> (or create one with `fiddler-jax init-random`)")
    if folder is None:
        raise InvalidInputError(f"model={model.name}: this installation does not ship the bundled "
                                f"{BUNDLED[model.name].name}; pass model.path=<its HF folder>")
    return str(folder)


def model_config(model):
    """The ``ModelConfig`` of the ``model`` group: its random geometry, or its checkpoint folder's config.json."""
    from fiddler_jax.errors import InvalidInputError
    from fiddler_jax.models.config import ModelConfig

    if not model.random:
        return ModelConfig.from_pretrained(checkpoint_path(model))
    if not model.geometry:
        raise InvalidInputError("model.random needs model.geometry (config.json keys of the random model)")
    return random_model_config(model.geometry, model.name)
