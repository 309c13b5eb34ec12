"""Flax NNX Mixtral: config, layers, MoE functions, checkpoint I/O.

Names are imported lazily (PEP 562): ``fiddler_jax.models.config`` stays importable without JAX."""
from __future__ import annotations

import importlib

_LAZY = {
    "Checkpoint": "fiddler_jax.models.checkpoint",
    "load_pretrained": "fiddler_jax.models.checkpoint",
    "load_tokenizer": "fiddler_jax.models.checkpoint",
    "save_pretrained": "fiddler_jax.models.checkpoint",
    "MixtralConfig": "fiddler_jax.models.config",
    "Mixtral": "fiddler_jax.models.mixtral",
}
__all__ = list(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'fiddler_jax.models' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY))
