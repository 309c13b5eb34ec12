"""Bad input must raise a Python exception naming the argument -- from the Python checks and, with them
skipped, from the C++ FFI handler -- and never crash. A fuzz run lives in a subprocess so a crash fails the
test instead of killing pytest."""
from __future__ import annotations

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fiddler_jax.kernels as K
from fiddler_jax.kernels._testing import BF16, expert_inputs, grouped_inputs

HERE = os.path.dirname(os.path.abspath(__file__))


def _good(rng, n=3, hidden=24, ffn=40):
    return list(expert_inputs(rng, n, hidden, ffn))


@pytest.fixture(autouse=True)
def _on_cpu_device():
    """The kernel is registered for platform "cpu": run eager calls there even where a GPU is the default."""
    with jax.default_device(jax.devices("cpu")[0]):
        yield


# (description, index of the argument to replace, replacement factory, text the message must contain)
SINGLE_CASES = [
    ("x rank 1", 0, lambda a: a[0][0], "x must have rank 2"),
    ("x float32", 0, lambda a: a[0].astype(np.float32), "x must be bfloat16"),
    ("w1 hidden mismatch", 1, lambda a: a[1][:, :-1], "w1"),
    ("w3 shape mismatch", 2, lambda a: a[2][:-1], "w3"),
    ("w2 transposed", 3, lambda a: np.ascontiguousarray(a[3].T), "w2"),
    ("w2 int32", 3, lambda a: a[3].astype(np.int32), "w2 must be bfloat16"),
]

GROUPED_CASES = [
    ("hidden rank 3", 0, lambda a: a[0][None], "hidden must have rank 2"),
    ("token_idx int64->float", 1, lambda a: a[1].astype(np.float32), "token_idx must be int32"),
    ("token_idx out of range", 1, lambda a: np.array([0, 1, 2, 4, 0], np.int32), "token_idx[3] = 4"),
    ("token_idx negative", 1, lambda a: np.array([0, -1, 2, 3, 0], np.int32), "token_idx[1] = -1"),
    ("expert_idx out of range", 2, lambda a: np.array([0, 1, 3, 0, 2], np.int32), "expert_idx[2] = 3"),
    ("expert_idx negative", 2, lambda a: np.array([0, 1, 2, -7, 2], np.int32), "expert_idx[3] = -7"),
    ("expert_idx length", 2, lambda a: a[2][:-1], "expert_idx"),
    ("weights NaN", 3, lambda a: np.array([0.5, np.nan, 1, 1, 1], np.float32), "weights[1]"),
    ("weights negative", 3, lambda a: np.array([0.5, 1, -0.1, 1, 1], np.float32), "weights[2]"),
    ("weights inf", 3, lambda a: np.array([0.5, 1, 1, np.inf, 1], np.float32), "weights[3]"),
    ("weights bf16", 3, lambda a: a[3].astype(BF16), "weights must be float32"),
    ("w1 hidden mismatch", 4, lambda a: a[4][:, :, :-1], "w1"),
    ("w3 expert count", 5, lambda a: a[5][:-1], "w3"),
    ("w2 wrong layout", 6, lambda a: np.ascontiguousarray(np.swapaxes(a[6], 1, 2)), "w2"),
]

XLA_ERRORS = (Exception,)  # jax raises JaxRuntimeError (XlaRuntimeError on older versions)


@pytest.mark.parametrize("desc,i,make,text", SINGLE_CASES, ids=[c[0] for c in SINGLE_CASES])
def test_single_bad_input_from_cpp(desc, i, make, text):
    args = _good(np.random.default_rng(0))
    args[i] = make(args)
    with pytest.raises(XLA_ERRORS) as info:
        np.asarray(K.expert_ffn(*args, validate=False))
    assert text in str(info.value), str(info.value)
    with pytest.raises((TypeError, ValueError)) as info:
        K.expert_ffn(*args)
    assert ["x", "w1", "w3", "w2"][i] in str(info.value)


@pytest.mark.parametrize("desc,i,make,text", GROUPED_CASES, ids=[c[0] for c in GROUPED_CASES])
def test_grouped_bad_input_from_cpp(desc, i, make, text):
    args = grouped_inputs(np.random.default_rng(0))
    args[i] = make(args)
    with pytest.raises(XLA_ERRORS) as info:
        np.asarray(K.grouped_expert_ffn(*args, validate=False))
    assert text in str(info.value), str(info.value)
    # The direct entry checks the same things (value checks live in C++ only).
    if i not in (0, 1, 3) or "range" in desc or "negative" in desc or "NaN" in desc or "inf" in desc:
        with pytest.raises(K.KernelError):
            K.grouped_expert_ffn_numpy(*args, out=np.zeros((4, 24), np.float32))


def test_python_validation_names_argument():
    args = grouped_inputs(np.random.default_rng(0))
    bad = list(args)
    bad[2] = args[2].astype(np.int64) if False else args[2].astype(np.float32)
    with pytest.raises(TypeError, match="expert_idx"):
        K.grouped_expert_ffn(*bad)
    with pytest.raises(TypeError, match="out_dtype"):
        K.expert_ffn(*_good(np.random.default_rng(0)), out_dtype=jnp.int32)


def test_path_forcing_rejects_unknown_and_unsupported():
    with pytest.raises(ValueError):
        K.set_kernel_path("sse9")
    for p in ("avx2", "avx512_bf16", "amx"):
        if not K.path_supported(p):
            with pytest.raises(RuntimeError):
                K.set_kernel_path(p)
    assert K.get_kernel_path() == "auto"


def test_fuzz_in_subprocess():
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-m", "fiddler_jax.kernels._fuzz", "--cases", "60", "--seed", "1"],
                          capture_output=True, text=True, timeout=240, env=env)
    assert proc.returncode == 0, f"fuzz crashed (rc={proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    assert "fuzz ok" in proc.stdout
