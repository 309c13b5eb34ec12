"""Issue 17, items 4 and 5 (kernel part): nothing a caller passes to the kernel may end the interpreter by a
signal or be cast silently.

- ``out`` buffers the kernel cannot write (read-only arrays and memmaps, wrong shape/dtype, non-contiguous,
  misaligned, not an array) raise a KernelError; a read-only memmap used to segfault.
- Thread counts: beyond ``max_threads()`` (set_num_threads or FIDDLER_KERNEL_THREADS), not an integer, or more
  threads than the machine can start, raise a KernelError; these used to abort on an uncaught C++ exception.
- Index arrays must be integers whose values are in range (int64 2**32 used to wrap to 0); routing weights must be
  float32 (float16/float64 used to be cast); the jnp op and the streamed lane refuse int64/float64 (JAX would wrap
  or round them). NaN activations propagate (documented); non-finite routing weights stay refused.

Calls that crashed the interpreter before the fix run in a subprocess, so on a broken build the test fails instead
of killing pytest."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest

import fiddler_jax.kernels as K
from fiddler_jax.kernels._testing import BF16, expert_inputs, expert_ref, grouped_inputs, grouped_ref, rel_err
from fiddler_jax.random_bits import random_bf16

pytestmark = pytest.mark.usefixtures("restore_kernel_settings")  # the tests change process-wide knobs


@pytest.fixture(autouse=True)
def _on_cpu_device():
    with jax.default_device(jax.devices("cpu")[0]):
        yield


def _run(code: str, **env) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter; a signal shows as a negative return code."""
    full_env = dict(os.environ, JAX_PLATFORMS="cpu")
    for k, v in env.items():
        full_env.pop(k, None)
        if v is not None:
            full_env[k] = v
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=180, env=full_env)


def _lines(proc: subprocess.CompletedProcess) -> list[str]:
    assert proc.returncode == 0, (f"the interpreter ended with code {proc.returncode} (negative: killed by signal "
                                  f"{-proc.returncode})\nstdout: {proc.stdout[-2000:]}\nstderr: {proc.stderr[-2000:]}")
    return proc.stdout.strip().splitlines()


# --------------------------------------------------------------------------------------------- out buffers

READ_ONLY_CHILD = """
import os, tempfile
import numpy as np
import fiddler_jax.kernels as K
from fiddler_jax.kernels._testing import expert_inputs
from fiddler_jax.random_bits import random_bf16

rng = np.random.default_rng(0)
x, w1, w3, w2 = expert_inputs(rng, 3, 16, 32)
gx = random_bf16(rng, (4, 16), std=1.0)
sw = [random_bf16(rng, s, std=0.2) for s in ((2, 32, 16), (2, 32, 16), (2, 16, 32))]
tok, exp, wts = np.array([0, 3], np.int32), np.array([1, 0], np.int32), np.array([1.0, 0.5], np.float32)

def outs(shape):
    path = os.path.join(tempfile.mkdtemp(), "out.bin")
    np.zeros(shape, np.float32).tofile(path)
    frozen = np.zeros(shape, np.float32)
    frozen.flags.writeable = False
    yield "memmap_r", np.memmap(path, dtype=np.float32, mode="r", shape=shape)
    yield "frozen", frozen
    yield "broadcast", np.broadcast_to(np.zeros(shape[1], np.float32), shape)

for kind, out in outs((3, 16)):
    try:
        K.expert_ffn_numpy(x, w1, w3, w2, out=out)
        print("ACCEPTED single", kind)
    except K.KernelError as e:
        print("REFUSED single", kind, "|", e)
for kind, out in outs((4, 16)):
    try:
        K.grouped_expert_ffn_numpy(gx, tok, exp, wts, *sw, out=out)
        print("ACCEPTED grouped", kind)
    except K.KernelError as e:
        print("REFUSED grouped", kind, "|", e)
"""


