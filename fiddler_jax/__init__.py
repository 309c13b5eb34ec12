"""fiddler-jax: fast Mixture-of-Experts inference on a GPU too small for the model (Fiddler, on JAX/XLA).

Public API (stable names):
  load_pretrained(path, dtype="float32"|"bfloat16") -> Mixtral   an NNX module with the checkpoint's weights
  logits(model, input_ids) -> np.ndarray                           float32 [B, T, vocab]
  generate(model, input_ids, max_new_tokens, do_sample=False, seed=0, *, num_beams=1, length_penalty=1.0,
           early_stopping=False, temperature=1.0, top_p=1.0) -> np.ndarray                [B, T + new]
  save_pretrained(model, path)                                     HF folder that transformers loads
  Engine.from_pretrained(path, gpu_budget=..., planner=...)        the hybrid CPU-GPU engine (in progress)

The names are imported lazily (PEP 562), so the pure-Python parts (``fiddler_jax.runtime.planners``,
``placement``, ``latency``) and the kernels import without loading flax or the model code.
"""
from __future__ import annotations

from fiddler_jax._lazy import lazy_attributes
from fiddler_jax.errors import CheckpointError, FiddlerError, InvalidInputError, ModelConfigError

__version__ = "0.1.0"

_LAZY = {
    "Mixtral": "fiddler_jax.models",
    "MixtralConfig": "fiddler_jax.models",
    "load_pretrained": "fiddler_jax.models",
    "load_tokenizer": "fiddler_jax.models",
    "save_pretrained": "fiddler_jax.models",
    "generate": "fiddler_jax.runtime.generate",
    "generate_with_stats": "fiddler_jax.runtime.generate",
    "logits": "fiddler_jax.runtime.generate",
    "Engine": "fiddler_jax.runtime.engine",
}
_SUBPACKAGES = ("assets", "experiments", "kernels", "models", "runtime", "training")
__all__ = ["CheckpointError", "FiddlerError", "InvalidInputError", "ModelConfigError", *_LAZY]


__getattr__, __dir__ = lazy_attributes(__name__, _LAZY, _SUBPACKAGES)
