"""Whole-model execution of the NNX MoE model: full-sequence logits and autoregressive generation.

The model is split once per call (``nnx.split``) and its forward pass is a plain ``jax.jit`` over
(graphdef, state), so repeated calls reuse compiled code. Generation runs one prefill over the prompt into a KV
cache of static length (rounded up to a multiple of ``CACHE_BUCKET`` so nearby lengths share compilations), then
one jitted step per new token; it stops when every row has produced an end-of-sequence token.
"""
from __future__ import annotations

import functools
import time
from dataclasses import dataclass, field

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from fiddler_jax.errors import InvalidInputError
from fiddler_jax.models.causal_lm import MoeForCausalLM
from fiddler_jax.runtime import beam_search, sampling
from fiddler_jax.runtime.prompt_batch import left_padded

CACHE_BUCKET = 64


def check_token_ids(model: MoeForCausalLM, input_ids, max_new_tokens: int = 0) -> np.ndarray:
    """Validate [B, T] token ids against the model (integer, in the vocabulary, within the context); → int32."""
    if not isinstance(model, MoeForCausalLM):
        raise InvalidInputError(f"expected a fiddler_jax model (from load_pretrained), got "
                                f"{type(model).__name__}")
    ids = np.asarray(input_ids)
    if ids.ndim == 1:
        ids = ids[None, :]
    if ids.ndim != 2 or ids.shape[1] == 0 or ids.shape[0] == 0:
        raise InvalidInputError(f"input_ids must be a non-empty int array [batch, tokens], got shape "
                                f"{list(np.shape(input_ids))}")
    if not np.issubdtype(ids.dtype, np.integer):
        raise InvalidInputError(f"input_ids must hold integers, got dtype {ids.dtype}")
    vocab = model.config.vocab_size
    bad = (ids < 0) | (ids >= vocab)
    if bad.any():
        raise InvalidInputError(f"token id {int(ids[bad][0])} is outside the vocabulary [0, {vocab}); "
                                "check that the ids come from this model's tokenizer")
    if not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 0:
        raise InvalidInputError(f"max_new_tokens must be a non-negative integer, got {max_new_tokens!r}")
    limit = model.config.max_position_embeddings
    if ids.shape[1] + max_new_tokens > limit:
        raise InvalidInputError(f"prompt ({ids.shape[1]} tokens) plus max_new_tokens ({max_new_tokens}) is "
                                f"{ids.shape[1] + max_new_tokens}, longer than max_position_embeddings ({limit}); "
                                "shorten the prompt or ask for fewer tokens")
    return ids.astype(np.int32)


def prompt_batch(model: MoeForCausalLM, input_ids, attention_mask=None, max_new_tokens=0
                 ) -> tuple[np.ndarray, np.ndarray, int, np.ndarray | None]:
    """(ids [B, T] int32, pad [B], the most new tokens of a row, each row's limit or None) of a batch of prompts:
    an int array, with an optional left-padding ``attention_mask``, or a list of id sequences of different lengths
    (:mod:`.prompt_batch`), validated by :func:`check_token_ids`; ``max_new_tokens``: an int, or one per row
    (:func:`row_limits`)."""
    if not isinstance(model, MoeForCausalLM):
        raise InvalidInputError(f"expected a fiddler_jax model (from load_pretrained), got {type(model).__name__}")
    ids, pad = left_padded(input_ids, attention_mask, fill_token(model.config))
    most, limits = row_limits(max_new_tokens, ids.shape[0] if ids.ndim == 2 else 1)
    return check_token_ids(model, ids, most), pad, most, limits


def fill_token(cfg) -> int:
    """The token that pads a batch: left of short prompts, and right of a row that reached its own
    ``max_new_tokens`` before the others: config.json's pad token, else its (first) EOS, else 0."""
    return int(cfg.pad_token_id if cfg.pad_token_id is not None else (cfg.eos_token_ids or (0,))[0])


