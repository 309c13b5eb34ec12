"""fiddler-jax: fast Mixture-of-Experts inference on a GPU too small for the model (Fiddler, on JAX/XLA).

Public API (stable names):
  load_pretrained(path, dtype="float32"|"bfloat16") -> Mixtral   an NNX module with the checkpoint's weights
  logits(model, input_ids) -> np.ndarray                           float32 [B, T, vocab]
  generate(model, input_ids, max_new_tokens, do_sample=False, seed=0) -> np.ndarray   [B, T + new]
  save_pretrained(model, path)                                     HF folder that transformers loads
"""
from fiddler_jax.errors import CheckpointError, FiddlerError, InvalidInputError, ModelConfigError
from fiddler_jax.models import Mixtral, MixtralConfig, load_pretrained, load_tokenizer, save_pretrained
from fiddler_jax.runtime.generate import generate, generate_with_stats, logits

__version__ = "0.1.0"
__all__ = [
    "CheckpointError", "FiddlerError", "InvalidInputError", "Mixtral", "MixtralConfig", "ModelConfigError",
    "generate", "generate_with_stats", "load_pretrained", "load_tokenizer", "logits", "save_pretrained",
]
