"""Byte-level BPE tokenizer trained with the ``tokenizers`` library, saved so ``transformers.AutoTokenizer``
loads it.

Every one of the 256 byte symbols is in the vocabulary (so any text encodes, nothing is unknown), then merges
are learned up to ``vocab_size``. Special tokens come first: ``<unk>`` = 0, ``<s>`` = 1 (BOS, prepended by the
post-processor as Mistral's tokenizer does), ``</s>`` = 2 (EOS, appended after every training document).
Encoding uses the GPT-2 byte-level pre-tokenizer (no prefix space), decoding the byte-level decoder, so
``decode(encode(text)) == text``.
"""
from __future__ import annotations

import json
import os
from collections.abc import Iterable

from fiddler_jax.errors import InvalidInputError

UNK, BOS, EOS = "<unk>", "<s>", "</s>"
SPECIAL_TOKENS = (UNK, BOS, EOS)
BYTE_ALPHABET = 256
MIN_VOCAB = BYTE_ALPHABET + len(SPECIAL_TOKENS)


def check_vocab_size(vocab_size: int, name: str = "vocab_size") -> None:
    if not isinstance(vocab_size, int) or vocab_size < MIN_VOCAB:
        raise InvalidInputError(
            f"{name}={vocab_size!r} is smaller than the byte alphabet: a byte-level BPE needs all "
            f"{BYTE_ALPHABET} byte symbols plus {len(SPECIAL_TOKENS)} special tokens, so at least {MIN_VOCAB}")


def train_tokenizer(texts: Iterable[str], vocab_size: int):
    """Train a byte-level BPE on ``texts``; returns a ``transformers.PreTrainedTokenizerFast``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    check_vocab_size(vocab_size)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    bos = tok.token_to_id(BOS)
    tok.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B",
                                                       special_tokens=[(BOS, bos)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS, unk_token=UNK,
                                   model_max_length=2048, clean_up_tokenization_spaces=False)


def save_tokenizer(tokenizer, path: str | os.PathLike) -> None:
    """tokenizer.json + tokenizer_config.json (+ whatever else this transformers version writes). The class is
    recorded as ``PreTrainedTokenizerFast``, which transformers 4 and 5 both load (5 alone knows its default,
    ``TokenizersBackend``)."""
    path = os.fspath(path)
    tokenizer.save_pretrained(path)
    config_file = os.path.join(path, "tokenizer_config.json")
    with open(config_file) as f:
        config = json.load(f)
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    for key in ("is_local", "local_files_only"):  # load-time options, not properties of the tokenizer
        config.pop(key, None)
    with open(config_file, "w") as f:
        json.dump(config, f, indent=2)


def encode_document(tokenizer, text: str) -> list[int]:
    """``<s>`` text ``</s>``: how every training document enters the token stream."""
    return tokenizer(text)["input_ids"] + [tokenizer.eos_token_id]
