"""Per-call overhead of the CPU expert kernel's grouped call at fine-grained MoE shapes (a script, not a test).

    python benchmarks/kernel_overhead.py [--threads N] [--rounds 5] [--calls 40] [--gap-ms 1] [--pool-gib 1]
                                         [--prefetch 0,16384] [--x-offset 0] [--no-mixtral] [--before-lib PATH.so]
                                         [--json PATH]

The call timed is the one the engine's CPU lane makes (``fiddler_jax/runtime/lanes/cpu.py`` ->
``grouped_expert_ffn_numpy`` over per-expert tables -> ``fj_grouped_expert_ffn_tables``): n tokens each routed
to the same k experts (``k`` experts per call, ``n`` tokens per expert, A = n x k assignments), float32 out;
the activations start on a 64-byte boundary (``--x-offset`` moves them), as in the engine's pinned buffers.
Shapes: Qwen3-30B-A3B experts (hidden 2048, ffn 768, bf16: 9.4 MB each) with k in {1, 4, 8}, n in {1, 4}; and
Mixtral-8x7B experts (4096 x 14336, 352 MB each), k = 2, for reference. Each timed call takes the next k experts
of a pool of at least ``--pool-gib`` GiB (default 1; Mixtral: ``--mixtral-experts``, default 4), so the weights
come from DRAM, not the LLC.

Per row and variant (a library at a software-prefetch distance):
  * ``b2b``: median time of back-to-back calls (the pool's workers still spinning from the previous call), and
    the weight bytes read / that time (GB/s) and / the streaming bar (the bytes at the pool's read bandwidth,
    measured over the Qwen3 pool with the kernel's own read probe);
  * ``gap``: median time of a call made ``--gap-ms`` (default 1 ms) after the previous one returned: the workers
    have gone to sleep, so this adds the wake-up;
  * ``tiny``: the same call structure (k experts, n tokens each) on tiny cache-resident experts (hidden 64,
    ffn 32): the fixed cost of a call -- dispatch, fork-joins, waits -- back to back and after the gap;
  * ``py``: the b2b call through the Python entry point ``grouped_expert_ffn_numpy`` with prepared
    ``ExpertTables`` (the lane's own call; this tree's library at the first ``--prefetch`` value). The other
    columns call the C entry through cffi directly, so ``py - b2b`` is the Python wrapper's cost.
Timings are per call (``perf_counter_ns`` around each), ``--calls`` calls per measurement (Mixtral: 1/8 of
that, at least 3), ``--rounds`` rounds with the variants in alternating order; the median over all calls is
reported, with the round medians in the JSON.

``--prefetch``: this tree's library is timed at each distance (``set_tuning(prefetch_bytes=...)``, weight rows
prefetched into L2 that many bytes ahead; 0 = off, the default setting). ``--before-lib PATH`` loads a second
build of the extension (e.g. an older commit's, built with ``python fiddler_jax/kernels/_build.py`` in a
``git archive`` of it) and times it, at prefetch 0, interleaved with this tree's in every round, so a noisy host
affects both alike. Prints a line per stage, writes JSON (git SHA, versions, CPU model, thread count, libraries)
to ``--json`` (default ``$OUT/kernel_overhead.json``, or ./kernel_overhead.json without $OUT) and prints the
table last.
"""
from __future__ import annotations

import argparse
import importlib.machinery
import importlib.util
import json
import os
import statistics
import time

import numpy as np

import fiddler_jax.kernels as K
from fiddler_jax.kernels import _lib as this_lib_module
from fiddler_jax.kernels._testing import at_offset
from fiddler_jax.provenance import cpu_model, git_dirty, git_sha, versions
from fiddler_jax.random_bits import random_bf16

GIB = 1024 ** 3
QWEN3 = dict(name="qwen3", hidden=2048, ffn=768, ks=(1, 4, 8), ns=(1, 4))
MIXTRAL = dict(name="mixtral", hidden=4096, ffn=14336, ks=(2,), ns=(1, 4))
TINY = dict(hidden=64, ffn=32)


class Lib:
    """One build of the kernel extension: its cffi ``ffi`` and ``lib`` (the raw C entry points)."""

    def __init__(self, label: str, ffi, lib, path: str):
        self.label, self.ffi, self.lib, self.path = label, ffi, lib, path
        self.err = ffi.new("char[512]")

    def check(self, rc: int, what: str) -> None:
        if rc < 0:
            raise SystemExit(f"error: {self.label} library, {what}: {self.ffi.string(self.err).decode()}")

    def configure(self, threads: int, spin_us: int | None) -> int:
        self.check(self.lib.fj_set_num_threads(threads, 0, self.err, 512), "set_num_threads")
        if spin_us is not None:
            self.check(self.lib.fj_set_pool(spin_us, -1, self.err, 512), "set_pool")
        n = self.lib.fj_get_num_threads(self.err, 512)
        self.check(n, "get_num_threads")
        return int(n)


