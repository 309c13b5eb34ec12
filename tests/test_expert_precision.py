"""Quantised experts' accuracy on the bundled model (fiddler_jax.analysis.expert_precision and
``fiddler-jax quant-accuracy``): the dequantised weights are what the model computes with, bf16 comes back
exactly, and the command writes its table and JSON."""
from __future__ import annotations

import json

import numpy as np
import pytest

import fiddler_jax as fj
from fiddler_jax.analysis import expert_precision as X
from fiddler_jax.assets import default_model_path
from fiddler_jax.models import quantization as Q
from tests.test_cli_hardening import cli, one_error_line


def test_the_model_computes_with_the_dequantised_experts_and_bf16_restores_them():
    model = fj.load_pretrained(default_model_path(), dtype="float32", progress=False)
    experts = X.routed_expert_weights(model)
    saved = experts[0][1]["w2"][3].copy()
    nbytes = X.set_expert_precision(experts, "int4", 32)
    moe = experts[0][0]
    np.testing.assert_array_equal(np.asarray(moe.w2.value[3]), Q.dequantize(Q.quantize(saved, "int4", 32)))
    H, F = saved.shape
    assert nbytes == 2 * Q.expert_matrix_bytes(F, H, "int4", 32) + Q.expert_matrix_bytes(H, F, "int4", 32)
    X.set_expert_precision(experts, "bf16")
    np.testing.assert_array_equal(np.asarray(moe.w2.value[3]), saved)


def test_compare_counts_changed_routing_and_greedy_agreement():
    ref = {"nll": 10.0, "targets": 10, "sets": np.zeros((2, 4, 2), int), "greedy": np.zeros((2, 3), int)}
    var = {"nll": 11.0, "targets": 10, "sets": ref["sets"].copy(), "greedy": ref["greedy"].copy()}
    var["sets"][1, 0, 1] = 5  # one (token, layer) of 8 routes differently
    var["greedy"][1, 2] = 7   # one position of 6, one prompt of 2
    c = X.compare(ref, var)
    assert c["routing_change"] == pytest.approx(1 / 8) and c["routing_change_per_layer"] == [0.0, 0.25]
    assert c["greedy_token_agreement"] == pytest.approx(5 / 6) and c["greedy_prompts_equal"] == 0.5
    assert c["perplexity_change"] == pytest.approx(np.exp(1.1) / np.exp(1.0) - 1)


def test_quant_accuracy_writes_every_variant_and_refuses_bad_precisions(tmp_path):
    r = cli("quant-accuracy", "max_tokens=512", "seq_len=64", "prompts=2", "prompt_tokens=8", "new_tokens=4",
            "int4_groups=[32,64]", f"out={tmp_path / 'qa'}", cwd=tmp_path, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    data = json.loads((tmp_path / "qa" / "quant_accuracy.json").read_text())
    assert [(v["precision"], v["group"]) for v in data["variants"]] == [("int8", None), ("int4", 32), ("int4", 64)]
    int8 = data["variants"][0]
    assert abs(int8["perplexity_change"]) < 0.01 and 0.5 < int8["bytes_ratio"] < 0.52
    assert data["git_sha"] and data["hardware"] and data["config"]["seq_len"] == 64
    assert r.stdout.splitlines()[-1].startswith("int4") and "precision" in r.stdout.splitlines()[-5]
    one_error_line(cli("quant-accuracy", "precisions=[int8,fp8]", cwd=tmp_path), "unknown expert_precision 'fp8'")
    one_error_line(cli("quant-accuracy", "precisions=[int4]", "int4_groups=[48]", cwd=tmp_path),
                   "int4 group 48 is not supported")
