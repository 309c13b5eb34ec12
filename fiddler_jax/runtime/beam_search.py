"""Beam search over any forward callable, with transformers' semantics for ``do_sample=False``.

Written against ``forward(tokens [rows, t] int32, cache, start) -> (logits of the last position [rows, V] float32,
cache)`` and ``init_cache(rows, length)`` (a tuple over layers of ``LayerKV(k, v)``, arrays [rows, S, ...]), so
the plain model and the hybrid engine share it. Each prompt row is searched on its own (rows of a batch one
after another); for one row with K = ``num_beams``, N = ``max_new_tokens``, EOS set E and length penalty α:

  1. Prefill the prompt once with one cache row, then broadcast the cache to K rows. Running beams start as K
     copies of the prompt with scores (0, -1e9, ..., -1e9), so the first step only expands beam 0.
  2. Step n = 1..N: candidate score = running score + log_softmax(logits) (float32); keep the top
     C = max(2, 1 + |E|)·K candidates over all K·V (beam, token) pairs, best first. A candidate *ends* when its
     token is in E or n = N (max_length = prompt + N reached).
  3. Ended candidates among the first K of the C become finished hypotheses with score
     ``sum_logprobs / n ** α`` (n counts the generated tokens, the EOS included); the finished set keeps the best
     K (older ones win ties).
  4. The next running beams are the first K candidates that did not end; the KV cache rows are gathered by their
     parent beams (one jitted gather over every layer, static shapes) and their tokens are fed at position
     prompt + n - 1.
  5. Stop after step N, or once K hypotheses are finished and either ``early_stopping is True`` or no running beam
     can still beat the worst finished one: best running score / L ** α ≤ worst finished score, with L = N when
     ``early_stopping == "never"`` and α > 0, else L = n (transformers' heuristic for False).
  6. Return prompt + the best finished hypothesis. Rows of a batch whose hypotheses are shorter are padded with
     ``pad_token_id`` (default: the first EOS id) to the longest row.

This is transformers 5.x ``GenerationMixin._beam_search`` with ``num_return_sequences=1``, no logits processors
and ``do_sample=False``. The one intended difference: transformers pads with ``pad_token_id or eos[0]`` (so a
pad id of 0 becomes the EOS id); here ``pad_token_id=0`` pads with 0.
"""
from __future__ import annotations

import functools
import numbers
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from fiddler_jax.errors import InvalidInputError

UNREACHED = np.float32(-1e9)  # initial score of beams 1..K-1, as transformers


def check_beam_args(num_beams, length_penalty, early_stopping, do_sample: bool = False) -> None:
    """Refuse arguments beam search cannot honour, each with one clear message."""
    if isinstance(num_beams, bool) or not isinstance(num_beams, (int, np.integer)) or num_beams < 1:
        raise InvalidInputError(f"num_beams must be an integer ≥ 1, got {num_beams!r}")
    if num_beams > 1 and do_sample:
        raise InvalidInputError("beam search with sampling (num_beams > 1 and do_sample=True) is not supported; "
                                "use num_beams=1 to sample or do_sample=False for beam search")
    if not (isinstance(early_stopping, bool) or early_stopping == "never"):
        raise InvalidInputError(f"early_stopping must be True, False or 'never', got {early_stopping!r}")
    if isinstance(length_penalty, bool) or not isinstance(length_penalty, numbers.Real) \
            or not np.isfinite(length_penalty):
        raise InvalidInputError(f"length_penalty must be a finite number, got {length_penalty!r}")


def check_kv_reserve(kv_bytes_needed: int, kv_bytes_reserved: int, num_beams: int, cache_len: int) -> None:
    """The engine placed a KV-cache reserve for ``max_batch`` × ``max_context``; K beams × their cache must fit."""
    if kv_bytes_needed > kv_bytes_reserved:
        raise InvalidInputError(
            f"num_beams={num_beams} beams × {cache_len} cache slots need {kv_bytes_needed} bytes of KV cache, more "
            f"than the {kv_bytes_reserved} bytes this engine's placement reserved (max_batch × max_context); "
            f"load the engine with Engine.from_pretrained(..., max_batch={num_beams}) (or a larger max_context), "
            "or use fewer beams or a shorter prompt + max_new_tokens")


@functools.partial(jax.jit, static_argnums=1)
def broadcast_cache(cache, rows: int):
    """A one-row cache repeated to ``rows`` rows (every layer's k and v)."""
    return jax.tree.map(lambda a: jnp.repeat(a, rows, axis=0), cache)


@functools.partial(jax.jit, donate_argnums=0)
def reorder_cache(cache, parents):
    """Cache rows gathered by beam index: row i of the result is row ``parents[i]`` of ``cache``."""
    return jax.tree.map(lambda a: jnp.take(a, parents, axis=0), cache)


