"""Hugging Face checkpoint folders ↔ the NNX Mixtral.

A folder holds ``config.json`` and either ``model.safetensors`` or shards ``model-0000x-of-0000y.safetensors``
listed in ``model.safetensors.index.json`` (the layout of mistralai/Mixtral-8x7B-v0.1). Tensors keep HF names;
the experts of a layer, stored per expert (``...block_sparse_moe.experts.{e}.w1.weight``), are stacked into one
[E, ...] parameter. Reading is memory-mapped (see :mod:`safetensors_io`) and converts dtypes on the way to the
device, checking each tensor as it passes (stored as floating point, no NaN or inf: one vectorised pass); an index
may name only shard files inside its folder. Writing produces the same layout, sharded by ``max_shard_size``, which
transformers loads back.
"""
from __future__ import annotations

import json
import os
import re
import warnings
from collections.abc import Iterator

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from fiddler_jax.errors import CheckpointError, InvalidInputError
from fiddler_jax.models.config import MixtralConfig
from fiddler_jax.models.mixtral import Mixtral
from fiddler_jax.models.safetensors_io import (DTYPES, FLOAT_DTYPES, SafetensorsFile, all_finite, count_nonfinite,
                                               unreadable)
from fiddler_jax.units import parse_bytes

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
# The dtypes the engine runs: its host experts go through the C++ CPU kernel (bfloat16) or the numpy lane
# (float32). The plain model (jnp only, ``load_pretrained``) also runs float16.
_DTYPE_NAMES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
_PLAIN_DTYPE_NAMES = _DTYPE_NAMES | {"float16": jnp.float16}


def resolve_dtype(dtype, *, allow_float16: bool = False) -> jnp.dtype:
    """'float32' | 'bfloat16' (or the numpy/jax dtype) → jnp.dtype; 'float16' too with ``allow_float16`` (the
    plain model, not the engine); anything else is an InvalidInputError that lists what is supported."""
    names = _PLAIN_DTYPE_NAMES if allow_float16 else _DTYPE_NAMES
    supported = " or ".join(repr(n) for n in sorted(names))
    try:
        name = dtype if isinstance(dtype, str) else jnp.dtype(dtype).name
    except TypeError:
        raise InvalidInputError(f"dtype {dtype!r} is not a dtype; pass {supported}") from None
    if name == "float16" and not allow_float16:
        raise InvalidInputError(
            "dtype 'float16' is not supported by the engine, whose CPU expert lane runs bfloat16 (the C++ kernel) or "
            f"float32 (numpy); pass dtype={supported} (float16 runs only in the plain model of load_pretrained)")
    if name not in names:
        raise InvalidInputError(f"dtype {name!r} is not supported; pass dtype={supported}")
    return jnp.dtype(names[name])


_JSON_KINDS = {list: "list", str: "string", bool: "boolean", dict: "object"}


def _index_entry_error(index: str, folder: str, name: str, shard) -> CheckpointError | None:
    """Why the weight_map entry ``name`` → ``shard`` of ``index`` is unusable, or None: a shard must be a plain
    file name, which can only name a file inside the checkpoint folder (no path, no '..', not absolute)."""
    if not isinstance(shard, str):
        return CheckpointError(f"{index}: weight_map entry {name!r} names the shard {shard!r}, which is not a file "
                               "name (a JSON string); fix the entry or download the index again")
    separators = {"/", "\\", os.sep, os.altsep} - {None}
    if shard in ("", ".", "..") or "\0" in shard or any(c in shard for c in separators) or os.path.isabs(shard):
        return CheckpointError(
            f"{index}: weight_map entry {name!r} names the shard {shard!r}, which is not a plain file name inside "
            f"{folder}; an index may only name shard files of its own folder (like "
            "'model-00001-of-00002.safetensors'): fix the entry, or download the checkpoint again from a source you "
            "trust")
    return None


def _outside(folder: str, file: str) -> str | None:
    """Where ``file`` (in ``folder``) really is when a symlink takes it outside ``folder``, else None. The layout
    of the Hugging Face hub cache (``snapshots/<revision>/<file>`` → ``../../blobs/<hash>``) is inside."""
    root, real = os.path.realpath(folder), os.path.realpath(file)
    if os.path.commonpath([root, real]) == root:
        return None
    parent = os.path.dirname(root)
    if os.path.basename(parent) == "snapshots":
        blobs = os.path.join(os.path.dirname(parent), "blobs")
        if os.path.commonpath([blobs, real]) == blobs:
            return None
    return real