def row_limits(max_new_tokens, rows: int) -> tuple[int, np.ndarray | None]:
    """(the most new tokens of any row, each row's limit or None when all rows share one) of ``max_new_tokens``:
    a non-negative int, or a sequence of ``rows`` of them (one per prompt of the batch)."""
    if isinstance(max_new_tokens, (int, np.integer)) and not isinstance(max_new_tokens, bool):
        if max_new_tokens < 0:
            raise InvalidInputError(f"max_new_tokens must be a non-negative integer, got {max_new_tokens!r}")
        return int(max_new_tokens), None
    if isinstance(max_new_tokens, (list, tuple, np.ndarray)):
        limits = list(np.asarray(max_new_tokens, dtype=object).ravel()) if np.ndim(max_new_tokens) else []
        if (np.ndim(max_new_tokens) != 1 or len(limits) != rows
                or any(isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0 for n in limits)):
            raise InvalidInputError(f"max_new_tokens must be a non-negative integer or a list of {rows} of them "
                                    f"(one per prompt), got {max_new_tokens!r}")
        limits = np.asarray(limits, np.int64)
        return int(limits.max()), (None if (limits == limits[0]).all() else limits)
    raise InvalidInputError(f"max_new_tokens must be a non-negative integer or a list of one per prompt, got "
                            f"{max_new_tokens!r}")


def eos_token_ids(config, eos_token_id=None) -> tuple[int, ...]:
    """The end-of-sequence ids a generation stops at: ``eos_token_id`` (an int or a list of ints), or config.json's
    when None; an empty list never stops early. An id outside the vocabulary can never be generated, so it is
    refused rather than ignored."""
    if eos_token_id is None:
        return config.eos_token_ids
    ids = np.atleast_1d(np.asarray(eos_token_id, dtype=object)).ravel()
    bad = [i for i in ids.tolist() if isinstance(i, bool) or not isinstance(i, (int, np.integer))]
    if bad:
        raise InvalidInputError(f"eos_token_id must be a token id or a list of token ids, got {eos_token_id!r}")
    outside = [int(i) for i in ids.tolist() if not 0 <= i < config.vocab_size]
    if outside:
        raise InvalidInputError(f"eos_token_id {outside[0]} is outside the vocabulary [0, {config.vocab_size}), so "
                                "generation could never stop on it; pass an id of this model's tokenizer (or None "
                                "for config.json's)")
    return tuple(int(i) for i in ids.tolist())


@functools.partial(jax.jit, static_argnums=0, donate_argnums=2)
def _forward(graphdef, state, cache, tokens, start):
    model = nnx.merge(graphdef, state)
    return model(tokens, cache, start)


@functools.partial(jax.jit, static_argnums=(2, 3))
def pick_next(last_logits, key, temperature: float, top_p: float):
    """Next token of each row from float32 logits [B, V]: greedy when temperature == 0, else sampled."""
    if temperature == 0.0:
        return sampling.greedy(last_logits)
    return sampling.sample(last_logits, key, temperature, top_p)


@functools.partial(jax.jit, static_argnums=0, donate_argnums=2)
def _forward_last(graphdef, state, cache, tokens, start):
    logits, cache = nnx.merge(graphdef, state)(tokens, cache, start)
    return logits[:, -1], cache


def logits(model: MoeForCausalLM, input_ids) -> np.ndarray:
    """Float32 logits [B, T, vocab] of a full forward pass over int token ids [B, T]."""
    ids = check_token_ids(model, input_ids)
    graphdef, state = nnx.split(model)
    cache = model.init_cache(ids.shape[0], ids.shape[1])
    out, _ = _forward(graphdef, state, cache, jnp.asarray(ids), jnp.int32(0))
    return np.asarray(out, dtype=np.float32)


@dataclass
class GenerationStats:
    """Timings of one :func:`generate_with_stats` call, in seconds. ``prefill_s`` is the time to the first new
    token and includes compilation of the prefill; the first one-token step (which compiles on a new cache
    length) is timed apart, so ``decode_tokens_per_s`` is the steady-state rate over the remaining steps."""

    prompt_tokens: int = 0
    new_tokens: int = 0  # decode steps run (columns of new tokens in the output)
    row_new_tokens: list = field(default_factory=list)  # each row's own new tokens (EOS included)
    prefill_s: float = 0.0
    first_step_s: float = 0.0
    decode_s: float = 0.0

    @property
    def decode_tokens_per_s(self) -> float:
        steps = max(self.new_tokens - 2, 0)
        return steps / self.decode_s if steps and self.decode_s > 0 else float("nan")