@functools.partial(jax.jit, static_argnums=2)
def top_candidates(logits, scores, count: int):
    """The ``count`` best (score, flat beam·V + token index) over scores[:, None] + log_softmax(logits)."""
    total = scores[:, None] + jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return jax.lax.top_k(total.reshape(-1), count)


def _keep_best(hyps: list, k: int) -> list:
    """The k best (score, tokens) pairs, best first; stable, so earlier entries win ties."""
    order = sorted(range(len(hyps)), key=lambda i: -hyps[i][0])
    return [hyps[i] for i in order[:k]]


def _can_stop(best_running: np.float32, finished: list, num_beams: int, n: int, max_new_tokens: int,
              length_penalty: float, early_stopping) -> bool:
    if len(finished) < num_beams:
        return False
    if early_stopping is True:
        return True
    length = max_new_tokens if early_stopping == "never" and length_penalty > 0 else n
    return not best_running / np.float32(length ** length_penalty) > finished[-1][0]


def search_row(forward: Callable, init_cache: Callable, prompt: np.ndarray, max_new_tokens: int, num_beams: int,
               eos: Sequence[int], length_penalty: float, early_stopping) -> np.ndarray:
    """The generated tokens of the best hypothesis for one prompt [T] (module docstring, steps 1-5)."""
    t = len(prompt)
    logits, cache = forward(jnp.asarray(prompt[None], jnp.int32), init_cache(1, t + max_new_tokens), 0)
    cache = broadcast_cache(cache, num_beams)
    scores = np.full(num_beams, UNREACHED, np.float32)
    scores[0] = 0.0
    beams = np.zeros((num_beams, 0), np.int32)
    finished: list[tuple[np.float32, np.ndarray]] = []
    count = max(2, 1 + len(eos)) * num_beams
    for n in range(1, max_new_tokens + 1):
        top, flat = jax.device_get(top_candidates(logits, jnp.asarray(scores), count))
        parent, token = np.divmod(flat.astype(np.int64), logits.shape[-1])
        seqs = np.concatenate([beams[parent], token[:, None].astype(np.int32)], axis=1)
        ended = np.isin(token, eos) | (n == max_new_tokens)
        penalty = np.float32(n ** length_penalty)
        finished = _keep_best(finished + [(top[i] / penalty, seqs[i]) for i in range(num_beams) if ended[i]],
                              num_beams)
        if n == max_new_tokens:
            break
        live = np.flatnonzero(~ended)[:num_beams]
        beams, scores = seqs[live], top[live]
        if _can_stop(scores[0], finished, num_beams, n, max_new_tokens, length_penalty, early_stopping):
            break
        cache = reorder_cache(cache, jnp.asarray(parent[live], jnp.int32))
        logits, cache = forward(jnp.asarray(token[live][:, None], jnp.int32), cache, t + n - 1)
    return finished[0][1]


def beam_search(forward: Callable, init_cache: Callable, input_ids, max_new_tokens: int, num_beams: int, *,
                eos_token_ids: Sequence[int], length_penalty: float = 1.0, early_stopping=False,
                pad_token_id: int | None = None, prompt_pad=None) -> np.ndarray:
    """Beam search continuation [B, T + n] of int ids [B, T] (rows searched one after another; module docstring).
    ``prompt_pad`` [B]: each row's left padding (a batch of prompts of different lengths,
    :mod:`fiddler_jax.runtime.prompt_batch`): row b's prompt is ``input_ids[b, prompt_pad[b]:]``.

    ``forward(tokens, cache, start)`` returns the last position's float32 logits [rows, V] and the new cache;
    ``init_cache(rows, length)`` an empty cache for ``length`` positions (callers may round it up). ``n`` is the
    longest best hypothesis over the rows (≤ ``max_new_tokens``); shorter rows are padded with ``pad_token_id``
    (default: the first EOS id). Token ids and the context length are the caller's to validate."""
    check_beam_args(num_beams, length_penalty, early_stopping)
    ids = np.asarray(input_ids, np.int32)
    if ids.ndim != 2 or 0 in ids.shape:
        raise InvalidInputError(f"input_ids must be a non-empty int array [batch, tokens], got shape "
                                f"{list(ids.shape)}")
    if max_new_tokens == 0:
        return ids
    eos = tuple(int(e) for e in eos_token_ids)
    pad = pad_token_id if pad_token_id is not None else (eos[0] if eos else 0)
    starts = np.zeros(len(ids), np.int64) if prompt_pad is None else np.asarray(prompt_pad, np.int64)
    rows = [search_row(forward, init_cache, row[s:], max_new_tokens, num_beams, eos, length_penalty, early_stopping)
            for row, s in zip(ids, starts)]
    out = np.full((len(ids), max(len(r) for r in rows)), pad, np.int32)
    for i, r in enumerate(rows):
        out[i, :len(r)] = r
    return np.concatenate([ids, out], axis=1)