def _read_index(index: str, folder: str) -> dict[str, str]:
    """The weight_map of a safetensors index, every entry a plain shard file name (:func:`_index_entry_error`)."""
    hint = "it must be a JSON object whose 'weight_map' maps tensor names to shard files; download it again"
    try:
        with open(index, encoding="utf-8") as f:
            text = f.read()
    except UnicodeDecodeError as e:
        raise CheckpointError(f"{index} is not UTF-8 text (byte {e.object[e.start]:#04x} at offset {e.start}); "
                              f"{hint}") from None
    except OSError as e:
        raise CheckpointError(unreadable(index, e)) from None
    try:
        data = json.loads(text)
    except (ValueError, RecursionError) as e:
        raise CheckpointError(f"{index} is not a valid safetensors index ({e}); {hint}") from None
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict):
        found = ("no 'weight_map'" if weight_map is None
                 else f"a 'weight_map' that is a JSON {_JSON_KINDS.get(type(weight_map), 'number')}, not an object")
        raise CheckpointError(f"{index} is not a valid safetensors index: it holds {found}; {hint}")
    for name, shard in weight_map.items():
        if (error := _index_entry_error(index, folder, name, shard)) is not None:
            raise error
    return weight_map


class Checkpoint:
    """The tensors of a checkpoint folder by HF name, across shards, as zero-copy host views."""

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        self.config = MixtralConfig.from_pretrained(self.path)
        index = os.path.join(self.path, INDEX_FILE)
        single = os.path.join(self.path, SINGLE_FILE)
        if os.path.isfile(index):
            weight_map = _read_index(index, self.path)
            shards = sorted(set(weight_map.values()))
            missing = [s for s in shards if not os.path.isfile(os.path.join(self.path, s))]
            if missing:
                raise CheckpointError(f"{index} lists shard(s) that are not in {self.path}: {', '.join(missing)}; "
                                      "download the missing shard files")
            for s in shards:
                if (real := _outside(self.path, os.path.join(self.path, s))) is not None:
                    raise CheckpointError(
                        f"{index}: the shard {s!r} is a symlink to {real}, outside {self.path}; shards are read only "
                        "from inside the checkpoint folder: copy the file into the folder")
            files = {s: SafetensorsFile(os.path.join(self.path, s)) for s in shards}
            self._where = {}
            for name, shard in weight_map.items():
                if name not in files[shard].keys():
                    raise CheckpointError(f"{index} says tensor {name!r} is in {shard}, but that file lacks it; "
                                          "the shard is stale or corrupt")
                self._where[name] = files[shard]
        elif os.path.isfile(single):
            f = SafetensorsFile(single)
            self._where = {name: f for name in f.keys()}
        else:
            raise CheckpointError(f"{self.path} holds no weights: expected {SINGLE_FILE} or {INDEX_FILE} with its "
                                  "shards (save the model with save_pretrained)")

    def names(self) -> list[str]:
        return list(self._where)

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def file_of(self, name: str) -> str:
        return self._where[name].path

    def shape(self, name: str) -> tuple[int, ...]:
        return self._where[name].shape(name)

    def dtype(self, name: str) -> np.dtype:
        """The stored dtype of tensor ``name``."""
        return self._where[name].dtype(name)

    def check_float(self, name: str) -> None:
        """Refuse tensor ``name`` unless it is stored as floating point (an integer or bool tensor would be cast
        silently into nonsense weights)."""
        stored = self.dtype(name)
        if stored not in FLOAT_DTYPES:
            raise CheckpointError(
                f"tensor {name!r} in {self.file_of(name)} is stored as {stored.name}, but Mixtral weights are "
                "floating point (float32, bfloat16, float16 or float64); the checkpoint is quantized or not a Mixtral "
                "checkpoint: use an unquantized one")

    def converted(self, name: str, dtype) -> np.ndarray:
        """Tensor ``name`` as a ``dtype`` array (the zero-copy view when it is stored in ``dtype``), checked on
        the way: a stored dtype that is not floating point (:meth:`check_float`), or a NaN/inf after the cast, is
        a CheckpointError naming the tensor (one vectorised pass over the result, :func:`all_finite`)."""
        self.check_float(name)
        stored = self.tensor(name)
        with np.errstate(over="ignore", invalid="ignore"):  # an overflow is reported below, naming the tensor
            out = np.asarray(stored, dtype=dtype)
        if not all_finite(out):
            bad = count_nonfinite(stored)
            if bad:
                raise CheckpointError(
                    f"tensor {name!r} in {self.file_of(name)} holds {bad} non-finite value(s) (NaN or inf) among its "
                    f"{stored.size}; the weights are corrupt or come from a diverged training run: download or save "
                    "the checkpoint again")
            fix = ("load the model with dtype='float32'" if out.dtype != np.float32
                   else "the weights are corrupt: download or save the checkpoint again")
            raise CheckpointError(
                f"tensor {name!r} in {self.file_of(name)} does not fit {out.dtype.name}: {count_nonfinite(out)} of its "
                f"{stored.dtype.name} values become inf when cast; {fix}")
        return out

    def tensor(self, name: str) -> np.ndarray:
        """Zero-copy read-only view of tensor ``name`` in its stored dtype."""
        if name not in self._where:
            raise CheckpointError(f"tensor {name!r} is missing from the checkpoint in {self.path}")
        return self._where[name].tensor(name)


