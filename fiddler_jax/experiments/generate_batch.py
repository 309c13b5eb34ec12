r"""``fiddler-jax generate prompts_file=<file> batch_size=<n>``: every prompt of a file, ``batch_size`` at a time,
one JSON line of output per prompt.

The file is either JSON lines (``.jsonl``: an object per line with ``"prompt"``, a text, or ``"prompt_ids"``, a
list of token ids, and optionally ``"max_new_tokens"``, that prompt's own limit) or plain text, one prompt per
non-empty line (``\n``, ``\t`` and ``\\`` stand for newline, tab and backslash). Consecutive prompts form a
batch of different lengths (:mod:`fiddler_jax.runtime.prompt_batch`: left-padded; each row is what its prompt
alone would give). The output file holds, in the file's order, one object per prompt: ``index``, ``prompt`` (the
text, or null), ``prompt_ids``, ``output_ids`` (the new tokens without padding, up to and including an
end-of-sequence token), ``text`` (their decoding, when the model has a tokenizer) and ``finish`` (``"eos"`` or
``"length"``). It is written to a temporary name and renamed when every
prompt is done, so a file under the final name is complete.
"""
from __future__ import annotations

import json
import os
import time

import numpy as np

from fiddler_jax.errors import InvalidInputError
from fiddler_jax.experiments.common import decode_escapes


def check_prompts_file(path: str) -> None:
    """Refuse a ``prompts_file`` that is not a file (before any model loads)."""
    if not os.path.isfile(path):
        raise InvalidInputError(f"prompts_file {path} does not exist")


def read_prompts(path: str, tokenizer) -> list[tuple[str | None, np.ndarray, int | None]]:
    """(text or None, token ids, its own max_new_tokens or None) of every prompt in ``path`` (module
    docstring)."""
    check_prompts_file(path)
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except UnicodeDecodeError as exc:
        raise InvalidInputError(f"prompts_file {path} is not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    prompts = []
    jsonl = path.endswith(".jsonl")
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{path}, line {number}"
        if jsonl:
            try:
                item = json.loads(line)
            except json.JSONDecodeError as exc:
                raise InvalidInputError(f"{where} is not JSON: {exc.msg}") from None
            if not isinstance(item, dict) or ("prompt" in item) == ("prompt_ids" in item):
                raise InvalidInputError(f'{where}: each line must be an object with "prompt" (text) or '
                                        '"prompt_ids" (token ids), one of the two')
            text = item.get("prompt")
            ids = item.get("prompt_ids")
            limit = item.get("max_new_tokens")
            if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 0):
                raise InvalidInputError(f'{where}: "max_new_tokens" must be a non-negative integer')
            if text is not None and not isinstance(text, str):
                raise InvalidInputError(f'{where}: "prompt" must be a string')
            if ids is not None and (not isinstance(ids, list) or not ids
                                    or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids)):
                raise InvalidInputError(f'{where}: "prompt_ids" must be a non-empty list of integer token ids')
        else:
            text, ids, limit = decode_escapes(line), None, None
        if ids is None:
            if tokenizer is None:
                raise InvalidInputError(f"{where} is text, but the model has no tokenizer files; give "
                                        '"prompt_ids" in a .jsonl file instead')
            ids = tokenizer(text)["input_ids"]
        prompts.append((text, np.asarray(ids, np.int64), limit))
    if not prompts:
        raise InvalidInputError(f"prompts_file {path} holds no prompt")
    return prompts


def output_path(prompts_file: str, out: str | None, run_folder: str) -> str:
    """Where the outputs go: ``out``, or ``<run folder>/<prompts file's name>.outputs.jsonl``."""
    if out:
        return out
    name = os.path.splitext(os.path.basename(prompts_file))[0]
    return os.path.join(run_folder, f"{name}.outputs.jsonl")


def generate_all(generate, prompts, batch_size: int, max_new_tokens: int, eos: tuple[int, ...], tokenizer,
                 path: str, progress: bool = True) -> dict:
    """Run ``generate(list of id arrays, max_new_tokens) -> [B, T + n]`` over ``prompts`` (:func:`read_prompts`)
    in batches of ``batch_size`` and write the outputs to ``path`` (module docstring; nothing is left under either
    name if it fails); a prompt without its own limit gets ``max_new_tokens``, and a batch whose limits differ
    passes one per row. Returns totals (prompts, new tokens, seconds, aggregate tokens/s)."""
    from tqdm.auto import tqdm

    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise InvalidInputError(f"batch_size must be an integer ≥ 1, got {batch_size!r}")
    tmp = f"{path}.partial"
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    new_tokens, tic = 0, time.perf_counter()
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            for first in tqdm(range(0, len(prompts), batch_size), desc="batches", disable=not progress,
                              leave=False):
                batch = prompts[first:first + batch_size]
                limits = [max_new_tokens if limit is None else limit for _, _, limit in batch]
                out = np.asarray(generate([ids for _, ids, _ in batch],
                                          limits[0] if len(set(limits)) == 1 else limits))
                width = max(len(ids) for _, ids, _ in batch)
                for offset, ((text, ids, _), limit, row) in enumerate(zip(batch, limits, out)):
                    new = row[width:width + limit].tolist()
                    line = output_line(first + offset, text, ids, new, eos, tokenizer)
                    new_tokens += len(line["output_ids"])
                    f.write(json.dumps(line) + "\n")
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    seconds = time.perf_counter() - tic
    return {"prompts": len(prompts), "new_tokens": new_tokens, "seconds": seconds,
            "tokens_per_s": new_tokens / seconds if seconds > 0 else float("nan")}


def output_line(index: int, text, ids: np.ndarray, new: list[int], eos: tuple[int, ...], tokenizer) -> dict:
    """One prompt's output object: its new tokens up to and including the first end-of-sequence token."""
    ends = [n for n, token in enumerate(new) if token in eos]
    line = {"index": index, "prompt": text, "prompt_ids": ids.tolist(),
            "output_ids": new[:ends[0] + 1] if ends else new, "finish": "eos" if ends else "length"}
    if tokenizer is not None:
        line["text"] = tokenizer.decode(line["output_ids"], skip_special_tokens=True)
    return line
