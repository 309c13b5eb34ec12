"""Flax NNX Mixtral: config, layers, MoE functions, checkpoint I/O.

Names are imported lazily (PEP 562): ``fiddler_jax.models.config`` stays importable without JAX."""
from __future__ import annotations

from fiddler_jax._lazy import lazy_attributes

_LAZY = {
    "Checkpoint": "fiddler_jax.models.checkpoint",
    "load_pretrained": "fiddler_jax.models.checkpoint",
    "load_tokenizer": "fiddler_jax.models.checkpoint",
    "save_pretrained": "fiddler_jax.models.checkpoint",
    "MixtralConfig": "fiddler_jax.models.config",
    "Mixtral": "fiddler_jax.models.mixtral",
}
__all__ = list(_LAZY)


__getattr__, __dir__ = lazy_attributes(__name__, _LAZY)
