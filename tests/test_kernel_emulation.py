"""The AVX512_BF16 and AMX kernels' logic (blocking, masking, VNNI packing, tile tails, row splits), checked
on any CPU: the same sources compiled against scalar stand-ins for their intrinsics
(xla_ffi/emulation/isa_emulation.h). The real instructions are exercised by test_kernel_paths.py where the
CPU has them (the device machine)."""
from __future__ import annotations

import ctypes
import os
import shutil
import subprocess

import numpy as np
import pytest

from fiddler_jax.kernels._testing import expert_inputs, expert_ref, rel_err

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SRC = os.path.join(ROOT, "xla_ffi")
PATH_IDS = {"avx512_bf16": 3, "amx": 4}
# kernel_amx.cc defaults: kc, mb, pass, prefetch, blocked_from, pipeline
AMX_DEFAULTS = (0, 128, 32, 1, 3, 1)


@pytest.fixture(scope="module")
def emu(tmp_path_factory):
    cxx = shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        pytest.skip("no C++ compiler")
    so = str(tmp_path_factory.mktemp("emu") / "emu.so")
    subprocess.run([cxx, "-std=c++17", "-O2", "-fPIC", "-shared", "-DFIDDLER_ISA_EMULATION", "-I", SRC,
                    os.path.join(SRC, "emulation", "emulation_harness.cc"), os.path.join(SRC, "kernel_avx512.cc"),
                    os.path.join(SRC, "kernel_amx.cc"), "-o", so], check=True)
    lib = ctypes.CDLL(so)
    lib.fj_emu_expert_ffn.restype = ctypes.c_int
    lib.fj_emu_expert_ffn.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64,
                                      ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
                                      ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_int]
    lib.fj_emu_set_amx_blocking.argtypes = [ctypes.c_int] * 6
    return lib


def run(lib, path, x, w1, w3, w2, nsplit, group_kib=1024, variant=0):
    n, hidden = x.shape
    ffn = w1.shape[0]
    y = np.full((n, hidden), np.nan, np.float32)
    args = [np.ascontiguousarray(a) for a in (x, w1, w3, w2)]
    lib.fj_emu_expert_ffn(PATH_IDS[path], args[0].ctypes.data, n, hidden, ffn, args[1].ctypes.data,
                          args[2].ctypes.data, args[3].ctypes.data, y.ctypes.data, nsplit, group_kib, variant)
    return y


@pytest.mark.parametrize("path", ["avx512_bf16", "amx"])
@pytest.mark.parametrize("n,hidden,ffn,nsplit", [
    (1, 64, 96, 1), (3, 40, 72, 2), (17, 33, 50, 3), (2, 96, 31, 4), (33, 70, 47, 5), (40, 64, 64, 7),
])
def test_emulated_path_matches_reference(emu, path, n, hidden, ffn, nsplit):
    rng = np.random.default_rng([n, hidden, ffn, nsplit])
    x, w1, w3, w2 = expert_inputs(rng, n, hidden, ffn)
    y = run(emu, path, x, w1, w3, w2, nsplit)
    assert rel_err(y, expert_ref(x, w1, w3, w2)) < 1e-2


@pytest.mark.parametrize("path", ["avx512_bf16", "amx"])
def test_emulated_split_invariance(emu, path):
    rng = np.random.default_rng(7)
    x, w1, w3, w2 = expert_inputs(rng, 19, 48, 80)
    ys = [run(emu, path, x, w1, w3, w2, s) for s in (1, 3, 5)]
    assert np.array_equal(ys[0], ys[1]) and np.array_equal(ys[0], ys[2])


def test_emulated_amx_token_groups(emu):
    # A 1 KiB activation budget forces groups of 2 token tiles: 5 tiles -> groups of 2, 2, 1.
    rng = np.random.default_rng(11)
    x, w1, w3, w2 = expert_inputs(rng, 70, 64, 45)
    y = run(emu, "amx", x, w1, w3, w2, 3, group_kib=1)
    assert rel_err(y, expert_ref(x, w1, w3, w2)) < 1e-2
    assert np.array_equal(y, run(emu, "amx", x, w1, w3, w2, 1))


