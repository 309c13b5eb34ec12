"""fiddler-jax: fast Mixture-of-Experts inference on a GPU too small for the model (Fiddler, on JAX/XLA).

Public API (stable names):
  load_pretrained(path, dtype="float32"|"bfloat16") -> MoeForCausalLM   an NNX module with the checkpoint's weights
                                                (Mixtral, Qwen3-MoE, OLMoE or Qwen2-MoE: ``ModelConfig.model_type``)
  logits(model, input_ids) -> np.ndarray                           float32 [B, T, vocab]
  generate(model, input_ids, max_new_tokens, do_sample=False, seed=0, *, num_beams=1, length_penalty=1.0,
           early_stopping=False, temperature=1.0, top_p=1.0) -> np.ndarray                [B, T + new]
  save_pretrained(model, path)                                     HF folder that transformers loads
  Engine.from_pretrained(path, gpu_budget=..., planner=..., options=EngineOptions(...))   the hybrid engine

The names are imported lazily (PEP 562), so the pure-Python parts (``fiddler_jax.runtime.planning``,
``placement``, ``latency``) and the kernels import without loading flax or the model code.

Importing the package raises JAX's pinned host memory cap (``XLA_PJRT_GPU_HOST_MEMORY_LIMIT_GB``, 64 GiB by
default) to this machine's RAM unless it is set already: offloaded experts live in pinned memory, and Mixtral at
a 24 GiB GPU budget pins about 70 GB. The cap is read when JAX starts its GPU client, so import fiddler_jax
(or set the variable) before the first JAX computation. An engine built before JAX starts narrows the cap to
what its offloaded experts need (``runtime.host_experts.size_pinned_pool``).
"""
from __future__ import annotations

import os as _os

from fiddler_jax._lazy import lazy_attributes
from fiddler_jax.errors import CheckpointError, FiddlerError, InvalidInputError, ModelConfigError

__version__ = "0.1.0"


DEFAULT_HOST_LIMIT_GB: str | None = None  # what this import set the pinned cap to (an engine may resize it)


def _raise_pinned_host_cap() -> None:
    global DEFAULT_HOST_LIMIT_GB
    try:
        ram = _os.sysconf("SC_PAGE_SIZE") * _os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return
    if "XLA_PJRT_GPU_HOST_MEMORY_LIMIT_GB" not in _os.environ:
        DEFAULT_HOST_LIMIT_GB = str(max(64, ram >> 30))
        _os.environ["XLA_PJRT_GPU_HOST_MEMORY_LIMIT_GB"] = DEFAULT_HOST_LIMIT_GB


_raise_pinned_host_cap()

_LAZY = {
    "ModelConfig": "fiddler_jax.models",
    "MoeForCausalLM": "fiddler_jax.models",
    "Mixtral": "fiddler_jax.models",  # the names of the Mixtral-only releases, for the same classes
    "MixtralConfig": "fiddler_jax.models",
    "load_pretrained": "fiddler_jax.models",
    "load_tokenizer": "fiddler_jax.models",
    "save_pretrained": "fiddler_jax.models",
    "generate": "fiddler_jax.runtime.generate",
    "generate_with_stats": "fiddler_jax.runtime.generate",
    "logits": "fiddler_jax.runtime.generate",
    "Engine": "fiddler_jax.runtime.engine",
    "EngineOptions": "fiddler_jax.runtime.options",
}
_SUBPACKAGES = ("analysis", "assets", "experiments", "kernels", "models", "runtime", "training")
__all__ = ["CheckpointError", "FiddlerError", "InvalidInputError", "ModelConfigError", *_LAZY]


__getattr__, __dir__ = lazy_attributes(__name__, _LAZY, _SUBPACKAGES)
