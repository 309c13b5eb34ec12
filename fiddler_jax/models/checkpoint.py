"""Hugging Face checkpoint folders ↔ the NNX Mixtral.

A folder holds ``config.json`` and either ``model.safetensors`` or shards ``model-0000x-of-0000y.safetensors``
listed in ``model.safetensors.index.json`` (the layout of mistralai/Mixtral-8x7B-v0.1). Tensors keep HF names;
the experts of a layer, stored per expert (``...block_sparse_moe.experts.{e}.w1.weight``), are stacked into one
[E, ...] parameter. Reading is memory-mapped (see :mod:`safetensors_io`) and converts dtypes on the way to the
device; writing produces the same layout, sharded by ``max_shard_size``, which transformers loads back.
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
from fiddler_jax.models.safetensors_io import DTYPES, SafetensorsFile
from fiddler_jax.units import parse_bytes

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
_DTYPE_NAMES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def resolve_dtype(dtype) -> jnp.dtype:
    """'float32' | 'bfloat16' | 'float16' (or the numpy/jax dtype) → jnp.dtype; anything else is an error."""
    if isinstance(dtype, str):
        if dtype not in _DTYPE_NAMES:
            raise InvalidInputError(f"dtype {dtype!r} is not supported; use one of {sorted(_DTYPE_NAMES)}")
        return jnp.dtype(_DTYPE_NAMES[dtype])
    d = jnp.dtype(dtype)
    if d.name not in _DTYPE_NAMES:
        raise InvalidInputError(f"dtype {d.name!r} is not supported; use one of {sorted(_DTYPE_NAMES)}")
    return d


class Checkpoint:
    """The tensors of a checkpoint folder by HF name, across shards, as zero-copy host views."""

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        self.config = MixtralConfig.from_pretrained(self.path)
        index = os.path.join(self.path, INDEX_FILE)
        single = os.path.join(self.path, SINGLE_FILE)
        if os.path.isfile(index):
            try:
                with open(index) as f:
                    weight_map = json.load(f)["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise CheckpointError(f"{index} is not a valid safetensors index ({e!r}); it must hold a "
                                      "'weight_map' from tensor name to shard file") from None
            shards = sorted(set(weight_map.values()))
            missing = [s for s in shards if not os.path.isfile(os.path.join(self.path, s))]
            if missing:
                raise CheckpointError(f"{index} lists shard(s) that are not in {self.path}: {', '.join(missing)}; "
                                      "download the missing shard files")
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
        return {w: np.asarray(self.checkpoint.tensor(f"{prefix}.{w}.weight"), dtype=self.dtype)
                for w in ("w1", "w3", "w2")}


def load_split(path: str | os.PathLike, dtype="float32", *, resident: np.ndarray | None = None,
               progress: bool = True) -> tuple[Mixtral, ExpertReader | None]:
    """Load a checkpoint with the experts split between the device and the host.

    With ``resident`` (bool [layers, experts]) each layer's stacked expert parameters (w1, w3, w2) hold only
    its resident experts, in expert order; the offloaded experts are checked (names, shapes) but not read, and
    the second result reads them on demand (:class:`ExpertReader`). Without it, everything goes to the device
    and the second result is None."""
    dtype = resolve_dtype(dtype)
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
                if read:
                    parts.append(np.asarray(ckpt.tensor(name), dtype=dtype))
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