def test_read_only_out_is_refused_not_a_segfault():
    """A read-only np.memmap as ``out`` segfaulted (the kernel wrote to a page mapped read-only)."""
    lines = _lines(_run(READ_ONLY_CHILD))
    assert len(lines) == 6, lines
    for line in lines:
        assert line.startswith("REFUSED"), line
        msg = line.split("|", 1)[1]
        assert "out must be a writable" in msg and "got a read-only" in msg, msg


def _bad_outs():
    misaligned = np.zeros(3 * 16 * 4 + 1, np.uint8)[1:].view(np.float32).reshape(3, 16)
    return {
        "list": ([[0.0] * 16] * 3, "got list"),
        "None": (None, "got NoneType"),
        "float64": (np.zeros((3, 16)), "got dtype float64"),
        "float16": (np.zeros((3, 16), np.float16), "got dtype float16"),
        "int32": (np.zeros((3, 16), np.int32), "got dtype int32"),
        "shape": (np.zeros((16, 3), np.float32), "got shape (16, 3)"),
        "rank": (np.zeros(48, np.float32), "got shape (48,)"),
        "strided": (np.zeros((3, 32), np.float32)[:, ::2], "non-contiguous"),
        "fortran": (np.asfortranarray(np.zeros((3, 16), np.float32)), "non-contiguous"),
        "misaligned": (misaligned, "misaligned"),
    }


@pytest.mark.parametrize("kind", list(_bad_outs()))
def test_bad_out_buffers_raise_kernel_error(kind):
    out, text = _bad_outs()[kind]
    x, w1, w3, w2 = expert_inputs(np.random.default_rng(0), 3, 16, 32)
    with pytest.raises(K.KernelError, match="out must be a writable, C-contiguous numpy float32 or bfloat16") as e:
        K.expert_ffn_numpy(x, w1, w3, w2, out=out)
    assert text in str(e.value) and "\n" not in str(e.value), str(e.value)
    args = grouped_inputs(np.random.default_rng(1), T=3, hidden=16)
    with pytest.raises(K.KernelError, match="out must be") as e:
        K.grouped_expert_ffn_numpy(*args, out=out)
    assert text in str(e.value), str(e.value)


def test_writable_memmap_and_bf16_out_still_work(tmp_path):
    x, w1, w3, w2 = expert_inputs(np.random.default_rng(0), 3, 16, 32)
    path = tmp_path / "out.bin"
    np.full((3, 16), np.nan, np.float32).tofile(path)
    out = np.memmap(path, dtype=np.float32, mode="r+", shape=(3, 16))
    assert rel_err(K.expert_ffn_numpy(x, w1, w3, w2, out=out), expert_ref(x, w1, w3, w2)) < 1e-2
    out16 = np.full((3, 16), np.nan, BF16)
    assert rel_err(K.expert_ffn_numpy(x, w1, w3, w2, out=out16), expert_ref(x, w1, w3, w2)) < 1e-2


# --------------------------------------------------------------------------------------------- thread counts

def test_thread_count_beyond_the_cap_is_refused_and_keeps_the_pool():
    """set_num_threads(10**8) aborted the interpreter (std::system_error from std::thread, uncaught)."""
    lines = _lines(_run("""
        import numpy as np, fiddler_jax.kernels as K
        from fiddler_jax.kernels._testing import expert_inputs, expert_ref, rel_err
        K.set_num_threads(2)
        for n in (10**8, 2**31 - 1, getattr(K, "max_threads", lambda: 64)() + 1):
            try:
                K.set_num_threads(n)
                print("ACCEPTED", n)
            except K.KernelError as e:
                print("REFUSED |", e)
        print("THREADS", K.get_num_threads())
        x, w1, w3, w2 = expert_inputs(np.random.default_rng(0), 3, 16, 32)
        print("ERR", rel_err(K.expert_ffn_numpy(x, w1, w3, w2, np.full((3, 16), np.nan, np.float32)),
                             expert_ref(x, w1, w3, w2)))
    """))
    refused = [line for line in lines if line.startswith("REFUSED")]
    assert len(refused) == 3, lines
    cap = K.max_threads()
    assert cap >= 64 and cap >= 8 * K.cpu_features()["logical_cpus"]
    assert f"set_num_threads: n = 100000000 is more kernel threads than this machine allows (at most {cap}" \
        in refused[0]
    assert f"use 1..{cap}, or 0 for one thread per physical core" in refused[0]
    assert "THREADS 2" in lines and float(lines[-1].split()[1]) < 1e-2


