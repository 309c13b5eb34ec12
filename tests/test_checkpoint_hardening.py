"""Checkpoint and config loading refuses what it cannot trust, each time with one clear fiddler_jax error that
names the file, entry or tensor: index entries that point outside the folder, NaN/inf or integer weights, config
files that are not a JSON object of well-typed fields, unreadable files, and dtypes the engine cannot run."""
from __future__ import annotations

import builtins
import json
import os
import re
import shutil

import ml_dtypes
import numpy as np
import pytest

import fiddler_jax as fj
from fiddler_jax.errors import CheckpointError, InvalidInputError, ModelConfigError
from fiddler_jax.models.checkpoint import INDEX_FILE, _write_safetensors, load_split, resolve_dtype
from fiddler_jax.models.config import ModelConfig
from fiddler_jax.models.safetensors_io import SafetensorsFile

Q_PROJ = "model.layers.0.self_attn.q_proj.weight"


def read_index(folder) -> dict:
    return json.loads((folder / INDEX_FILE).read_text())


def write_index(folder, index) -> None:
    (folder / INDEX_FILE).write_text(json.dumps(index))


def first_shard(folder) -> str:
    return sorted(set(read_index(folder)["weight_map"].values()))[0]


def point_shard(folder, shard: str, new_name: str) -> None:
    """Make every index entry that names ``shard`` name ``new_name`` instead."""
    index = read_index(folder)
    index["weight_map"] = {k: (new_name if v == shard else v) for k, v in index["weight_map"].items()}
    write_index(folder, index)


def rewrite(file, **changes) -> None:
    """Rewrite safetensors ``file`` with some tensors replaced (name -> array, any dtype)."""
    f = SafetensorsFile(str(file))
    tensors = {n: np.array(f.tensor(n)) for n in f.keys()}
    del f
    for name, value in changes.items():
        tensors[name.replace("__", ".")] = value
    _write_safetensors(str(file), tensors)


def stored(file, name) -> np.ndarray:
    return np.array(SafetensorsFile(str(file)).tensor(name))


def edit_config(folder, **changes):
    cfg_file = folder / "config.json"
    cfg = json.loads(cfg_file.read_text())
    for k, v in changes.items():
        if v is None:
            cfg.pop(k, None)
        else:
            cfg[k] = v
    cfg_file.write_text(json.dumps(cfg))


def deny_reading(monkeypatch, path) -> None:
    """Make ``open(path)`` fail as a file without read permission does (the tests run as root, where chmod 000
    does not stop reads)."""
    real_open, target = builtins.open, os.path.abspath(path)

    def fake_open(file, *args, **kwargs):
        if isinstance(file, (str, os.PathLike)) and os.path.abspath(file) == target:
            raise PermissionError(13, "Permission denied", os.fspath(file))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", fake_open)


# -- 1. the index may name only plain file names inside the folder ---------------------------------------------------

@pytest.mark.parametrize("kind", ["dotdot_system", "dotdot_sibling", "absolute", "subfolder", "dotdot", "empty"])
def test_index_entry_outside_the_folder_is_refused(sharded, tmp_path, kind):
    shard = first_shard(sharded)
    other = tmp_path / "other"
    shutil.copytree(sharded, other)  # a valid shard outside the folder: today's code loads it silently
    (sharded / "sub").mkdir()
    shutil.copy(sharded / shard, sharded / "sub" / shard)
    bad = {"dotdot_system": "../../etc/passwd", "dotdot_sibling": f"../other/{shard}",
           "absolute": str(other / shard), "subfolder": f"sub/{shard}", "dotdot": "..", "empty": ""}[kind]
    point_shard(sharded, shard, bad)
    with pytest.raises(CheckpointError, match=re.escape(f"names the shard {bad!r}, which is not a plain file name "
                                                         f"inside {sharded}")) as e:
        fj.load_pretrained(sharded, progress=False)
    assert INDEX_FILE in str(e.value) and "weight_map entry 'model." in str(e.value)


def test_symlinked_shard_outside_the_folder_is_refused(sharded, tmp_path):
    shard = first_shard(sharded)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    shutil.move(sharded / shard, elsewhere / shard)
    os.symlink(elsewhere / shard, sharded / shard)
    with pytest.raises(CheckpointError, match=re.escape(f"the shard {shard!r} is a symlink to "
                                                         f"{os.path.realpath(elsewhere / shard)}, outside")):
        fj.load_pretrained(sharded, progress=False)


