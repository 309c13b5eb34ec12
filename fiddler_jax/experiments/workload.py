"""What a benchmark run feeds the model and how its timed runs are reported, shared by ``bench`` and its peer
baselines: prompts cut from a text file (default: the held-out files of the tiny model's corpus, i.e. this
Python's standard library), repeated if short, or seeded random token ids for a model without a tokenizer; and
the median and spread of every metric over the timed runs."""
from __future__ import annotations

import os
import statistics

import numpy as np

from fiddler_jax.errors import InvalidInputError


def prompt_text(prompts_file: str | None) -> str:
    """The text prompts are cut from: ``prompts_file``, or the tiny model's held-out corpus files."""
    if prompts_file is not None:
        path = os.path.expanduser(prompts_file)
        if not os.path.isfile(path):
            raise InvalidInputError(f"prompts_file {path} does not exist")
        with open(path, encoding="utf-8", errors="replace") as f:
            text = f.read()
        if not text.strip():
            raise InvalidInputError(f"prompts_file {path} is empty; give a text file with prompts")
        return text
    from fiddler_jax.training.corpus import find_corpus

    corpus = find_corpus()
    return "\n".join(corpus.read(rel) for rel in corpus.heldout[:8])


def prompt_ids(tokenizer, text: str, length: int, vocab_size: int, seed: int) -> np.ndarray:
    """[1, length] token ids: the start of ``text`` (repeated when short), or seeded random ids."""
    if tokenizer is None:
        return np.random.default_rng(seed).integers(0, vocab_size, size=(1, length))
    ids = np.asarray(tokenizer(text[: 16 * length + 1024])["input_ids"])
    if ids.size == 0:
        raise InvalidInputError("the prompt text tokenizes to nothing")
    return np.resize(ids, length)[None]


def batch_prompts(tokenizer, text: str, length: int, spread: int, batch: int, vocab_size: int,
                  seed: int) -> list[np.ndarray]:
    """``batch`` prompts of lengths drawn (seeded) from ``length`` ± ``spread``: consecutive pieces of the text's
    tokens (each prompt its own text), or seeded random ids."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(max(1, length - spread), length + spread + 1, size=batch)
    stream = prompt_ids(tokenizer, text, int(lengths.sum()), vocab_size, seed)[0]
    ends = np.cumsum(lengths)
    return [stream[end - n:end] for n, end in zip(lengths, ends)]


def summarize(runs: list[dict]) -> dict:
    """Median and spread (min, max) of every metric over the timed runs."""
    out = {}
    for key in runs[0]:
        values = [r[key] for r in runs]
        out[key] = {"median": statistics.median(values), "min": min(values), "max": max(values), "runs": values}
    return out