def test_threads_that_cannot_start_are_a_kernel_error():
    """With the address space capped, 64 thread stacks cannot be mapped: std::thread throws std::system_error,
    which used to end the interpreter with SIGABRT. Now set_num_threads raises and the previous pool stays."""
    lines = _lines(_run("""
        import resource
        import numpy as np, fiddler_jax.kernels as K
        from fiddler_jax.kernels._testing import expert_inputs, expert_ref, rel_err
        K.set_num_threads(1)
        x, w1, w3, w2 = expert_inputs(np.random.default_rng(0), 3, 16, 32)
        out = np.full((3, 16), np.nan, np.float32)
        vm = int(next(l for l in open("/proc/self/status") if l.startswith("VmSize")).split()[1]) * 1024
        resource.setrlimit(resource.RLIMIT_AS, (vm + (32 << 20), resource.RLIM_INFINITY))
        try:
            K.set_num_threads(64)
            print("STARTED", K.get_num_threads())
        except K.KernelError as e:
            print("REFUSED |", e)
        print("THREADS", K.get_num_threads())
        resource.setrlimit(resource.RLIMIT_AS, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))  # numpy's BLAS
        print("ERR", rel_err(K.expert_ffn_numpy(x, w1, w3, w2, out), expert_ref(x, w1, w3, w2)))
    """))
    assert lines[0].startswith("REFUSED"), lines
    assert "cannot start 64 kernel threads" in lines[0] and "use fewer" in lines[0], lines[0]
    assert lines[1] == "THREADS 1" and float(lines[2].split()[1]) < 1e-2, lines


ENV_CHILD = """
import numpy as np, jax, fiddler_jax.kernels as K
from fiddler_jax.kernels._testing import expert_inputs, expert_ref, rel_err
x, w1, w3, w2 = expert_inputs(np.random.default_rng(0), 3, 16, 32)
out = np.full((3, 16), np.nan, np.float32)
for name, call in (("numpy", lambda: K.expert_ffn_numpy(x, w1, w3, w2, out)),
                   ("xla", lambda: np.asarray(K.expert_ffn(x, w1, w3, w2))),
                   ("get_num_threads", K.get_num_threads),
                   ("read_bandwidth", lambda: K.read_bandwidth([np.ones(4096, np.uint8)], reps=1))):
    try:
        call()
        print("ACCEPTED", name)
    except Exception as e:
        print("REFUSED", name, type(e).__name__, "|", str(e).splitlines()[-1])
K.set_num_threads(0)
print("RECOVERED", K.get_num_threads(), rel_err(K.expert_ffn_numpy(x, w1, w3, w2, out), expert_ref(x, w1, w3, w2)))
"""


@pytest.mark.parametrize("value,text", [("100000000", "is more kernel threads than this machine allows"),
                                        ("abc", "is not an integer")])