def generate(model: MoeForCausalLM, input_ids, max_new_tokens: int, do_sample: bool = False, seed: int = 0, *,
             temperature: float = 1.0, top_p: float = 1.0, eos_token_id=None, num_beams: int = 1,
             length_penalty: float = 1.0, early_stopping=False, attention_mask=None) -> np.ndarray:
    """Generated token ids [B, T + n]; see :func:`generate_with_stats`. ``num_beams`` > 1 runs beam search
    (``fiddler_jax.runtime.beam_search``: transformers' semantics for ``length_penalty`` and ``early_stopping``
    True / False / "never"; the prompt plus ``max_new_tokens`` must fit in max_position_embeddings)."""
    beam_search.check_beam_args(num_beams, length_penalty, early_stopping, do_sample)
    if num_beams > 1:
        ids, pad, max_new_tokens, limits = prompt_batch(model, input_ids, attention_mask, max_new_tokens)
        check_beam_limits(limits)
        eos = eos_token_ids(model.config, eos_token_id)
        graphdef, state = nnx.split(model)
        return beam_search.beam_search(
            lambda tokens, cache, start: _forward_last(graphdef, state, cache, tokens, jnp.int32(start)),
            lambda rows, length: model.init_cache(rows, cache_length(length, 0, model.config)),
            ids, max_new_tokens, num_beams, eos_token_ids=eos, length_penalty=length_penalty,
            early_stopping=early_stopping, pad_token_id=model.config.pad_token_id, prompt_pad=pad)
    ids, _ = generate_with_stats(model, input_ids, max_new_tokens, do_sample, seed, temperature=temperature,
                                 top_p=top_p, eos_token_id=eos_token_id, attention_mask=attention_mask)
    return ids


def generate_with_stats(model: MoeForCausalLM, input_ids, max_new_tokens: int, do_sample: bool = False, seed: int = 0,
                        *, temperature: float = 1.0, top_p: float = 1.0, eos_token_id=None, attention_mask=None,
                        ) -> tuple[np.ndarray, GenerationStats]:
    """Append up to ``max_new_tokens`` tokens to each row of ``input_ids`` [B, T]; returns [B, T + n].

    A batch of prompts of different lengths is either a list of id sequences or an array with a left-padding
    ``attention_mask`` (transformers' convention); the output keeps transformers' left-padded layout
    (:mod:`.prompt_batch`), and each row equals what its prompt alone would give. Greedy unless ``do_sample``;
    sampling uses ``temperature`` and nucleus ``top_p`` with a ``seed``ed key, so equal seeds give equal outputs.
    Generation stops early once every row has emitted an end-of-sequence token (``eos_token_id``, default from
    config.json); rows that finish first are padded with their EOS token. ``max_new_tokens``: an int, or one per
    row (a row that reaches its own is padded after it with the batch's fill token, :func:`fill_token`); the stats'
    ``row_new_tokens`` count each row's tokens (up to and including its EOS)."""
    ids, pad, most, limits = prompt_batch(model, input_ids, attention_mask, max_new_tokens)
    check_sampling(do_sample, temperature, top_p)
    eos = eos_token_ids(model.config, eos_token_id)
    if most == 0:
        return ids, GenerationStats(prompt_tokens=ids.shape[1], row_new_tokens=[0] * len(ids))
    graphdef, state = nnx.split(model)
    cache = model.init_cache(ids.shape[0], cache_length(ids.shape[1], most, model.config), pad)

    def forward_last(tokens, cache, start):
        return _forward_last(graphdef, state, cache, tokens, jnp.int32(start))

    return decode_loop(forward_last, cache, ids, most, eos, do_sample=do_sample, seed=seed,
                       temperature=temperature, top_p=top_p, limits=limits, fill=fill_token(model.config))


def check_beam_limits(limits: np.ndarray | None) -> None:
    """Refuse per-row limits (:func:`prompt_batch`'s) for beam search: they are for greedy and sampled
    generation."""
    if limits is not None:
        raise InvalidInputError("beam search takes one max_new_tokens for every prompt; per-row limits are for "
                                "greedy and sampled generation (num_beams=1)")


