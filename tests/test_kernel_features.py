"""cpu_features(), path selection and the FIDDLER_KERNEL_* environment switches."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import fiddler_jax.kernels as K


def _in_subprocess(code: str, **env) -> str:
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, JAX_PLATFORMS="cpu", **env))
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip().splitlines()[-1]


def test_cpu_features_report():
    f = K.cpu_features()
    assert set(f) >= {"flags", "physical_cores", "logical_cpus", "threads", "supported_paths", "forced_path",
                      "amx_min_tokens", "path_for_n"}
    assert f["physical_cores"] >= 1 and f["threads"] >= 1
    assert "generic" in f["supported_paths"]
    flags = f["flags"]
    assert ("avx512_bf16" in f["supported_paths"]) == (flags["avx512_bf16"] and flags["os_avx512"])
    assert ("amx" in f["supported_paths"]) == (flags["amx_bf16"] and flags["amx_permitted"]
                                              and "avx512_bf16" in f["supported_paths"])
    for n, p in f["path_for_n"].items():
        assert p in f["supported_paths"]
        if "amx" in f["supported_paths"]:
            assert (p == "amx") == (n >= f["amx_min_tokens"])
        elif "avx512_bf16" in f["supported_paths"]:
            assert p == "avx512_bf16"


def test_forced_path_applies_to_every_n():
    try:
        K.set_kernel_path("generic")
        assert K.get_kernel_path() == "generic"
        assert set(K.cpu_features()["path_for_n"].values()) == {"generic"}
    finally:
        K.set_kernel_path("auto")


def test_environment_switches():
    code = ("import json, fiddler_jax.kernels as K; f = K.cpu_features(); "
            "print(json.dumps([f['forced_path'], f['threads'], f['amx_min_tokens']]))")
    out = json.loads(_in_subprocess(code, FIDDLER_KERNEL_PATH="generic", FIDDLER_KERNEL_THREADS="3",
                                    FIDDLER_AMX_MIN_N="100"))
    assert out == ["generic", 3, 100]
    if not K.path_supported("amx"):
        out = json.loads(_in_subprocess(code, FIDDLER_KERNEL_PATH="amx"))
        assert out[0] == "auto"  # unsupported: falls back, with a warning on stderr


def test_pinned_pool_runs():
    import numpy as np
    from fiddler_jax.kernels._testing import expert_inputs, expert_ref, rel_err
    try:
        K.set_num_threads(0, pin=True)
        x, w1, w3, w2 = expert_inputs(np.random.default_rng(0), 4, 64, 96)
        y = K.expert_ffn_numpy(x, w1, w3, w2, np.full((4, 64), np.nan, np.float32))
        assert rel_err(y, expert_ref(x, w1, w3, w2)) < 1e-2
    finally:
        K.set_num_threads(0)