def test_environment_thread_count_is_refused_at_first_use(value, text):
    """FIDDLER_KERNEL_THREADS=100000000 aborted at the first kernel call; FIDDLER_KERNEL_THREADS=abc was ignored.
    Now every call that needs the pool raises a KernelError naming the variable, until set_num_threads."""
    lines = _lines(_run(ENV_CHILD, FIDDLER_KERNEL_THREADS=value))
    refused = [line for line in lines if line.startswith("REFUSED")]
    assert len(refused) == 4, lines
    for line in refused:
        assert f"FIDDLER_KERNEL_THREADS = {value if value.isdigit() else repr(value)}" in line, line
        assert text in line, line
        if " numpy " in line or "get_num_threads" in line or "read_bandwidth" in line:
            assert " KernelError " in line, line
    assert lines[-1].startswith("RECOVERED") and float(lines[-1].split()[2]) < 1e-2, lines


@pytest.mark.parametrize("call,text", [
    (lambda: K.set_num_threads(2.5), "set_num_threads: n must be an integer"),
    (lambda: K.set_num_threads("4"), "set_num_threads: n must be an integer"),
    (lambda: K.set_num_threads(True), "set_num_threads: n must be an integer"),
    (lambda: K.set_num_threads(10**30), "set_num_threads: n = 10000000000000000000000000000"),
    (lambda: K.set_pool(spin_us=10**7), "set_pool: spin_us = 10000000 is out of range; use 0..1000000"),
    (lambda: K.set_pool(spin_us=0.5), "set_pool: spin_us must be an integer"),
    (lambda: K.set_pool(spin_us=-1), "set_pool: spin_us = -1 is out of range"),
    (lambda: K.set_pool(streamed_spin_us=-2), "set_pool: streamed_spin_us = -2 is out of range"),
    (lambda: K.set_pool(streamed_spin_us=2 * 10**6), "set_pool: streamed_spin_us = 2000000 is out of range"),
    (lambda: K.set_amx_min_tokens(2**70), "set_amx_min_tokens: n = "),
    (lambda: K.set_tuning(amx_variant=7), "set_tuning: amx_variant = 7 is out of range"),
    (lambda: K.set_tuning(prefetch_bytes=2**40), "set_tuning: prefetch_bytes = "),
], ids=["threads-float", "threads-str", "threads-bool", "threads-huge", "spin-huge", "spin-float", "spin-negative",
        "streamed-spin-negative", "streamed-spin-huge", "amx-min-huge", "amx-variant", "prefetch-huge"])
def test_knob_arguments_are_checked(call, text):
    """These were cast with int() (2.5 -> 2, "4" -> 4) or overflowed in cffi with an OverflowError."""
    with pytest.raises(K.KernelError) as e:
        call()
    assert text in str(e.value) and "\n" not in str(e.value), str(e.value)


# -------------------------------------------------------------------------------------- indices and weights

@pytest.mark.parametrize("arg,value,text", [
    (1, np.array([0, 1, 2, 3, 2**32], np.int64), "token_idx[4] = 4294967296 is out of range [0, 4)"),
    (2, np.array([0, 1, 2, 0, 2**32 + 1], np.int64), "expert_idx[4] = 4294967297 is out of range [0, 3)"),
    (2, np.array([0, 1, 2, 0, 2**63 + 1], np.uint64), "expert_idx[4] = 9223372036854775809 is out of range"),
    (1, [0, 1, 2, 3, 2**32], "token_idx[4] = 4294967296"),
    (1, np.array([0, 1, 2, 3, -1], np.int64), "token_idx[4] = -1 is out of range"),
    (1, np.array([0, 1, 2, 3, 0], np.float32), "token_idx must be an integer array (int32"),
    (2, np.array([0, 1, 2, 0, 1.5]), "expert_idx must be an integer array (int32, or another integer dtype whose "
                                     "values are in [0, 3 experts)), got dtype float64"),
    (2, np.array([0, 1, 1, 0, 1], bool), "got dtype bool"),
], ids=["tok-int64-2**32", "exp-int64-2**32+1", "exp-uint64-huge", "tok-list-2**32", "tok-int64-negative",
        "tok-float32", "exp-float64", "exp-bool"])
