"""Training the bundled tiny Mixtral (``fiddler-jax train-tiny``).

  corpus     the ``*.py`` files of a folder (default: the stdlib), split into train/held-out by a path hash
  tokenizer  byte-level BPE with ``tokenizers``, saved for ``transformers.AutoTokenizer``
  data       token streams (``<s> text </s>`` per file), the prepared-data cache, batch sampling
  train      loss (cross-entropy + load-balancing), AdamW schedule, the jitted step (sparse or dense MoE path)
  evaluate   held-out perplexity vs a unigram baseline, per-layer routing statistics
  report     loss-curve PNG, training_metrics.json, the model card
  loop       the whole run, as the Hydra app calls it
  bench      time both MoE paths on the current device before a long run
"""
from fiddler_jax.training.evaluate import evaluate, routing_stats, unigram_perplexity
from fiddler_jax.training.train import Trainer, forward, loss_fn, make_optimizer

__all__ = ["Trainer", "evaluate", "forward", "loss_fn", "make_optimizer", "routing_stats", "unigram_perplexity"]
