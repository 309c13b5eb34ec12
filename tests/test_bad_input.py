"""Each kind of bad input raises one clear fiddler_jax exception that names the file/tensor/argument."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest

import fiddler_jax as fj
from fiddler_jax.errors import CheckpointError, InvalidInputError, ModelConfigError


def edit_config(folder, **changes):
    cfg_file = folder / "config.json"
    cfg = json.loads(cfg_file.read_text())
    for k, v in changes.items():
        if v is None:
            cfg.pop(k, None)
        else:
            cfg[k] = v
    cfg_file.write_text(json.dumps(cfg))


def test_missing_folder(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        fj.load_pretrained(tmp_path / "nope")


def test_missing_config(folder):
    os.remove(folder / "config.json")
    with pytest.raises(CheckpointError, match="config.json is missing"):
        fj.load_pretrained(folder)


def test_unsupported_model_type(folder):
    edit_config(folder, model_type="llama")
    with pytest.raises(ModelConfigError, match="model_type is 'llama'.*only these MoE families: 'mixtral'"):
        fj.load_pretrained(folder)


def test_missing_required_field(folder):
    edit_config(folder, num_local_experts=None)
    with pytest.raises(ModelConfigError, match="num_local_experts"):
        fj.load_pretrained(folder)


def test_invalid_config_value(folder):
    edit_config(folder, num_key_value_heads=3)
    with pytest.raises(ModelConfigError, match="multiple of num_key_value_heads"):
        fj.load_pretrained(folder)


def test_no_weights(folder):
    os.remove(folder / "model.safetensors")
    with pytest.raises(CheckpointError, match="holds no weights"):
        fj.load_pretrained(folder)


def test_shard_listed_but_missing(sharded):
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    victim = sorted(set(index["weight_map"].values()))[1]
    os.remove(sharded / victim)
    with pytest.raises(CheckpointError, match=f"not in .*{victim}"):
        fj.load_pretrained(sharded)


def test_tensor_with_wrong_shape(folder):
    edit_config(folder, intermediate_size=64)  # the stored experts have 56
    with pytest.raises(CheckpointError, match=r"experts\.0\.w1\.weight.*shape \[56, 48\].*implies \[64, 48\]"):
        fj.load_pretrained(folder, progress=False)


def test_missing_tensor(folder):
    edit_config(folder, num_hidden_layers=3)
    with pytest.raises(CheckpointError, match=r"model\.layers\.2\..*missing"):
        fj.load_pretrained(folder, progress=False)


def test_truncated_safetensors(folder):
    f = folder / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) - 100])
    with pytest.raises(CheckpointError, match="model.safetensors.*truncated or corrupt"):
        fj.load_pretrained(folder)


@pytest.mark.parametrize("garbage", [b"", b"\x01\x02", b"\xff" * 64, (20).to_bytes(8, "little") + b"{not json" + b" " * 11])
def test_corrupt_safetensors(folder, garbage):
    (folder / "model.safetensors").write_bytes(garbage)
    with pytest.raises(CheckpointError, match="model.safetensors"):
        fj.load_pretrained(folder)


def test_token_ids_outside_vocabulary(small_checkpoint):
    model = fj.load_pretrained(small_checkpoint[1], progress=False)
    with pytest.raises(InvalidInputError, match="token id 97 is outside the vocabulary"):
        fj.logits(model, np.array([[1, 2, 97]]))
    with pytest.raises(InvalidInputError, match="token id -1"):
        fj.generate(model, np.array([[-1, 2]]), 4)


def test_prompt_too_long_for_context(small_checkpoint):
    model = fj.load_pretrained(small_checkpoint[1], progress=False)
    with pytest.raises(InvalidInputError, match="max_position_embeddings \\(128\\)"):
        fj.generate(model, np.ones((1, 100), np.int64), 29)
    with pytest.raises(InvalidInputError, match="max_position_embeddings"):
        fj.logits(model, np.ones((1, 129), np.int64))


def test_malformed_token_ids(small_checkpoint):
    model = fj.load_pretrained(small_checkpoint[1], progress=False)
    with pytest.raises(InvalidInputError, match="integers"):
        fj.logits(model, np.array([[1.5, 2.0]]))
    with pytest.raises(InvalidInputError, match="non-empty"):
        fj.logits(model, np.zeros((1, 0), np.int64))
    with pytest.raises(InvalidInputError, match="temperature"):
        fj.generate(model, np.array([[1, 2]]), 2, do_sample=True, temperature=0.0)


def test_unsupported_dtype(small_checkpoint):
    with pytest.raises(InvalidInputError, match="dtype 'int8' is not supported"):
        fj.load_pretrained(small_checkpoint[1], dtype="int8")