def cache_length(prompt_len: int, max_new_tokens: int, cfg) -> int:
    """KV-cache slots for a generation: prompt + new tokens rounded up to ``CACHE_BUCKET`` (within the context)."""
    return min(-(-(prompt_len + max_new_tokens) // CACHE_BUCKET) * CACHE_BUCKET, cfg.max_position_embeddings)


def check_sampling(do_sample: bool, temperature: float, top_p: float) -> None:
    if do_sample and not temperature > 0:
        raise InvalidInputError(f"temperature must be > 0 when sampling, got {temperature}")
    if not 0 < top_p <= 1:
        raise InvalidInputError(f"top_p must be in (0, 1], got {top_p}")


READ_BEHIND = 4  # decode steps the host reads the chosen tokens behind the device


@functools.partial(jax.jit, static_argnums=(2, 3, 8))
def next_tokens(last_logits, key, temperature: float, top_p: float, done, previous, eos, exhausted, fill: int):
    """One decode step's tokens [B] int32 and the rows done after it: :func:`pick_next`, except that a row
    already done repeats its previous token (its EOS), and a row past its own limit (``exhausted`` [B] bool, or
    None when rows share one limit) gets ``fill``; ``eos`` int32 [n] (n may be 0)."""
    nxt = jnp.where(done, previous, pick_next(last_logits, key, temperature, top_p).astype(jnp.int32))
    if exhausted is not None:
        nxt = jnp.where(exhausted, jnp.int32(fill), nxt)
        return nxt, done | (jnp.isin(nxt, eos) & ~exhausted)
    return nxt, done | jnp.isin(nxt, eos)


def decode_loop(forward_last, cache, ids: np.ndarray, max_new_tokens: int, eos: tuple[int, ...], *,
                do_sample: bool, seed: int, temperature: float, top_p: float, limits: np.ndarray | None = None,
                fill: int = 0) -> tuple[np.ndarray, GenerationStats]:
    """The autoregressive loop shared by the plain model and the hybrid engine.

    ``forward_last(tokens [B, t], cache, start) -> (logits of the last position [B, V], cache)`` runs the model
    over new tokens at absolute position ``start``; the first call is the prefill of the whole prompt. The chosen
    tokens stay on the device and feed the next step, the rows' EOS state with them (:func:`next_tokens`); the
    host reads each step's tokens through an asynchronous copy ``READ_BEHIND`` steps later, so the device never
    waits for the host between tokens. Generation stops once every row is done (its EOS, or its own limit in
    ``limits`` [B], when rows have different ones; ``max_new_tokens`` is the largest); the steps dispatched past
    that point are dropped, so the output is the one a loop that checked every step would give. A key is split
    per step only when sampling. The first two steps are read at once (the time to the first token, and the first
    decode step, which compiles, are timed apart)."""
    b, t = ids.shape
    stats = GenerationStats(prompt_tokens=t)
    temp = float(temperature) if do_sample else 0.0
    top_p = float(top_p) if do_sample else 1.0
    key = jax.random.key(seed) if do_sample else None
    eos_ids = jnp.asarray(np.asarray(eos, np.int32).reshape(-1))
    limit = np.full(b, max_new_tokens, np.int64) if limits is None else np.asarray(limits, np.int64)
    picked, read = [], []  # every step's tokens on the device; the steps the host has read, [B] each
    finished = np.zeros(b, bool)  # rows done in the steps read (their EOS, or their limit)
    row_tokens = np.zeros(b, np.int64)
    done_rows = jnp.zeros(b, bool)
    tic = time.perf_counter()
    tokens, start = jnp.asarray(ids), 0

    def read_next() -> bool:
        """Read the oldest unread step; True when every row is done after it."""
        step = len(read)
        tokens_now = np.asarray(picked[step])
        read.append(tokens_now)
        live = ~finished & (step < limit)
        row_tokens[live] += 1
        finished[live & np.isin(tokens_now, eos)] = True
        finished[step + 1 >= limit] = True
        return bool(finished.all())

    done = False
    for step in range(max_new_tokens):
        sub = None
        if do_sample:
            key, sub = jax.random.split(key)
        last, cache = forward_last(tokens, cache, start)
        exhausted = None if limits is None else jnp.asarray(step >= limit)
        nxt, done_rows = next_tokens(last, sub, temp, top_p, done_rows, tokens[:, -1].astype(jnp.int32), eos_ids,
                                     exhausted, int(fill))
        nxt.copy_to_host_async()
        picked.append(nxt)
        start += tokens.shape[1]
        tokens = nxt[:, None]
        if step < 2:
            done = read_next()
            now = time.perf_counter()
            if step == 0:
                stats.prefill_s = now - tic
            else:
                stats.first_step_s = now - tic
            tic = now
        elif step - len(read) >= READ_BEHIND:
            done = read_next()
        if done:
            break
    while not done and len(read) < len(picked):
        done = read_next()
    picked[-1].block_until_ready()  # the steps dispatched past the end have run (their trace records, their errors)
    stats.new_tokens = len(read)
    stats.row_new_tokens = row_tokens.tolist()
    stats.decode_s = time.perf_counter() - tic
    return np.concatenate([ids] + [r[:, None] for r in read], axis=1), stats