def test_symlinks_inside_the_folder_and_the_hub_cache_layout_still_load(sharded, tmp_path):
    reference = np.asarray(fj.load_pretrained(sharded, progress=False).embed_tokens.weight[...])
    # the Hugging Face hub cache: snapshots/<revision>/<file> -> ../../blobs/<hash>
    repo = tmp_path / "models--someone--tiny"
    (repo / "blobs").mkdir(parents=True)
    snapshot = repo / "snapshots" / "0123abcd"
    snapshot.mkdir(parents=True)
    for i, f in enumerate(sorted(os.listdir(sharded))):
        shutil.copy(sharded / f, repo / "blobs" / f"blob{i}")
        os.symlink(f"../../blobs/blob{i}", snapshot / f)
    model = fj.load_pretrained(snapshot, progress=False)
    np.testing.assert_array_equal(np.asarray(model.embed_tokens.weight[...]), reference)
    # a shard linked to another file of the same folder
    shard = first_shard(sharded)
    os.rename(sharded / shard, sharded / "renamed.safetensors")
    os.symlink("renamed.safetensors", sharded / shard)
    model = fj.load_pretrained(sharded, progress=False)
    np.testing.assert_array_equal(np.asarray(model.embed_tokens.weight[...]), reference)


# -- 2. weights: floating point and finite, checked on the way through -----------------------------------------------