def load_lib(label: str, path: str) -> Lib:
    """A second copy of the extension from ``path`` (its own thread pool and settings)."""
    name = f"fj_kernel_{label}._fiddler_ffi"  # the last component names the module's init function
    loader = importlib.machinery.ExtensionFileLoader(name, path)
    spec = importlib.util.spec_from_file_location(name, path, loader=loader)
    mod = importlib.util.module_from_spec(spec)
    loader.exec_module(mod)
    return Lib(label, mod.ffi, mod.lib, path)


class Pool:
    """E experts of one shape as three stacks, and their address tables (uint64 [E])."""

    def __init__(self, rng, E: int, hidden: int, ffn: int):
        self.E, self.hidden, self.ffn = E, hidden, ffn
        self.w1 = random_bf16(rng, (E, ffn, hidden))
        self.w3 = random_bf16(rng, (E, ffn, hidden))
        self.w2 = random_bf16(rng, (E, hidden, ffn))
        self.expert_bytes = 3 * hidden * ffn * 2
        stride = hidden * ffn * 2
        self.tables = [np.array([w.ctypes.data + e * stride for e in range(E)], np.uint64)
                       for w in (self.w1, self.w3, self.w2)]
        self.prepared = K.ExpertTables(list(self.w1), list(self.w3), list(self.w2), hidden=hidden)


