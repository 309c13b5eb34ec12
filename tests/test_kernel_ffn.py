"""Numerics of the CPU expert kernel against a float64 numpy reference, per forced path, through the direct
entry (poisoned output buffers) and through jax.jit (XLA FFI custom call)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fiddler_jax.kernels as K
from fiddler_jax.kernels._testing import BF16, expert_inputs, expert_ref, grouped_ref, rel_err
from fiddler_jax.random_bits import random_bf16

SUPPORTED = K.cpu_features()["supported_paths"]
ALL_PATHS = ["generic", "avx2", "avx512_bf16", "amx"]
SHAPES = [(1, 64, 160), (3, 100, 72), (17, 130, 350), (300, 96, 200), (5, 33, 17)]

pytestmark = pytest.mark.usefixtures("restore_kernel_settings")  # the tests change process-wide knobs


def _params(paths):
    return [pytest.param(p, marks=pytest.mark.skipif(p != "auto" and p not in SUPPORTED, reason=f"CPU lacks {p}"))
            for p in paths]


@pytest.fixture(autouse=True)
def _on_cpu_device():
    """The kernel is registered for platform "cpu": run eager calls there even where a GPU is the default."""
    with jax.default_device(jax.devices("cpu")[0]):
        yield


@pytest.fixture
def path(request):
    K.set_kernel_path(request.param)
    yield request.param
    K.set_kernel_path("auto")


@pytest.mark.parametrize("path", _params(ALL_PATHS), indirect=True)
@pytest.mark.parametrize("n,hidden,ffn", SHAPES)
@pytest.mark.parametrize("out_dtype", [np.float32, BF16])
def test_direct_entry_poisoned(path, n, hidden, ffn, out_dtype):
    rng = np.random.default_rng([n, hidden, ffn])
    x, w1, w3, w2 = expert_inputs(rng, n, hidden, ffn)
    out = np.full((n, hidden), np.nan, out_dtype)
    K.expert_ffn_numpy(x, w1, w3, w2, out)
    assert rel_err(out, expert_ref(x, w1, w3, w2)) <= 1e-2


@pytest.mark.parametrize("path", _params(ALL_PATHS), indirect=True)
@pytest.mark.parametrize("n,hidden,ffn", SHAPES[:3])
def test_jit_matches_reference(path, n, hidden, ffn):
    rng = np.random.default_rng([n, hidden, ffn, 1])
    x, w1, w3, w2 = expert_inputs(rng, n, hidden, ffn)
    ref = expert_ref(x, w1, w3, w2)
    y = jax.jit(K.expert_ffn)(x, w1, w3, w2)
    assert y.dtype == jnp.bfloat16 and y.shape == (n, hidden)
    assert rel_err(y, ref) <= 1e-2
    y32 = jax.jit(lambda *a: K.expert_ffn(*a, out_dtype=jnp.float32))(x, w1, w3, w2)
    assert y32.dtype == jnp.float32
    assert rel_err(y32, ref) <= 1e-2


def _routing(rng, T, E, top_k=2, skip=()):
    tok, exp, wts = [], [], []
    for t in range(T):
        if t in skip:
            continue
        for e in rng.choice(E, size=top_k, replace=False):
            tok.append(t)
            exp.append(int(e))
            wts.append(float(rng.uniform(0.05, 1.0)))
    return np.array(tok, np.int32), np.array(exp, np.int32), np.array(wts, np.float32)


def _stacked(rng, E, hidden, ffn):
    w1 = random_bf16(rng, (E, ffn, hidden), std=hidden ** -0.5)
    w3 = random_bf16(rng, (E, ffn, hidden), std=hidden ** -0.5)
    w2 = random_bf16(rng, (E, hidden, ffn), std=ffn ** -0.5)
    return w1, w3, w2


@pytest.mark.parametrize("path", _params(["auto"] + ALL_PATHS), indirect=True)
@pytest.mark.parametrize("T,E,hidden,ffn", [(9, 4, 72, 100), (1, 8, 64, 96), (40, 3, 33, 50)])
def test_grouped_equals_sum_of_singles(path, T, E, hidden, ffn):
    rng = np.random.default_rng([T, E, hidden, ffn])
    x = random_bf16(rng, (T, hidden), std=1.0)
    w1, w3, w2 = _stacked(rng, E, hidden, ffn)
    tok, exp, wts = _routing(rng, T, E, skip={T // 2} if T > 2 else ())
    out = np.full((T, hidden), np.nan, np.float32)
    K.grouped_expert_ffn_numpy(x, tok, exp, wts, w1, w3, w2, out)
    # Reference 1: the sum of single-expert calls, each on exactly the tokens routed to that expert.
    singles = np.zeros((T, hidden), np.float32)
    per_expert = {}
    for e in range(E):
        rows = tok[exp == e]
        if len(rows):
            y = np.full((len(rows), hidden), np.nan, np.float32)
            per_expert[e] = (rows, K.expert_ffn_numpy(x[rows], w1[e], w3[e], w2[e], y))
    for a, (t, e, w) in enumerate(zip(tok, exp, wts)):
        rows, y = per_expert[e]
        i = int(np.flatnonzero(exp[: a + 1] == e).size - 1)
        assert rows[i] == t
        singles[t] += np.float32(w) * y[i]
    np.testing.assert_allclose(out, singles, rtol=1e-5, atol=1e-6)
    # Reference 2: float64.
    assert rel_err(out, grouped_ref(x, tok, exp, wts, w1, w3, w2)) <= 1e-2
    if T > 2:
        assert np.all(out[T // 2] == 0)  # a token with no assignment gets zeros
    # Through XLA, bf16 out.
    y = jax.jit(K.grouped_expert_ffn)(x, tok, exp, wts, w1, w3, w2)
    assert rel_err(y, grouped_ref(x, tok, exp, wts, w1, w3, w2)) <= 1e-2


def test_grouped_mixed_batch_sizes():
    """Experts with very different token counts in one call (auto may pick different paths per expert)."""
    rng = np.random.default_rng(5)
    T, E, hidden, ffn = 80, 3, 64, 72
    x = random_bf16(rng, (T, hidden), std=1.0)
    w1, w3, w2 = _stacked(rng, E, hidden, ffn)
    tok = np.concatenate([np.arange(T), [3], np.arange(0, T, 7)]).astype(np.int32)
    exp = np.concatenate([np.zeros(T), [1], np.full(len(range(0, T, 7)), 2)]).astype(np.int32)
    wts = rng.uniform(0, 1, len(tok)).astype(np.float32)
    out = np.full((T, hidden), np.nan, BF16)
    K.grouped_expert_ffn_numpy(x, tok, exp, wts, w1, w3, w2, out)
    assert rel_err(out, grouped_ref(x, tok, exp, wts, w1, w3, w2)) <= 1e-2


@pytest.mark.parametrize("path", _params(["auto"] + ALL_PATHS), indirect=True)
def test_grouped_per_expert_tables_equal_stacks(path):
    """Experts held in separate buffers (the engine's pinned host experts) give bit-identical results to one
    stack; an unused expert may be absent (None), a used one may not."""
    rng = np.random.default_rng(11)
    T, E, hidden, ffn = 12, 5, 72, 100
    x = random_bf16(rng, (T, hidden), std=1.0)
    w1, w3, w2 = _stacked(rng, E, hidden, ffn)
    tok, exp, wts = _routing(rng, T, E)
    keep = exp != 2
    tok, exp, wts = tok[keep], exp[keep], wts[keep]
    stacked = K.grouped_expert_ffn_numpy(x, tok, exp, wts, w1, w3, w2, np.full((T, hidden), np.nan, np.float32))

    def table(w):
        return [None if e == 2 else np.array(w[e]) for e in range(E)]  # separate allocations

    tables = K.grouped_expert_ffn_numpy(x, tok, exp, wts, table(w1), table(w3), table(w2),
                                        np.full((T, hidden), np.nan, np.float32))
    np.testing.assert_array_equal(tables, stacked)
    with pytest.raises(K.KernelError, match=r"expert_idx\[0\] = 2 has no weights"):
        K.grouped_expert_ffn_numpy(x, np.array([0], np.int32), np.array([2], np.int32), np.ones(1, np.float32),
                                   table(w1), table(w3), table(w2), np.zeros((T, hidden), np.float32))
    bad = table(w1)
    bad[0] = np.asfortranarray(bad[0])
    with pytest.raises(K.KernelError, match=r"w1\[0\] must be C-contiguous"):
        K.grouped_expert_ffn_numpy(x, tok, exp, wts, bad, table(w3), table(w2), np.zeros((T, hidden), np.float32))
    with pytest.raises(K.KernelError, match=r"w2\[0\] must be a numpy bfloat16 array of shape \(72, 100\)"):
        K.grouped_expert_ffn_numpy(x, tok, exp, wts, table(w1), table(w3), [w1[0]] * E,
                                   np.zeros((T, hidden), np.float32))


@pytest.mark.parametrize("path", _params(ALL_PATHS), indirect=True)
def test_thread_count_does_not_change_results(path):
    rng = np.random.default_rng(3)
    x, w1, w3, w2 = expert_inputs(rng, 37, 130, 270)
    T, E = 21, 5
    xg = random_bf16(rng, (T, 130), std=1.0)
    sw1, sw3, sw2 = _stacked(rng, E, 130, 270)
    tok, exp, wts = _routing(rng, T, E)
    results = []
    for threads in (1, 2, 3):
        K.set_num_threads(threads)
        assert K.get_num_threads() == threads
        y = K.expert_ffn_numpy(x, w1, w3, w2, np.full((37, 130), np.nan, np.float32))
        g = K.grouped_expert_ffn_numpy(xg, tok, exp, wts, sw1, sw3, sw2, np.full((T, 130), np.nan, np.float32))
        results.append((y, g))
    for y, g in results[1:]:
        assert np.array_equal(y, results[0][0])
        assert np.array_equal(g, results[0][1])


def test_pool_with_sleeping_and_oversubscribed_workers_gives_the_same_bits():
    """Slots are claimed by whoever is awake: with 8 threads on this machine's few cores and no spin (workers
    sleep between calls and wake late), every call still runs every slot once -- the bits equal the 1-thread
    result, call after call, from the main thread and from another Python thread, under both pool contracts."""
    import threading

    rng = np.random.default_rng(4)
    T, E, hidden, ffn = 19, 4, 64, 200
    xg = random_bf16(rng, (T, hidden), std=1.0)
    sw1, sw3, sw2 = _stacked(rng, E, hidden, ffn)
    tok, exp, wts = _routing(rng, T, E)
    K.set_num_threads(1)
    want = K.grouped_expert_ffn_numpy(xg, tok, exp, wts, sw1, sw3, sw2, np.zeros((T, hidden), np.float32))
    K.set_num_threads(8)
    for wait_all in (False, True):
        K.set_pool(spin_us=0, wait_all=wait_all)
        got = []

        def calls(n=25):
            for _ in range(n):
                got.append(K.grouped_expert_ffn_numpy(xg, tok, exp, wts, sw1, sw3, sw2,
                                                      np.full((T, hidden), np.nan, np.float32)))

        calls()
        worker = threading.Thread(target=calls)
        worker.start()
        worker.join()
        assert len(got) == 50
        for g in got:
            assert np.array_equal(g, want)
    with pytest.raises(ValueError, match="spin_us"):
        K.set_pool(spin_us=-1)


def test_expert_tables_made_once_give_the_same_bits_and_refuse_a_mismatch():
    """``ExpertTables`` (the engine's CPU lane makes one per layer) computes what the per-call lists compute, and
    its misuse gets a KernelError naming the problem."""
    rng = np.random.default_rng(5)
    T, E, hidden, ffn = 9, 4, 64, 96
    xg = random_bf16(rng, (T, hidden), std=1.0)
    sw1, sw3, sw2 = _stacked(rng, E, hidden, ffn)
    tok, exp, wts = _routing(rng, T, E)
    lists = [list(w) for w in (sw1, sw3, sw2)]
    want = K.grouped_expert_ffn_numpy(xg, tok, exp, wts, *lists, np.zeros((T, hidden), np.float32))
    tables = K.ExpertTables(*lists, hidden=hidden)
    for _ in range(2):  # reusable
        got = K.grouped_expert_ffn_numpy(xg, tok, exp, wts, tables, None, None, np.zeros((T, hidden), np.float32))
        assert np.array_equal(got, want)
    with pytest.raises(K.KernelError, match="made for hidden size 64"):
        K.grouped_expert_ffn_numpy(random_bf16(rng, (T, 32), std=1.0), tok, exp, wts, tables, None, None,
                                   np.zeros((T, 32), np.float32))
    with pytest.raises(K.KernelError, match="entries; they must be equal"):
        K.ExpertTables(lists[0], lists[1][:2], lists[2], hidden=hidden)
    with pytest.raises(K.KernelError, match=r"w2\[1\] must be a numpy bfloat16 array of shape \(64, 96\)"):
        K.ExpertTables(lists[0], lists[1], [lists[2][0], lists[2][1].T.copy()] + lists[2][2:], hidden=hidden)


def test_empty_and_degenerate_shapes():
    rng = np.random.default_rng(1)
    x, w1, w3, w2 = expert_inputs(rng, 0, 16, 8)
    assert K.expert_ffn(x, w1, w3, w2).shape == (0, 16)
    # ffn == 0: the FFN is identically zero
    x = random_bf16(rng, (3, 16), std=1.0)
    y = K.expert_ffn_numpy(x, np.zeros((0, 16), BF16), np.zeros((0, 16), BF16), np.zeros((16, 0), BF16),
                           np.full((3, 16), np.nan, np.float32))
    assert np.all(y == 0)
    # no assignments: zeros
    w1s, w3s, w2s = _stacked(rng, 2, 16, 8)
    e = np.zeros(0, np.int32)
    g = K.grouped_expert_ffn(x, e, e, np.zeros(0, np.float32), w1s, w3s, w2s)
    assert np.all(np.asarray(g, np.float32) == 0)


# kernel_amx.cc defaults
AMX_DEFAULTS = dict(amx_variant=0, amx_kc=0, amx_mb=128, amx_pass=32, amx_prefetch=1, amx_blocked_from=3,
                    amx_pipeline=1)


@pytest.mark.skipif("amx" not in SUPPORTED, reason="CPU lacks AMX")
@pytest.mark.parametrize("n,hidden,ffn", [(300, 600, 530), (100, 256, 352)])  # odd sizes; all tiles in place
def test_amx_variants_identical(n, hidden, ffn):
    rng = np.random.default_rng([9, n])
    x, w1, w3, w2 = expert_inputs(rng, n, hidden, ffn)
    K.set_kernel_path("amx")
    ys = []
    # direct, k-chunked, blocked with default and with odd blockings (partial chunks, m-blocks, passes)
    for variant, blocking in ((1, dict(amx_pipeline=0)), (1, {}), (2, {}), (3, {}),
                              (3, dict(amx_kc=3, amx_mb=48, amx_pass=3, amx_prefetch=0, amx_pipeline=0)),
                              (3, dict(amx_kc=16, amx_mb=512, amx_pass=7, amx_prefetch=1))):
        K.set_tuning(amx_variant=variant, **blocking)
        ys.append(K.expert_ffn_numpy(x, w1, w3, w2, np.full((n, hidden), np.nan, np.float32)))
        K.set_tuning(**AMX_DEFAULTS)
    K.set_kernel_path("auto")
    assert rel_err(ys[1], expert_ref(x, w1, w3, w2)) <= 1e-2
    for y in ys[1:]:
        assert np.array_equal(ys[0], y)


def test_read_bandwidth_reads_every_buffer_and_refuses_bad_input():
    """The CPU lane's read ceiling (``kernels.read_bandwidth``): a positive rate over any C-contiguous buffers,
    including odd sizes the 8-stream split leaves a tail of; a KernelError for what it cannot read."""
    buffers = [np.ones(1 << 20, np.uint8), np.ones(12345, np.uint16),
               random_bf16(np.random.default_rng(0), (7, 33), std=1.0)]
    assert K.read_bandwidth(buffers, reps=2) > 0
    # one pass reads every byte of every buffer: its checksum is the sum of the buffers' own, and changes with the
    # last word of any buffer (a slice or a buffer left out would not)
    whole = K.read_checksum(buffers)
    assert whole == sum(K.read_checksum([b]) for b in buffers) % 2**64
    for b in buffers:
        flat = b.reshape(-1).view(np.uint8)
        flat[-1] ^= 0x5A
        assert K.read_checksum(buffers) != whole
        flat[-1] ^= 0x5A
    assert K.read_checksum(buffers) == whole
    for bad in ([], [np.ones((8, 8))[:, ::2]], ["not an array"]):
        with pytest.raises(K.KernelError, match="C-contiguous"):
            K.read_bandwidth(bad)
    with pytest.raises(K.KernelError, match="reps"):
        K.read_bandwidth(buffers, reps=0)