@pytest.mark.parametrize("dtype", [np.float16, ml_dtypes.bfloat16, np.float32, np.float64])
def test_all_finite_finds_every_nan_and_inf(dtype):
    from fiddler_jax.models.safetensors_io import all_finite, count_nonfinite

    info = ml_dtypes.finfo(dtype)
    n = (1 << 20) + 4099  # more than one chunk, and a partial last one
    x = np.linspace(-1, 1, n).astype(dtype)
    x[:4] = [info.max, -info.max, info.tiny, info.smallest_subnormal]
    assert all_finite(x) and count_nonfinite(x) == 0
    for bad in (np.nan, -np.nan, np.inf, -np.inf):
        for where in (0, n // 2, (1 << 20) + 7, n - 1):
            y = x.copy()
            y[where] = bad
            assert not all_finite(y), (bad, where)
            assert count_nonfinite(y) == 1
    assert all_finite(np.zeros((0, 3), dtype))


@pytest.mark.parametrize("load_dtype", ["float32", "bfloat16"])
def test_nan_weight_is_refused_naming_the_tensor(folder, load_dtype):
    q = stored(folder / "model.safetensors", Q_PROJ)
    q[0, :3] = np.nan
    q[5, 1] = np.inf
    rewrite(folder / "model.safetensors", **{Q_PROJ: q})
    with pytest.raises(CheckpointError, match=re.escape(f"tensor {Q_PROJ!r} in {folder / 'model.safetensors'} holds "
                                                         f"4 non-finite value(s) (NaN or inf) among its {q.size}")):
        fj.load_pretrained(folder, load_dtype, progress=False)


def test_nan_in_a_bfloat16_checkpoint_read_zero_copy(folder, tmp_path):
    bf16 = tmp_path / "bf16"
    fj.save_pretrained(fj.load_pretrained(folder, "bfloat16", progress=False), bf16, progress=False)
    w = stored(bf16 / "model.safetensors", "model.norm.weight")
    assert w.dtype == ml_dtypes.bfloat16
    w[7] = np.nan
    rewrite(bf16 / "model.safetensors", **{"model.norm.weight": w})
    with pytest.raises(CheckpointError, match=r"'model\.norm\.weight' in .* holds 1 non-finite value"):
        fj.load_pretrained(bf16, "bfloat16", progress=False)


def test_inf_in_an_offloaded_expert_is_refused_when_read(folder):
    name = "model.layers.1.block_sparse_moe.experts.3.w2.weight"
    w = stored(folder / "model.safetensors", name)
    w[2, 2] = -np.inf
    rewrite(folder / "model.safetensors", **{name: w})
    resident = np.zeros((2, 4), bool)
    resident[:, 0] = True
    _, reader = load_split(folder, "float32", resident=resident, progress=False)
    reader(1, 2)  # a clean expert reads fine
    with pytest.raises(CheckpointError, match=re.escape(f"tensor {name!r}") + ".*1 non-finite value"):
        reader(1, 3)


def test_overflow_when_cast_to_float16_is_refused(folder):
    q = stored(folder / "model.safetensors", Q_PROJ)
    q[1, 1] = 1e5  # finite in float32, inf in float16
    rewrite(folder / "model.safetensors", **{Q_PROJ: q})
    fj.load_pretrained(folder, "float32", progress=False)
    with pytest.raises(CheckpointError, match=re.escape(f"tensor {Q_PROJ!r}") + r".*does not fit float16: 1 of its "
                       r"float32 values become inf when cast; load the model with dtype='float32'"):
        fj.load_pretrained(folder, "float16", progress=False)


@pytest.mark.parametrize("name, dtype", [("model.norm.weight", np.int32), (Q_PROJ, np.int8),
                                         ("model.layers.1.block_sparse_moe.experts.3.w1.weight", np.bool_)])
def test_integer_or_bool_weights_are_refused(folder, name, dtype):
    w = stored(folder / "model.safetensors", name)
    rewrite(folder / "model.safetensors", **{name: np.ones(w.shape, dtype)})
    match = re.escape(f"tensor {name!r} in {folder / 'model.safetensors'} is stored as {np.dtype(dtype).name}, but "
                      "model weights are floating point")
    with pytest.raises(CheckpointError, match=match):
        fj.load_pretrained(folder, progress=False)
    resident = np.zeros((2, 4), bool)
    resident[:, 0] = True  # expert 3 is offloaded: refused at load all the same, before anything is read later
    with pytest.raises(CheckpointError, match=match):
        load_split(folder, "bfloat16", resident=resident, progress=False)


# -- 3. config.json and the index: one clear error, never a traceback ------------------------------------------------

def test_config_that_is_a_json_list(folder):
    (folder / "config.json").write_text("[1, 2, 3]")
    with pytest.raises(ModelConfigError, match=r"config\.json holds a JSON list, but a Hugging Face config\.json is "
                                               r"a JSON object"):
        fj.load_pretrained(folder, progress=False)


@pytest.mark.parametrize("changes, match", [
    (dict(hidden_size="big", head_dim=None), r"'hidden_size' must be a positive integer, got 'big'"),
    (dict(num_attention_heads="many", head_dim=None), r"'num_attention_heads' must be a positive integer, got 'many'"),
    (dict(num_attention_heads=0, head_dim=None), r"'num_attention_heads' must be a positive integer, got 0"),
    (dict(rms_norm_eps="small"), r"'rms_norm_eps' must be a finite number >= 0, got 'small'"),
    (dict(rope_parameters={"rope_type": "default", "rope_theta": "big"}),
     r"'rope_theta' must be a finite number > 0, got 'big'"),
    (dict(initializer_range=[0.02]), r"'initializer_range' must be a finite number, got \[0\.02\]"),
    (dict(sliding_window="big"), r"sliding_window must be a positive integer or null, got 'big'"),
    (dict(tie_word_embeddings="no"), r"'tie_word_embeddings' must be true or false, got 'no'"),
    (dict(eos_token_id="2"), r"'eos_token_id' must be a token id, a list of token ids or null, got '2'"),
    (dict(bos_token_id=1.5), r"'bos_token_id' must be a token id or null, got 1\.5"),
])
def test_config_field_of_the_wrong_type(folder, changes, match):
    edit_config(folder, **changes)
    with pytest.raises(ModelConfigError, match=r"config\.json: .*" + match):
        fj.load_pretrained(folder, progress=False)


def test_config_that_is_not_utf8(folder):
    (folder / "config.json").write_bytes(b'{"model_type": "mixtral", "note": "caf\xe9"}')
    with pytest.raises(ModelConfigError, match=r"config\.json is not UTF-8 text \(byte 0xe9 at offset 38\); save "
                                               r"config\.json as UTF-8 JSON"):
        fj.load_pretrained(folder, progress=False)


def test_model_path_that_is_a_file(folder):
    with pytest.raises(CheckpointError, match=r"model path .*config\.json' is a file, not a folder"):
        fj.load_pretrained(folder / "config.json", progress=False)


@pytest.mark.parametrize("content, match", [
    ({"weight_map": ["model.safetensors"]}, r"it holds a 'weight_map' that is a JSON list, not an object"),
    ([1, 2], r"it holds no 'weight_map'"),
    ({"metadata": {}}, r"it holds no 'weight_map'"),
])
def test_index_of_the_wrong_shape(sharded, content, match):
    write_index(sharded, content)
    with pytest.raises(CheckpointError, match=re.escape(INDEX_FILE) + r" is not a valid safetensors index: " + match):
        fj.load_pretrained(sharded, progress=False)


@pytest.mark.parametrize("bad", [5, None, ["model-00001-of-00002.safetensors"]])
def test_index_naming_a_non_string_shard(sharded, bad):
    index = read_index(sharded)
    index["weight_map"][Q_PROJ] = bad
    write_index(sharded, index)
    with pytest.raises(CheckpointError, match=re.escape(f"weight_map entry {Q_PROJ!r} names the shard {bad!r}, which "
                                                         "is not a file name (a JSON string)")):
        fj.load_pretrained(sharded, progress=False)


def test_index_that_is_not_utf8(sharded):
    (sharded / INDEX_FILE).write_bytes(b'{"weight_map": {"\xff": "x"}}')
    with pytest.raises(CheckpointError, match=re.escape(INDEX_FILE) + r" is not UTF-8 text"):
        fj.load_pretrained(sharded, progress=False)


@pytest.mark.parametrize("victim", ["config.json", INDEX_FILE, "shard"])
def test_unreadable_file_says_permission_denied(sharded, monkeypatch, victim):
    path = sharded / (first_shard(sharded) if victim == "shard" else victim)
    deny_reading(monkeypatch, path)
    with pytest.raises(CheckpointError, match=re.escape(f"cannot read {path}: permission denied; make it readable")):
        fj.load_pretrained(sharded, progress=False)


def test_unreadable_single_file_checkpoint(folder, monkeypatch):
    deny_reading(monkeypatch, folder / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"cannot read .*model\.safetensors: permission denied"):
        fj.load_pretrained(folder, progress=False)


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root reads files whatever their mode")
def test_unreadable_with_chmod(folder):
    os.chmod(folder / "config.json", 0)
    try:
        with pytest.raises(CheckpointError, match=r"cannot read .*config\.json: permission denied"):
            fj.load_pretrained(folder, progress=False)
    finally:
        os.chmod(folder / "config.json", 0o644)
    os.chmod(folder, 0)  # the folder itself: not "config.json is missing"
    try:
        with pytest.raises(CheckpointError, match=r"cannot read .*config\.json: permission denied"):
            fj.load_pretrained(folder, progress=False)
    finally:
        os.chmod(folder, 0o755)


# -- 4. dtypes: float16 is refused for the engine, saying what is supported -----------------------------------------

def test_float16_is_refused_for_the_engine_naming_the_supported_dtypes(small_checkpoint):
    with pytest.raises(InvalidInputError, match=r"dtype 'float16' is not supported by the engine.*pass "
                                                r"dtype='bfloat16' or 'float32'"):
        fj.Engine.from_pretrained(small_checkpoint[1], gpu_budget=10**9, resident_experts=2, dtype="float16",
                                  progress=False)
    for dtype in ("float16", np.float16):
        with pytest.raises(InvalidInputError, match="'float16' is not supported by the engine"):
            resolve_dtype(dtype)
    resident = np.ones((2, 4), bool)
    with pytest.raises(InvalidInputError, match="'float16' is not supported by the engine"):
        load_split(small_checkpoint[1], "float16", resident=resident, progress=False)


def test_dtype_that_is_not_a_dtype():
    with pytest.raises(InvalidInputError, match=r"dtype <object .*> is not a dtype; pass 'bfloat16' or 'float32'"):
        resolve_dtype(object())
    with pytest.raises(InvalidInputError, match=r"dtype 'int8' is not supported; pass dtype='bfloat16' or 'float32'"):
        resolve_dtype(np.int8)


def test_plain_model_still_runs_float16(small_checkpoint):
    model = fj.load_pretrained(small_checkpoint[1], "float16", progress=False)
    assert model.dtype == np.float16
    assert resolve_dtype("float16", allow_float16=True) == np.float16


def test_valid_configs_still_parse(small_checkpoint):
    cfg = ModelConfig.from_pretrained(small_checkpoint[1])
    d = cfg.to_hf_dict()
    assert ModelConfig.from_hf_dict(d) == cfg
    d |= {"tie_word_embeddings": None, "eos_token_id": [2, 3], "pad_token_id": None, "rope_theta": 500000}
    d.pop("rope_parameters")
    cfg2 = ModelConfig.from_hf_dict(d)
    assert cfg2.eos_token_ids == (2, 3) and cfg2.rope_theta == 5e5 and not cfg2.tie_word_embeddings