class Case:
    """One row's calls: the inputs of ``cycle`` successive calls, each over the next k experts of the pool."""

    def __init__(self, rng, pool: Pool, k: int, n: int, x_offset: int = 0):
        self.pool, self.k, self.n = pool, k, n
        self.x = at_offset(random_bf16(rng, (n, pool.hidden), std=1.0), x_offset)
        self.out = np.zeros((n, pool.hidden), np.float32)
        self.tok = np.repeat(np.arange(n, dtype=np.int32), k)  # token-major, as top-k routing flattens
        self.wts = np.full(n * k, 1.0 / k, np.float32)
        self.cycle = max(1, pool.E // k) if pool.E >= k else 1
        self.exps = [np.tile(((np.arange(k) + c * k) % pool.E).astype(np.int32), n) for c in range(self.cycle)]
        self.i = 0

    def bind(self, lib: Lib):
        """A function that makes the next raw call through ``lib``."""
        ffi, p, c = lib.ffi, self.pool, self
        x = ffi.cast("uint16_t*", c.x.ctypes.data)
        tok = ffi.cast("int32_t*", c.tok.ctypes.data)
        wts = ffi.cast("float*", c.wts.ctypes.data)
        out = ffi.cast("void*", c.out.ctypes.data)
        t1, t3, t2 = (ffi.cast("uint64_t*", t.ctypes.data) for t in p.tables)
        exps = [ffi.cast("int32_t*", e.ctypes.data) for e in c.exps]
        fn, err, A = lib.lib.fj_grouped_expert_ffn_tables, lib.err, c.n * c.k
        # bf16 tables: a library with weight formats takes (format, group1, group2) and a scale table (NULL) after
        # each weight table; an older one (--before-lib) takes the three weight tables alone
        formats = len(ffi.typeof(fn).args) > 16
        tables = (0, 0, 0, t1, ffi.NULL, t3, ffi.NULL, t2, ffi.NULL) if formats else (t1, t3, t2)

        def call():
            c.i = (c.i + 1) % c.cycle
            rc = fn(x, c.n, p.hidden, p.ffn, p.E, tok, exps[c.i], wts, A, *tables, out, 1, err, 512)
            if rc != 0:
                lib.check(-1, "grouped call")
        return call

    def wrapper(self):
        """The next call through the Python entry point (this tree's library)."""
        c = self

        def call():
            c.i = (c.i + 1) % c.cycle
            K.grouped_expert_ffn_numpy(c.x, c.tok, c.exps[c.i], c.wts, c.pool.prepared, None, None, c.out)
        return call


def per_call(fn, calls: int, gap_s: float) -> list[float]:
    """Seconds of each of ``calls`` calls (after one untimed call); with ``gap_s``, each after that long idle."""
    fn()
    times = []
    for _ in range(calls):
        if gap_s:
            time.sleep(gap_s)
        t0 = time.perf_counter_ns()
        fn()
        times.append((time.perf_counter_ns() - t0) * 1e-9)
    return times


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=0, help="kernel threads (0: one per physical core)")
    ap.add_argument("--spin-us", type=int, default=None, help="the pool's spin before sleeping (default: as set)")
    ap.add_argument("--rounds", type=int, default=5, help="rounds over all rows (libraries interleaved)")
    ap.add_argument("--calls", type=int, default=40, help="timed calls per measurement")
    ap.add_argument("--gap-ms", type=float, default=1.0, help="idle time before each 'gap' call")
    ap.add_argument("--pool-gib", type=float, default=1.0, help="GiB of distinct Qwen3 experts the calls cycle over")
    ap.add_argument("--mixtral-experts", type=int, default=4, help="distinct Mixtral experts (352 MB each)")
    ap.add_argument("--no-mixtral", action="store_true", help="skip the Mixtral reference rows")
    ap.add_argument("--before-lib", default=None, help="another build of _fiddler_ffi*.so to time alongside")
    ap.add_argument("--prefetch", default="0,16384",
                    help="comma list of software-prefetch distances (bytes; set_tuning(prefetch_bytes=...)) to "
                         "time this tree's library at; the other library runs at 0 (default %(default)s)")
    ap.add_argument("--x-offset", type=int, default=0,
                    help="bytes past a 64-byte boundary where the activations start (default 0, as the engine's "
                         "pinned activation buffers: the kernel reads aligned rows in place; e.g. 16 makes it pack)")
    ap.add_argument("--json", default=os.path.join(os.environ.get("OUT", "."), "kernel_overhead.json"))
    a = ap.parse_args(argv)
    start = time.perf_counter()

    def progress(what: str) -> None:
        print(f"-- {what} [{time.perf_counter() - start:.0f} s]", flush=True)

    import fiddler_jax.kernels._fiddler_ffi as this_ext

    libs = [Lib("this", this_lib_module._ffi, this_lib_module._lib, this_ext.__file__)]
    if a.before_lib:
        libs.append(load_lib("before", os.path.abspath(a.before_lib)))
    threads = {lib.label: lib.configure(a.threads, a.spin_us) for lib in libs}
    prefetch = [int(v) for v in a.prefetch.split(",") if v.strip()] or [0]
    # (label, library, prefetch distance): this tree's library at each distance, the other one at 0.
    variants = [(libs[0].label if pf == 0 else f"this+pf{pf}", libs[0], pf) for pf in prefetch]
    variants += [(lib.label, lib, 0) for lib in libs[1:]]
    rng = np.random.default_rng(0)
    shapes = [QWEN3] + ([] if a.no_mixtral else [MIXTRAL])
    pools, tiny = {}, {}
    for s in shapes:
        eb = 3 * s["hidden"] * s["ffn"] * 2
        E = max(int(-(-a.pool_gib * GIB // eb)), max(s["ks"])) if s is QWEN3 else max(a.mixtral_experts, 2)
        progress(f"{s['name']}: {E} random experts of {s['hidden']}x{s['ffn']} ({E * eb / 1e9:.2f} GB)")
        pools[s["name"]] = Pool(rng, E, s["hidden"], s["ffn"])
        tiny[s["name"]] = Pool(rng, max(s["ks"]), TINY["hidden"], TINY["ffn"])
    progress("read bandwidth of the kernel's pool over the Qwen3 experts (the streaming bar)")
    qp = pools["qwen3"]
    bw = K.read_bandwidth([qp.w1, qp.w3, qp.w2], reps=5)
    print(f"read bandwidth {bw / 1e9:.1f} GB/s with {threads['this']} threads", flush=True)

    rows = []
    for s in shapes:
        for k in s["ks"]:
            for n in s["ns"]:
                case = Case(rng, pools[s["name"]], k, n, a.x_offset)
                tcase = Case(rng, tiny[s["name"]], k, n, a.x_offset)
                rows.append({"shape": s["name"], "hidden": s["hidden"], "ffn": s["ffn"], "k": k, "n": n,
                             "bytes": k * case.pool.expert_bytes, "case": case, "tiny": tcase,
                             "times": {v[0]: {m: [] for m in ("b2b", "gap", "tiny_b2b", "tiny_gap")}
                                       for v in variants} | {"py": {"b2b": []}}})
    gap = a.gap_ms * 1e-3
    for r in range(a.rounds):
        progress(f"round {r + 1}/{a.rounds}: {len(rows)} rows x {len(variants)} variants")
        order = variants if r % 2 == 0 else variants[::-1]
        for row in rows:
            calls = a.calls if row["shape"] != "mixtral" else max(3, a.calls // 8)
            for label, lib, pf in order:
                lib.lib.fj_set_prefetch_bytes(pf)
                t = row["times"][label]
                real, small = row["case"].bind(lib), row["tiny"].bind(lib)
                t["b2b"].append(per_call(real, calls, 0.0))
                t["gap"].append(per_call(real, calls, gap))
                t["tiny_b2b"].append(per_call(small, a.calls, 0.0))
                t["tiny_gap"].append(per_call(small, a.calls, gap))
                time.sleep(0.002)  # this library's workers go to sleep before the other's run
            libs[0].lib.fj_set_prefetch_bytes(prefetch[0])
            row["times"]["py"]["b2b"].append(per_call(row["case"].wrapper(), calls, 0.0))

    def summary(rounds: list[list[float]]) -> dict:
        flat = [t for rd in rounds for t in rd]
        meds = [statistics.median(rd) for rd in rounds]
        return {"median_s": statistics.median(flat), "round_medians_s": meds, "calls": len(flat)}

    out_rows = []
    for row in rows:
        res = {k: row[k] for k in ("shape", "hidden", "ffn", "k", "n", "bytes")}
        res["bar_s"] = row["bytes"] / bw
        for label, ms in row["times"].items():
            res[label] = {m: summary(v) for m, v in ms.items()}
            if "b2b" in ms:
                res[label]["b2b"]["GBps"] = row["bytes"] / res[label]["b2b"]["median_s"] / 1e9
        out_rows.append(res)
    result = {"git_sha": git_sha(), "git_dirty": git_dirty(), "versions": versions(), "cpu_model": cpu_model(),
              "threads": threads, "libraries": {lib.label: lib.path for lib in libs},
              "variants": {label: {"library": lib.label, "prefetch_bytes": pf} for label, lib, pf in variants},
              "py_prefetch_bytes": prefetch[0],
              "spin_us": a.spin_us if a.spin_us is not None else os.environ.get("FIDDLER_KERNEL_SPIN_US", "default"),
              "kernel_path_for_n": {n: K.path_for_tokens(n) for n in (1, 4)}, "read_bandwidth_Bps": bw,
              "gap_ms": a.gap_ms, "x_offset": a.x_offset, "rounds": a.rounds, "calls": a.calls, "tiny_expert": TINY,
              "pool_experts": {name: p.E for name, p in pools.items()}, "rows": out_rows}
    if a.json:
        with open(a.json, "w") as f:
            json.dump(result, f, indent=1)
        print(f"wrote {a.json}")

    print(f"\n{cpu_model()}; threads {threads}; read bandwidth {bw / 1e9:.1f} GB/s; gap {a.gap_ms:g} ms; medians "
          f"of {a.rounds} rounds x {a.calls} calls (Mixtral: {max(3, a.calls // 8)}); git {result['git_sha'][:10]}"
          + (" (dirty)" if result["git_dirty"] else ""))
    print("b2b/gap: real call back to back / after the gap; tiny: same call on tiny experts (fixed cost); "
          "bar: the bytes at the read bandwidth; py: through grouped_expert_ffn_numpy")
    head = (f"{'shape':8s}{'k':>3s}{'n':>3s}{'MB':>7s}{'variant':>13s}{'b2b ms':>9s}{'GB/s':>7s}{'x bar':>7s}"
            f"{'gap ms':>9s}{'tiny us':>9s}{'tiny gap us':>12s}{'py ms':>8s}")
    print(head)
    for res in out_rows:
        for i, (label, _, _) in enumerate(variants):
            t = res[label]
            b2b = t["b2b"]["median_s"]
            py = f"{res['py']['b2b']['median_s'] * 1e3:8.3f}" if i == 0 else f"{'':8s}"
            print(f"{res['shape']:8s}{res['k']:3d}{res['n']:3d}{res['bytes'] / 1e6:7.1f}{label:>13s}"
                  f"{b2b * 1e3:9.3f}{res['bytes'] / b2b / 1e9:7.1f}{b2b / res['bar_s']:7.2f}"
                  f"{t['gap']['median_s'] * 1e3:9.3f}{t['tiny_b2b']['median_s'] * 1e6:9.1f}"
                  f"{t['tiny_gap']['median_s'] * 1e6:12.1f}{py}")
    return result


if __name__ == "__main__":
    main()
