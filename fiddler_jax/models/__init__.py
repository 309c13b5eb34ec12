"""Flax NNX Mixtral: config, layers, MoE functions, checkpoint I/O."""
from fiddler_jax.models.checkpoint import Checkpoint, load_pretrained, load_tokenizer, save_pretrained
from fiddler_jax.models.config import MixtralConfig
from fiddler_jax.models.mixtral import Mixtral

__all__ = ["Checkpoint", "Mixtral", "MixtralConfig", "load_pretrained", "load_tokenizer", "save_pretrained"]