def hf_names(path: tuple, num_experts: int) -> list[str]:
    """HF tensor name(s) of the NNX parameter at ``path``; a stacked expert parameter maps to E names."""
    parts = [str(p) for p in path]
    if parts[0] == "lm_head":
        return ["lm_head.weight"]
    if len(parts) == 4 and parts[2] == "block_sparse_moe" and parts[3] in ("w1", "w2", "w3"):
        return [f"model.layers.{parts[1]}.block_sparse_moe.experts.{e}.{parts[3]}.weight" for e in range(num_experts)]
    return ["model." + ".".join(parts)]


def _params(model: nnx.Module) -> Iterator[tuple[tuple, nnx.Param]]:
    for path, node in nnx.iter_graph(model):
        if isinstance(node, nnx.Param):
            yield path, node


def load_pretrained(path: str | os.PathLike, dtype="float32", *, progress: bool = True) -> Mixtral:
    """Load a Mixtral HF checkpoint folder into an NNX module on the default device, weights cast to ``dtype``."""
    return load_split(path, dtype, progress=progress)[0]


class ExpertReader:
    """The offloaded experts of a checkpoint, read on demand: ``reader(layer, expert)`` → {"w1", "w3", "w2"}
    numpy arrays of the load dtype (zero-copy mmap views when the checkpoint already stores that dtype). The
    engine pins one expert at a time from here, so the host never holds a second full copy of the experts."""

    def __init__(self, checkpoint: Checkpoint, dtype, offloaded: np.ndarray):
        self.checkpoint = checkpoint
        self.dtype = np.dtype(dtype)
        self.offloaded = offloaded

    def __call__(self, layer: int, expert: int) -> dict[str, np.ndarray]:
        if not self.offloaded[layer, expert]:
            raise InvalidInputError(f"expert {expert} of layer {layer} is resident on the device, not offloaded")
        prefix = f"model.layers.{layer}.block_sparse_moe.experts.{expert}"
        return {w: self.checkpoint.converted(f"{prefix}.{w}.weight", self.dtype) for w in ("w1", "w3", "w2")}


def load_split(path: str | os.PathLike, dtype="float32", *, resident: np.ndarray | None = None,
               progress: bool = True) -> tuple[Mixtral, ExpertReader | None]:
    """Load a checkpoint with the experts split between the device and the host.

    With ``resident`` (bool [layers, experts]) each layer's stacked expert parameters (w1, w3, w2) hold only
    its resident experts, in expert order; the offloaded experts are checked (names, shapes, dtypes) but not
    read, and the second result reads them on demand (:class:`ExpertReader`, which checks them for NaN/inf).
    Without it, everything goes to the device and the second result is None. float16 only without it: the
    engine's CPU lane has no float16 (:func:`resolve_dtype`)."""
    dtype = resolve_dtype(dtype, allow_float16=resident is None)
    ckpt = Checkpoint(path)
    cfg = ckpt.config
    if resident is not None:
        resident = np.asarray(resident, bool)
        if resident.shape != (cfg.num_hidden_layers, cfg.num_local_experts):
            raise InvalidInputError(f"resident mask has shape {list(resident.shape)}, expected "
                                    f"[{cfg.num_hidden_layers}, {cfg.num_local_experts}]")
    model = nnx.eval_shape(lambda: Mixtral(cfg, dtype=dtype, rngs=nnx.Rngs(0)))
    params = list(_params(model))
    used: set[str] = set()
    total = sum(len(hf_names(p, cfg.num_local_experts)) for p, _ in params)
    with tqdm(total=total, desc=f"loading {os.path.basename(os.path.abspath(ckpt.path))}", unit="tensor",
              disable=not progress, leave=False) as bar:
        for p, param in params:
            names = hf_names(p, cfg.num_local_experts)
            expected = param.shape[1:] if len(names) > 1 else param.shape
            keep = resident[int(p[1])] if len(names) > 1 and resident is not None else np.ones(len(names), bool)
            parts = []
            for name, read in zip(names, keep):
                if name not in ckpt:
                    raise CheckpointError(f"tensor {name!r} is missing from the checkpoint in {ckpt.path} "
                                          f"(config.json expects it); the checkpoint is incomplete or not Mixtral")
                if tuple(ckpt.shape(name)) != tuple(expected):
                    raise CheckpointError(
                        f"tensor {name!r} in {ckpt.file_of(name)} has shape {list(ckpt.shape(name))}, but "
                        f"config.json implies {list(expected)}; the weights do not match config.json")
                ckpt.check_float(name)  # also for the offloaded experts, read later
                if read:
                    parts.append(ckpt.converted(name, dtype))
                used.add(name)
                bar.update()
            if len(names) == 1:
                param.value = jax.device_put(parts[0])
            elif parts:
                param.value = jax.device_put(np.stack(parts))
            else:
                param.value = jnp.zeros((0,) + tuple(expected), dtype)
    unused = sorted(set(ckpt.names()) - used - ({"lm_head.weight"} if cfg.tie_word_embeddings else set()))
    if unused:
        warnings.warn(f"{ckpt.path}: {len(unused)} tensor(s) not used by Mixtral, e.g. {unused[:3]}", stacklevel=2)
    return model, (ExpertReader(ckpt, dtype, ~resident) if resident is not None else None)