def test_numpy_entry_refuses_indices_it_would_have_cast(arg, value, text):
    """np.ascontiguousarray(..., dtype=int32) turned 2**32 into 0 (a valid index: silently wrong) and 1.5 into 1."""
    args = grouped_inputs(np.random.default_rng(0))
    args[arg] = value
    with pytest.raises(K.KernelError) as e:
        K.grouped_expert_ffn_numpy(*args, out=np.zeros((4, 24), np.float32))
    assert text in str(e.value) and "\n" not in str(e.value), str(e.value)
    tables = K.ExpertTables(list(args[4]), list(args[5]), list(args[6]), hidden=24)
    with pytest.raises(K.KernelError):
        K.grouped_expert_ffn_numpy(*args[:4], tables, None, None, out=np.zeros((4, 24), np.float32))


@pytest.mark.parametrize("dtype", [np.int64, np.uint64, np.int16, np.uint8, "list"])
def test_numpy_entry_accepts_other_integer_indices_in_range(dtype):
    args = grouped_inputs(np.random.default_rng(0))
    want = K.grouped_expert_ffn_numpy(*args, out=np.zeros((4, 24), np.float32))
    for i in (1, 2):
        args[i] = args[i].tolist() if dtype == "list" else args[i].astype(dtype)
    got = K.grouped_expert_ffn_numpy(*args, out=np.zeros((4, 24), np.float32))
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("weights,text", [
    (np.array([0.5, 0.5, 1, 0.25, 0.1], np.float16), "got ndarray of dtype float16 and shape (5,)"),
    (np.array([0.5, 0.5, 1, 0.25, 0.1], np.float64), "got ndarray of dtype float64"),
    (np.array([0.5, 0.5, 1, 0.25, 0.1], BF16), "got ndarray of dtype bfloat16"),
    ([0.5, 0.5, 1, 0.25, 0.1], "got list"),
], ids=["float16", "float64", "bfloat16", "list"])
def test_numpy_entry_refuses_weights_that_are_not_float32(weights, text):
    args = grouped_inputs(np.random.default_rng(0))
    args[3] = weights
    with pytest.raises(K.KernelError, match="weights must be a numpy float32 array") as e:
        K.grouped_expert_ffn_numpy(*args, out=np.zeros((4, 24), np.float32))
    assert text in str(e.value) and "astype(np.float32)" in str(e.value), str(e.value)


@pytest.mark.parametrize("validate", [True, False])
@pytest.mark.parametrize("arg,value,text", [
    (1, np.array([0, 1, 2, 3, 2**32], np.int64), "token_idx must be int32, got int64"),
    (2, np.array([0, 1, 2, 0, 1], np.uint64), "expert_idx must be int32, got uint64"),
    (3, np.array([0.5, 0.5, 1, 0.25, 0.1], np.float64), "weights must be float32, got float64"),
])
def test_jnp_op_refuses_what_jax_would_narrow(arg, value, text, validate):
    """Without x64, jnp.asarray wraps int64 2**32 to 0 before any check could see it (so validate=False, which
    leaves checks to C++, was blind to it)."""
    args = grouped_inputs(np.random.default_rng(0))
    args[arg] = value
    with pytest.raises(TypeError) as e:
        np.asarray(K.grouped_expert_ffn(*args, validate=validate))
    assert text in str(e.value), str(e.value)
    x, w1, w3, w2 = expert_inputs(np.random.default_rng(0), 3, 16, 32)
    with pytest.raises(TypeError, match="x must be bfloat16, got float64"):
        K.expert_ffn(x.astype(np.float64), w1, w3, w2, validate=validate)


