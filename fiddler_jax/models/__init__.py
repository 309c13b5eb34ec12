"""The Flax NNX MoE families (Mixtral, Qwen3-MoE, OLMoE, Qwen2-MoE): config, layers, MoE functions, checkpoint I/O.

Names are imported lazily (PEP 562): ``fiddler_jax.models.config`` stays importable without JAX."""
from __future__ import annotations

from fiddler_jax._lazy import lazy_attributes

_LAZY = {
    "Checkpoint": "fiddler_jax.models.checkpoint",
    "load_pretrained": "fiddler_jax.models.checkpoint",
    "load_tokenizer": "fiddler_jax.models.checkpoint",
    "save_pretrained": "fiddler_jax.models.checkpoint",
    "ModelConfig": "fiddler_jax.models.config",
    "MoeForCausalLM": "fiddler_jax.models.causal_lm",
    "MixtralConfig": "fiddler_jax.models.config",  # the Mixtral-only releases' names for the same classes
    "Mixtral": "fiddler_jax.models.causal_lm",
}
__all__ = list(_LAZY)


__getattr__, __dir__ = lazy_attributes(__name__, _LAZY)