@pytest.mark.parametrize("n,hidden,ffn", [(70, 64, 45), (300, 33, 50), (40, 600, 47)])
def test_emulated_amx_variants_agree(emu, n, hidden, ffn):
    """Direct and k-chunked AMX variants (several k-chunks, several 256-token passes) give identical bits."""
    rng = np.random.default_rng([n, hidden, ffn])
    x, w1, w3, w2 = expert_inputs(rng, n, hidden, ffn)
    y1 = run(emu, "amx", x, w1, w3, w2, 3, variant=1)
    y2 = run(emu, "amx", x, w1, w3, w2, 3, variant=2)
    assert rel_err(y2, expert_ref(x, w1, w3, w2)) < 1e-2
    assert np.array_equal(y1, y2)


@pytest.mark.parametrize("n,hidden,ffn,nsplit", [(70, 64, 45, 3), (300, 33, 50, 2), (40, 600, 47, 3),
                                                 (17, 130, 200, 4), (600, 70, 90, 1)])
@pytest.mark.parametrize("kc,mb,passes,prefetch,pipeline", [
    (0, 128, 32, 1, 1), (8, 128, 32, 1, 1), (1, 16, 1, 0, 1), (3, 48, 3, 1, 0), (16, 1024, 64, 1, 1),
    (2, 32, 2, 0, 1), (64, 128, 2, 1, 1)])
def test_emulated_amx_blocked_agrees(emu, n, hidden, ffn, nsplit, kc, mb, passes, prefetch, pipeline):
    """The blocked AMX variant (several k-chunks, m-blocks of several tile pairs with partial last blocks,
    several token passes, panel prefetch and the pipelined micro-kernel on and off) gives the plain direct
    variant's bits."""
    rng = np.random.default_rng([n, hidden, ffn, kc, mb])
    x, w1, w3, w2 = expert_inputs(rng, n, hidden, ffn)
    emu.fj_emu_set_amx_blocking(-1, -1, -1, -1, -1, 0)
    y1 = run(emu, "amx", x, w1, w3, w2, nsplit, variant=1)
    emu.fj_emu_set_amx_blocking(kc, mb, passes, prefetch, -1, pipeline)
    try:
        y3 = run(emu, "amx", x, w1, w3, w2, nsplit, variant=3)
    finally:
        emu.fj_emu_set_amx_blocking(*AMX_DEFAULTS)
    assert rel_err(y3, expert_ref(x, w1, w3, w2)) < 1e-2
    assert np.array_equal(y1, y3)


@pytest.mark.parametrize("n,hidden,ffn,nsplit", [(70, 64, 96, 3), (40, 96, 64, 2), (33, 64, 50, 1), (70, 33, 64, 2)])
def test_emulated_amx_direct_pipelined_agrees(emu, n, hidden, ffn, nsplit):
    """The direct variant's pipelined micro-kernel (whole tiles in place; partial ones take the plain loop)
    gives the plain loop's bits."""
    rng = np.random.default_rng([n, hidden, ffn, 3])
    x, w1, w3, w2 = expert_inputs(rng, n, hidden, ffn)
    ys = []
    for pipeline in (0, 1):
        emu.fj_emu_set_amx_blocking(-1, -1, -1, -1, -1, pipeline)
        ys.append(run(emu, "amx", x, w1, w3, w2, nsplit, variant=1))
    emu.fj_emu_set_amx_blocking(*AMX_DEFAULTS)
    assert rel_err(ys[1], expert_ref(x, w1, w3, w2)) < 1e-2
    assert np.array_equal(ys[0], ys[1])


def test_emulated_amx_auto_switches_variant(emu):
    """Auto uses the direct variant below the blocked threshold and the blocked one from it: same bits."""
    rng = np.random.default_rng(5)
    x, w1, w3, w2 = expert_inputs(rng, 50, 96, 70)  # 4 token tiles
    emu.fj_emu_set_amx_blocking(-1, -1, -1, -1, 5, -1)
    y_direct = run(emu, "amx", x, w1, w3, w2, 2, variant=0)
    emu.fj_emu_set_amx_blocking(2, 32, 2, 1, 2, -1)
    try:
        y_blocked = run(emu, "amx", x, w1, w3, w2, 2, variant=0)
    finally:
        emu.fj_emu_set_amx_blocking(*AMX_DEFAULTS)
    assert np.array_equal(y_direct, y_blocked)
