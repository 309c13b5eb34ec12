"""Hugging Face checkpoint folders ↔ the NNX MoE causal LM, for every family of :data:`~.config.FAMILIES`.

A folder holds ``config.json`` and either ``model.safetensors`` or shards ``model-0000x-of-0000y.safetensors``
listed in ``model.safetensors.index.json`` (the layout of mistralai/Mixtral-8x7B-v0.1). Tensors keep HF names
(:func:`hf_names`: the module's attribute path, except Mixtral's router, which transformers stores under
``block_sparse_moe``). The routed experts of a layer come in one of two layouts, both accepted on load:
  * per expert, as transformers writes them by default: ``...block_sparse_moe.experts.{e}.w1/w3/w2.weight``
    (Mixtral) or ``...mlp.experts.{e}.gate_proj/up_proj/down_proj.weight`` (the others);
  * fused, as transformers holds them in memory and writes them with ``save_original_format=False``:
    ``...mlp.experts.gate_up_proj`` [E, 2·ffn, hidden] (gate rows first, then up) and ``...mlp.experts.down_proj``
    [E, hidden, ffn] (Mixtral's router then sits at ``...mlp.gate.weight``);
and are stacked into one [E, ...] parameter per weight (w1 = gate, w3 = up, w2 = down). Reading is memory-mapped (see :mod:`safetensors_io`) and converts dtypes on the way to the
device, checking each tensor as it passes (stored as floating point, no NaN or inf: one vectorised pass); an index
may name only shard files inside its folder. Writing produces the per-expert layout, sharded by ``max_shard_size``,
which transformers loads back.
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
from fiddler_jax.models.causal_lm import MoeForCausalLM
from fiddler_jax.models.config import ModelConfig
from fiddler_jax.models.quantization import DEFAULT_INT4_GROUP, check_precision
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
        self.config = ModelConfig.from_pretrained(self.path)
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
                f"tensor {name!r} in {self.file_of(name)} is stored as {stored.name}, but model weights are "
                "floating point (float32, bfloat16, float16 or float64); the checkpoint is quantized: use an "
                "unquantized one")

    def converted(self, name: str, dtype, index=()) -> np.ndarray:
        """Tensor ``name`` (or its part ``index``, e.g. one expert of a fused tensor) as a ``dtype`` array (the
        zero-copy view when it is stored in ``dtype``), checked on the way: a stored dtype that is not floating
        point (:meth:`check_float`), or a NaN/inf after the cast, is a CheckpointError naming the tensor (one
        vectorised pass over the result, :func:`all_finite`)."""
        self.check_float(name)
        stored = self.tensor(name)[index]
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


WEIGHTS = ("w1", "w3", "w2")  # gate, up, down of a SwiGLU expert
_PER_EXPERT_NAMES = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}


def expert_name(cfg: ModelConfig, layer: int, expert: int, weight: str) -> str:
    """The per-expert HF name of routed expert ``expert``'s ``weight`` (w1, w3 or w2) in ``layer``."""
    if cfg.model_type == "mixtral":
        return f"model.layers.{layer}.block_sparse_moe.experts.{expert}.{weight}.weight"
    return f"model.layers.{layer}.mlp.experts.{expert}.{_PER_EXPERT_NAMES[weight]}.weight"


def hf_names(path: tuple, cfg: ModelConfig) -> list[str]:
    """HF tensor name(s) of the NNX parameter at ``path``; a stacked expert parameter maps to E per-expert names
    (:func:`expert_name`, the layout ``save_pretrained`` writes)."""
    parts = [str(p) for p in path]
    if parts[0] == "lm_head":
        return ["lm_head.weight"]
    if len(parts) == 4 and parts[2] == "mlp" and parts[3] in WEIGHTS:
        return [expert_name(cfg, int(parts[1]), e, parts[3]) for e in range(cfg.num_experts)]
    if cfg.model_type == "mixtral" and parts[2:4] == ["mlp", "gate"]:
        return [f"model.layers.{parts[1]}.block_sparse_moe.gate.{parts[-1]}"]
    return ["model." + ".".join(parts)]


def _fused_names(layer: int) -> tuple[str, str]:
    return f"model.layers.{layer}.mlp.experts.gate_up_proj", f"model.layers.{layer}.mlp.experts.down_proj"