def test_streamed_lane_refuses_instead_of_casting():
    from fiddler_jax.kernels import streamed_lane as S

    rng = np.random.default_rng(0)
    tables = [[random_bf16(rng, s, std=0.2) for _ in range(4)] for s in ((48, 32), (48, 32), (32, 48))]
    tid = S.register_layer(K.ExpertTables(*tables, hidden=32), jax.devices("cpu")[0])
    try:
        x = random_bf16(rng, (2, 32), std=1.0)
        good_e, good_w = np.array([[0, 1], [2, 3]], np.int32), np.full((2, 2), 0.5, np.float32)
        assert np.isfinite(np.asarray(S.streamed_cpu_mix(x, good_e, good_w, tables=tid))).all()
        with pytest.raises(K.KernelError, match="streamed_cpu_mix: experts must be a int32 array, got int64"):
            S.streamed_cpu_mix(x, np.array([[0, 2**32 + 1], [2, 3]], np.int64), good_w, tables=tid)
        with pytest.raises(K.KernelError, match="streamed_cpu_mix: weights must be a float32 array, got float16"):
            S.streamed_cpu_mix(x, good_e, good_w.astype(np.float16), tables=tid)
    finally:
        S.unregister_layers([tid])


def test_engine_cpu_lane_still_casts_its_own_int64_routing():
    """The engine's CPU lane hands numpy int64 token/expert arrays to ``cpu_expert_mix``, which casts them to int32
    itself (values < 2**31 by construction); that path keeps working."""
    from fiddler_jax.runtime.lanes.cpu import cpu_expert_mix

    args = grouped_inputs(np.random.default_rng(0))
    x, tok, exp, wts, w1, w3, w2 = args
    tables = (list(w1), list(w3), list(w2))
    got = cpu_expert_mix(x, tok.astype(np.int64), exp.astype(np.int64), wts, tables)
    assert rel_err(got, grouped_ref(*args)) < 1e-2


# ------------------------------------------------------------------------------------------------------- NaN

@pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning")  # the float64 reference meets the NaN too
def test_nan_activations_propagate_to_their_rows_only():
    """Documented: NaN or inf in the activations reaches exactly the outputs that depend on it (the rows of that
    token); the kernel does not scan its inputs for them. Routing weights are checked (below)."""
    x, w1, w3, w2 = expert_inputs(np.random.default_rng(0), 4, 32, 48)
    x = x.copy()
    x[1, 5] = np.nan
    x[3, 0] = np.inf
    y = K.expert_ffn_numpy(x, w1, w3, w2, np.zeros((4, 32), np.float32))
    assert np.isnan(y[1]).all() and not np.isfinite(y[3]).any()
    ref = expert_ref(x, w1, w3, w2)
    assert rel_err(y[[0, 2]], ref[[0, 2]]) < 1e-2
    args = grouped_inputs(np.random.default_rng(0))
    args[0] = args[0].copy()
    args[0][2, 3] = np.nan
    g = K.grouped_expert_ffn_numpy(*args, out=np.zeros((4, 24), np.float32))
    assert np.isnan(g[2]).all() and np.isfinite(g[[0, 1, 3]]).all()
    args[3] = np.array([0.5, np.nan, 1, 1, 1], np.float32)
    with pytest.raises(K.KernelError, match=r"weights\[1\] = nan: routing weights must be finite and >= 0"):
        K.grouped_expert_ffn_numpy(*args, out=np.zeros((4, 24), np.float32))


# ----------------------------------------------------------------------------------------------------- fuzzer

def test_fuzzer_with_environment_knobs_in_subprocess():
    """The widened fuzzer (index dtypes, NaN, bad out buffers, knobs) including one run in a fresh interpreter
    with random FIDDLER_KERNEL_* values. The long runs (1000 cases, several seeds) are run by hand."""
    proc = _run("import sys, runpy; sys.argv = ['_fuzz', '--cases', '12', '--seed', '7', '--env-every', '12']; "
                "runpy.run_module('fiddler_jax.kernels._fuzz', run_name='__main__')")
    assert proc.returncode == 0, f"fuzz failed (rc={proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    assert "fuzz ok" in proc.stdout and "env-" in proc.stdout, proc.stdout
