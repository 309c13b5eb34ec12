"""A batch of prompts of different lengths, in transformers' left-padded layout.

``generate`` takes either an int array [B, T] (optionally with an ``attention_mask`` [B, T] of 1 for a real token
and 0 for padding, transformers' convention) or a list of B token-id sequences of any lengths. Both become one
array [B, T] whose row b holds ``pad[b]`` padding tokens and then its prompt (left padding: every prompt ends in
the last column, so all rows write their next token into the same KV-cache slot), and ``pad`` [B], which the KV
cache carries (:class:`fiddler_jax.models.layers.LayerKV`): row b's token in slot s is at position ``s - pad[b]``
and never attends to its padding. A row's output is then exactly what that prompt alone would give.

Generation returns the same layout, [B, T + n]: the padded prompts, then the new tokens
(:func:`strip_padding` gives each row's prompt and continuation without padding).
"""
from __future__ import annotations

import numpy as np

from fiddler_jax.errors import InvalidInputError


def left_padded(input_ids, attention_mask=None, pad_token_id: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(ids [B, T], pad [B] int32) of a batch given as an array with an optional left-padding mask, or as a list
    of id sequences (padded here with ``pad_token_id``)."""
    if isinstance(input_ids, (list, tuple)) and input_ids and all(np.ndim(row) == 1 for row in input_ids):
        if attention_mask is not None:
            raise InvalidInputError("attention_mask goes with an input_ids array [batch, tokens]; a list of prompts "
                                    "of different lengths needs none (it is padded here)")
        rows = [np.asarray(row) for row in input_ids]
        if any(len(row) == 0 for row in rows):
            raise InvalidInputError(f"prompt {next(i for i, r in enumerate(rows) if len(r) == 0)} of the batch is "
                                    "empty; every prompt needs at least one token")
        if any(not np.issubdtype(row.dtype, np.integer) for row in rows):
            raise InvalidInputError("every prompt of the batch must be a sequence of integer token ids")
        width = max(len(row) for row in rows)
        ids = np.full((len(rows), width), pad_token_id, np.int64)
        for b, row in enumerate(rows):
            ids[b, width - len(row):] = row
        return ids, np.array([width - len(row) for row in rows], np.int32)
    ids = np.asarray(input_ids)
    if ids.ndim == 1:
        ids = ids[None, :]
    if attention_mask is None:
        return ids, np.zeros(ids.shape[0] if ids.ndim == 2 else 0, np.int32)
    mask = np.asarray(attention_mask)
    if mask.ndim == 1:
        mask = mask[None, :]
    if mask.shape != ids.shape:
        raise InvalidInputError(f"attention_mask has shape {list(mask.shape)}, but input_ids has "
                                f"{list(ids.shape)}; they must match")
    if not (np.issubdtype(mask.dtype, np.integer) or mask.dtype == bool) or not np.isin(mask, (0, 1)).all():
        raise InvalidInputError("attention_mask must hold 0 (padding) and 1 (a token) only")
    mask = mask.astype(bool)
    pad = np.argmax(mask, axis=1).astype(np.int32)  # the first token of each row
    empty = ~mask.any(axis=1)
    if empty.any():
        raise InvalidInputError(f"row {int(np.flatnonzero(empty)[0])} of attention_mask has no token; every prompt "
                                "needs at least one")
    right = [b for b in range(mask.shape[0]) if not mask[b, pad[b]:].all()]
    if right:
        raise InvalidInputError(f"row {right[0]} of attention_mask is not left-padded (a 0 after a 1): pad on the "
                                "left (tokenizer.padding_side = 'left'), as transformers' generate needs")
    return ids, pad


def strip_padding(sequences: np.ndarray, pad: np.ndarray) -> list[np.ndarray]:
    """Each row of a left-padded [B, L] output without its padding."""
    return [np.asarray(row[int(p):]) for row, p in zip(sequences, pad)]