class ExpertLayout:
    """Where a checkpoint keeps each routed expert's weights: per-expert tensors, or the fused pair of each layer
    (module docstring). ``source(layer, expert, weight)`` → (tensor name, index into it)."""

    def __init__(self, ckpt: Checkpoint, cfg: ModelConfig):
        self.cfg = cfg
        moe_layers = cfg.moe_layers
        self.fused = bool(moe_layers) and _fused_names(moe_layers[0])[0] in ckpt
        if not self.fused:
            return
        e, f, h = cfg.num_experts, cfg.moe_intermediate_size, cfg.hidden_size
        for layer in moe_layers:
            for name, shape in zip(_fused_names(layer), ((e, 2 * f, h), (e, h, f))):
                if name not in ckpt:
                    raise CheckpointError(f"tensor {name!r} is missing from the checkpoint in {ckpt.path}: its first "
                                          "MoE layer stores the experts fused, so every MoE layer must")
                if tuple(ckpt.shape(name)) != shape:
                    raise CheckpointError(f"tensor {name!r} in {ckpt.file_of(name)} has shape {list(ckpt.shape(name))}, "
                                          f"but config.json implies {list(shape)}; the weights do not match config.json")

    def source(self, layer: int, expert: int, weight: str) -> tuple[str, tuple]:
        if not self.fused:
            return expert_name(self.cfg, layer, expert, weight), ()
        gate_up, down = _fused_names(layer)
        f = self.cfg.moe_intermediate_size
        if weight == "w2":
            return down, (expert,)
        return gate_up, (expert, slice(0, f) if weight == "w1" else slice(f, 2 * f))

    def tensor_names(self, layer: int) -> list[str]:
        """The tensors that hold ``layer``'s routed experts."""
        if self.fused:
            return list(_fused_names(layer))
        return [expert_name(self.cfg, layer, e, w) for e in range(self.cfg.num_experts) for w in WEIGHTS]


def _router_name(ckpt: Checkpoint, cfg: ModelConfig, name: str) -> str:
    """Mixtral's router under the fused layout's name when the per-expert one is absent."""
    if cfg.model_type == "mixtral" and name.endswith("block_sparse_moe.gate.weight") and name not in ckpt:
        fused = name.replace("block_sparse_moe.gate", "mlp.gate")
        if fused in ckpt:
            return fused
    return name


def _params(model: nnx.Module) -> Iterator[tuple[tuple, nnx.Param]]:
    for path, node in nnx.iter_graph(model):
        if isinstance(node, nnx.Param):
            yield path, node


def load_pretrained(path: str | os.PathLike, dtype="float32", *, progress: bool = True,
                    expert_precision: str = "bf16", int4_group: int = DEFAULT_INT4_GROUP) -> MoeForCausalLM:
    """Load an HF checkpoint folder of a supported family into an NNX module on the default device, weights cast
    to ``dtype``. ``expert_precision`` "int8" / "int4" (groups of ``int4_group`` inputs) gives the routed experts
    the dequantised weights of that format (:mod:`fiddler_jax.models.quantized_experts`): the model an engine of
    that precision computes."""
    from fiddler_jax.models.quantized_experts import apply_expert_precision, check_model_precision

    check_precision(expert_precision, int4_group)
    if expert_precision == "int4":  # the group must fit the experts' rows: refused before the weights are read
        cfg = Checkpoint(path).config
        check_model_precision(cfg.hidden_size, cfg.moe_intermediate_size, expert_precision, int4_group)
    model = load_split(path, dtype, progress=progress)[0]
    apply_expert_precision(model, expert_precision, int4_group)
    return model


class ExpertReader:
    """The offloaded experts of a checkpoint, read on demand: ``reader(layer, expert)`` → {"w1", "w3", "w2"}
    numpy arrays of the load dtype (zero-copy mmap views when the checkpoint already stores that dtype). The
    engine pins one expert at a time from here, so the host never holds a second full copy of the experts."""

    def __init__(self, checkpoint: Checkpoint, layout: ExpertLayout, dtype, offloaded: np.ndarray):
        self.checkpoint, self.layout = checkpoint, layout
        self.dtype = np.dtype(dtype)
        self.offloaded = offloaded

    def __call__(self, layer: int, expert: int) -> dict[str, np.ndarray]:
        if not self.offloaded[layer, expert]:
            raise InvalidInputError(f"expert {expert} of layer {layer} is resident on the device, not offloaded")
        out = {}
        for w in WEIGHTS:
            name, index = self.layout.source(layer, expert, w)
            out[w] = self.checkpoint.converted(name, self.dtype, index)
        return out