def _write_safetensors(path: str, tensors: dict[str, np.ndarray]) -> None:
    """Write one safetensors file: header JSON padded to 8 bytes, then the tensors' little-endian bytes."""
    names = {v: k for k, v in DTYPES.items()}
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, arr in tensors.items():
        header[name] = {"dtype": names[arr.dtype], "shape": list(arr.shape),
                        "data_offsets": [offset, offset + arr.nbytes]}
        offset += arr.nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(len(blob).to_bytes(8, "little"))
        f.write(blob)
        for arr in tensors.values():
            f.write(np.ascontiguousarray(arr).tobytes())


def save_pretrained(model: Mixtral, path: str | os.PathLike, *, max_shard_size: int | str = "5GB",
                    progress: bool = True) -> None:
    """Write ``model`` as an HF Mixtral folder (config.json + model.safetensors, or shards + index)."""
    path = os.fspath(path)
    if not isinstance(model, Mixtral):
        raise InvalidInputError(f"save_pretrained expects a fiddler_jax Mixtral model, got {type(model).__name__}")
    limit = parse_bytes(max_shard_size)
    cfg = model.config
    os.makedirs(path, exist_ok=True)
    tensors: list[tuple[str, np.ndarray]] = []
    for p, param in _params(model):
        host = np.asarray(jax.device_get(param[...]))
        names = hf_names(p, cfg.num_local_experts)
        tensors.extend(zip(names, host) if len(names) > 1 else [(names[0], host)])
    shards: list[dict[str, np.ndarray]] = [{}]
    size = 0
    for name, arr in tensors:
        if shards[-1] and size + arr.nbytes > limit:
            shards.append({})
            size = 0
        shards[-1][name] = arr
        size += arr.nbytes
    for stale in os.listdir(path):
        if re.fullmatch(r"model(-\d{5}-of-\d{5})?\.safetensors(\.index\.json)?", stale):
            os.remove(os.path.join(path, stale))
    config = cfg.to_hf_dict() | {"torch_dtype": model.dtype.name, "dtype": model.dtype.name}
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    if len(shards) == 1:
        _write_safetensors(os.path.join(path, SINGLE_FILE), shards[0])
        return
    weight_map = {}
    for i, shard in enumerate(tqdm(shards, desc="writing shards", disable=not progress, leave=False)):
        file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        _write_safetensors(os.path.join(path, file), shard)
        weight_map.update(dict.fromkeys(shard, file))
    with open(os.path.join(path, INDEX_FILE), "w") as f:
        json.dump({"metadata": {"total_size": sum(a.nbytes for _, a in tensors)}, "weight_map": weight_map}, f,
                  indent=2)


def load_tokenizer(path: str | os.PathLike):
    """``transformers.AutoTokenizer`` of the folder, or None when it ships no tokenizer files."""
    path = os.fspath(path)
    if not any(os.path.isfile(os.path.join(path, f)) for f in ("tokenizer.json", "tokenizer.model",
                                                                "tokenizer_config.json")):
        return None
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(path)
