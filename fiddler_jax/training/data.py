"""Prepared data: the trained tokenizer plus the corpus as two flat token streams (train, held-out), each
document ``<s> text </s>``, stored as uint16 so a prepared folder can be built once and reused (or carried to
another machine whose standard library differs).

A prepared folder holds ``tokenizer.json`` / ``tokenizer_config.json``, ``train.npy``, ``heldout.npy`` and
``manifest.json`` (corpus root, Python version, file lists, corpus sha256, vocabulary size, held-out fraction).
"""
from __future__ import annotations

import json
import os
import platform
import time
from dataclasses import dataclass

import numpy as np

from fiddler_jax.errors import InvalidInputError
from fiddler_jax.training import corpus as corpus_lib
from fiddler_jax.training import tokenizer as tok_lib

MANIFEST = "manifest.json"


@dataclass
class Prepared:
    tokenizer: object  # transformers.PreTrainedTokenizerFast
    train: np.ndarray  # uint16 [N_train]
    heldout: np.ndarray  # uint16 [N_heldout]
    manifest: dict


def encode_documents(tokenizer, texts: list[str]) -> np.ndarray:
    """Concatenate ``<s> text </s>`` of every text into one uint16 stream (batch-encoded by the Rust backend)."""
    backend = tokenizer.backend_tokenizer
    eos = tokenizer.eos_token_id
    parts = [np.asarray(enc.ids + [eos], np.uint16) for enc in backend.encode_batch(texts)]
    return np.concatenate(parts) if parts else np.zeros(0, np.uint16)


def prepare(corpus_dir: str | None, vocab_size: int, heldout_fraction: float, include_tests: bool,
            log=print) -> Prepared:
    """Find the corpus, train the tokenizer on the training files, encode both splits."""
    tok_lib.check_vocab_size(vocab_size, "train.vocab_size")
    if vocab_size > np.iinfo(np.uint16).max + 1:
        raise InvalidInputError(f"train.vocab_size={vocab_size} is too large for this tiny-model recipe "
                                "(token streams are stored as uint16: at most 65536)")
    corpus = corpus_lib.find_corpus(corpus_dir, heldout_fraction=heldout_fraction, include_tests=include_tests)
    tic = time.perf_counter()
    train_texts = [corpus.read(r) for r in corpus.train]
    heldout_texts = [corpus.read(r) for r in corpus.heldout]
    log(f"corpus: {corpus.root}: {len(corpus.train)} training files ({sum(map(len, train_texts)) / 1e6:.1f} M "
        f"chars), {len(corpus.heldout)} held-out files")
    tokenizer = tok_lib.train_tokenizer(train_texts, vocab_size)
    train = encode_documents(tokenizer, train_texts)
    heldout = encode_documents(tokenizer, heldout_texts)
    log(f"tokenizer: byte-level BPE, {len(tokenizer)} tokens; {train.size / 1e6:.2f} M training tokens, "
        f"{heldout.size / 1e3:.0f} k held-out tokens ({time.perf_counter() - tic:.0f} s)")
    manifest = {
        "corpus_root": corpus.root,
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
        "corpus_sha256": corpus_lib.fingerprint(corpus),
        "include_tests": include_tests,
        "heldout_fraction": heldout_fraction,
        "vocab_size": len(tokenizer),
        "train_files": list(corpus.train),
        "heldout_files": list(corpus.heldout),
        "train_tokens": int(train.size),
        "heldout_tokens": int(heldout.size),
        "train_chars": sum(map(len, train_texts)),
    }
    return Prepared(tokenizer, train, heldout, manifest)


def save_prepared(p: Prepared, path: str) -> None:
    os.makedirs(path, exist_ok=True)
    tok_lib.save_tokenizer(p.tokenizer, path)
    np.save(os.path.join(path, "train.npy"), p.train)
    np.save(os.path.join(path, "heldout.npy"), p.heldout)
    with open(os.path.join(path, MANIFEST), "w") as f:
        json.dump(p.manifest, f, indent=1)


def load_prepared(path: str) -> Prepared:
    from transformers import AutoTokenizer

    with open(os.path.join(path, MANIFEST)) as f:
        manifest = json.load(f)
    tokenizer = AutoTokenizer.from_pretrained(path)
    train = np.load(os.path.join(path, "train.npy"))
    heldout = np.load(os.path.join(path, "heldout.npy"))
    return Prepared(tokenizer, train, heldout, manifest)


def prepare_or_load(prepared_dir: str | None, corpus_dir: str | None, vocab_size: int, heldout_fraction: float,
                    include_tests: bool, log=print) -> Prepared:
    """With ``prepared_dir`` holding a manifest: load it (its settings must match); otherwise prepare, and save
    to ``prepared_dir`` when one is given."""
    if prepared_dir and os.path.isfile(os.path.join(prepared_dir, MANIFEST)):
        p = load_prepared(prepared_dir)
        want = {"vocab_size": vocab_size, "heldout_fraction": heldout_fraction, "include_tests": include_tests}
        got = {k: p.manifest.get(k) for k in want}
        if got != want:
            raise InvalidInputError(f"prepared data in {prepared_dir} was made with {got}, but this run asks for "
                                    f"{want}; delete that folder or point data.prepared elsewhere")
        log(f"prepared data: {prepared_dir} (corpus {p.manifest['corpus_root']}, Python {p.manifest['python']}, "
            f"{p.train.size / 1e6:.2f} M training tokens, {p.heldout.size / 1e3:.0f} k held-out tokens)")
        return p
    p = prepare(corpus_dir, vocab_size, heldout_fraction, include_tests, log=log)
    if prepared_dir:
        save_prepared(p, prepared_dir)
    return p


def sample_batch(stream: np.ndarray, rng: np.random.Generator, batch_size: int, seq_len: int) -> np.ndarray:
    """``batch_size`` random windows of ``seq_len + 1`` tokens (inputs and shifted targets), int32."""
    if stream.size < seq_len + 2:
        raise InvalidInputError(f"the token stream has {stream.size} tokens, fewer than one training window of "
                                f"{seq_len + 1}; use a larger corpus or a smaller train.seq_len")
    starts = rng.integers(0, stream.size - seq_len - 1, size=batch_size)
    return np.stack([stream[s:s + seq_len + 1] for s in starts]).astype(np.int32)


def eval_windows(stream: np.ndarray, seq_len: int, max_tokens: int) -> np.ndarray:
    """Consecutive non-overlapping windows of ``seq_len + 1`` tokens (sharing one boundary token) covering up to
    ``max_tokens`` target tokens from the start of ``stream``: [n, seq_len + 1] int32."""
    n = min((stream.size - 1) // seq_len, max(1, max_tokens // seq_len))
    if n < 1:
        raise InvalidInputError(f"the held-out stream has {stream.size} tokens, fewer than one window of "
                                f"{seq_len + 1}; use a larger corpus, a larger heldout_fraction or a smaller seq_len")
    idx = np.arange(n)[:, None] * seq_len + np.arange(seq_len + 1)[None, :]
    return stream[idx].astype(np.int32)