def load_split(path: str | os.PathLike, dtype="float32", *, resident: np.ndarray | None = None,
               progress: bool = True, store=None) -> tuple[MoeForCausalLM, ExpertReader | None]:
    """Load a checkpoint with the routed experts split between the device and the host.

    With ``resident`` (bool [layers, experts]; the rows of dense layers are ignored) each MoE layer's stacked
    expert parameters (w1, w3, w2) hold only its resident experts, in expert order; the offloaded experts are
    checked (names, shapes, dtypes) but not read, and the second result reads them on demand
    (:class:`ExpertReader`, which checks them for NaN/inf). Without it, everything goes to the device and the
    second result is None. float16 only without it: the engine's CPU lane has no float16 (:func:`resolve_dtype`).
    ``store``: applied to each resident expert stack as soon as it is on the device (the engine's quantised
    residents: :func:`~fiddler_jax.models.quantized_experts.resident_stack_store`)."""
    dtype = resolve_dtype(dtype, allow_float16=resident is None)
    ckpt = Checkpoint(path)
    cfg = ckpt.config
    if resident is not None:
        resident = np.asarray(resident, bool)
        if resident.shape != (cfg.num_hidden_layers, cfg.num_experts):
            raise InvalidInputError(f"resident mask has shape {list(resident.shape)}, expected "
                                    f"[{cfg.num_hidden_layers}, {cfg.num_experts}]")
    layout = ExpertLayout(ckpt, cfg)
    model = nnx.eval_shape(lambda: MoeForCausalLM(cfg, dtype=dtype, rngs=nnx.Rngs(0)))
    params = list(_params(model))
    used: set[str] = set()
    total = sum(len(hf_names(p, cfg)) for p, _ in params)

    def check(name: str, expected: tuple) -> None:
        if name not in ckpt:
            raise CheckpointError(f"tensor {name!r} is missing from the checkpoint in {ckpt.path} (config.json "
                                  f"expects it); the checkpoint is incomplete or not a {cfg.model_type} checkpoint")
        if tuple(ckpt.shape(name)) != tuple(expected):
            raise CheckpointError(
                f"tensor {name!r} in {ckpt.file_of(name)} has shape {list(ckpt.shape(name))}, but config.json "
                f"implies {list(expected)}; the weights do not match config.json")
        ckpt.check_float(name)  # also for the offloaded experts, read later

    with tqdm(total=total, desc=f"loading {os.path.basename(os.path.abspath(ckpt.path))}", unit="tensor",
              disable=not progress, leave=False) as bar:
        for p, param in params:
            names = hf_names(p, cfg)
            if len(names) == 1:
                name = _router_name(ckpt, cfg, names[0])
                check(name, param.shape)
                param.value = jax.device_put(ckpt.converted(name, dtype))
                used.add(name)
                bar.update()
                continue
            layer, weight = int(p[1]), str(p[3])
            keep = resident[layer] if resident is not None else np.ones(cfg.num_experts, bool)
            parts = []
            for e in range(cfg.num_experts):
                name, index = layout.source(layer, e, weight)
                if not layout.fused:
                    check(name, param.shape[1:])
                elif e == 0:
                    ckpt.check_float(name)
                if keep[e]:
                    parts.append(ckpt.converted(name, dtype, index))
                used.add(name)
                bar.update()
            if parts:
                param.value = jax.device_put(np.stack(parts)) if store is None else store(
                    jax.device_put(np.stack(parts)))
            else:
                param.value = jnp.zeros((0,) + tuple(param.shape[1:]), dtype)
    unused = sorted(set(ckpt.names()) - used - ({"lm_head.weight"} if cfg.tie_word_embeddings else set()))
    if unused:
        warnings.warn(f"{ckpt.path}: {len(unused)} tensor(s) not used by the {cfg.model_type} model, e.g. "
                      f"{unused[:3]}", stacklevel=2)
    return model, (ExpertReader(ckpt, layout, dtype, ~resident) if resident is not None else None)


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


def save_pretrained(model: MoeForCausalLM, path: str | os.PathLike, *, max_shard_size: int | str = "5GB",
                    progress: bool = True) -> None:
    """Write ``model`` as an HF folder of its family (config.json + model.safetensors, or shards + index; the
    experts per expert)."""
    path = os.fspath(path)
    if not isinstance(model, MoeForCausalLM):
        raise InvalidInputError(f"save_pretrained expects a fiddler_jax model (from load_pretrained), got "
                                f"{type(model).__name__}")
    limit = parse_bytes(max_shard_size)
    cfg = model.config
    os.makedirs(path, exist_ok=True)
    tensors: list[tuple[str, np.ndarray]] = []
    for p, param in _params(model):
        host = np.asarray(jax.device_get(param[...]))
        names = hf_names(p, cfg)
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
