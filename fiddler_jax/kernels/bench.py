"""Benchmark of the CPU expert kernel on Mixtral-8x7B expert shapes (a script, not a test).

    python -m fiddler_jax.kernels.bench [--quick] [--json results.json]

For each path the CPU supports and each token count n: the median time of one expert FFN (direct entry, no
XLA), weight GB/s, TFLOP/s and the ratio to the *streaming bar* -- the time to read the expert's weight bytes
once at the host read bandwidth measured in the same run with the kernel's own thread pool (ratio 1.0 = as
fast as memory allows; for large n the op becomes compute-bound and the ratio grows). Alongside: the same op
through jax.jit (FFI custom call), XLA's own CPU dot, torch (oneDNN) when importable, the grouped op for a
decode-like call, and a few tuning sweeps. Prints a line (``-- ...``) before each stage, every row as it is
measured, the table last, and writes JSON (git SHA, versions, CPU flags). A bad argument is one ``error:`` line.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import numpy as np

import fiddler_jax.kernels as K
from fiddler_jax.errors import InvalidInputError
from fiddler_jax.kernels._testing import BF16, expert_ref, rel_err
from fiddler_jax.provenance import cpu_model, git_dirty, git_sha, versions
from fiddler_jax.random_bits import random_bf16
from fiddler_jax.timing import median_time

GIB = 1024 ** 3
# The AMX defaults (xla_ffi/kernel_amx.cc), restored after each sweep entry.
AMX_DEFAULTS = dict(amx_variant=0, amx_kc=0, amx_mb=128, amx_pass=32, amx_prefetch=1, amx_blocked_from=3,
                    amx_pipeline=1)
DEFAULT_AMX_SWEEP = [
    {"amx_variant": 1}, {"amx_variant": 2}, {"amx_variant": 3},
    {"amx_variant": 3, "amx_kc": 4}, {"amx_variant": 3, "amx_kc": 16},
    {"amx_variant": 3, "amx_mb": 64}, {"amx_variant": 3, "amx_mb": 256},
    {"amx_variant": 3, "amx_prefetch": 0},
]


def timed(fn, budget_s: float = 1.0, min_reps: int = 3, max_reps: int = 20) -> float:
    """Median seconds of ``fn`` (:func:`fiddler_jax.timing.median_time`, one warm-up) with this benchmark's
    repetition limits."""
    return median_time(fn, budget_s, min_reps, max_reps)


def read_bandwidth(buffers, reps=7) -> float:
    """GiB/s of a multi-threaded read of the given buffers (the kernel's pool, one slice per thread)."""
    return K.read_bandwidth(list(buffers), reps) / GIB


class _Parser(argparse.ArgumentParser):
    """argparse with a bad argument reported as one ``error:`` line (exit status 2) instead of the usage block."""

    def error(self, message):
        self.exit(2, f"error: {message} (`{self.prog} --help` lists the options)\n")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be ≥ 1")
    return value


def _token_counts(text: str) -> str:
    """A comma list of positive token counts, e.g. 1,4,16 (kept as text: the JSON records what was asked)."""
    parts = [p.strip() for p in text.split(",") if p.strip()]
    bad = [p for p in parts if not p.isdigit() or int(p) < 1]
    if not parts or bad:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma list of positive token counts (e.g. 1,4,16)")
    return ",".join(parts)


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"{text} must be a positive number of seconds")
    return value


def _json_list(text: str) -> str:
    try:
        value = json.loads(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"not JSON ({e})") from None
    if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
        raise argparse.ArgumentTypeError("must be a JSON list of objects, e.g. '[{\"amx_variant\": 1}]'")
    return text


QUICK = dict(ns="1,4,16,64", budget=0.3, experts=6)
DEFAULTS = dict(ns="1,2,4,8,16,32,64,128,256,512", budget=1.0, experts=8)


def parse_args(argv=None) -> argparse.Namespace:
    """The benchmark's arguments. ``--quick`` sets ``--ns``, ``--budget`` and ``--experts`` to its smaller values
    only where they are not given: an explicit value wins."""
    ap = _Parser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=_positive_int, default=4096, help="expert hidden size (default: Mixtral's 4096)")
    ap.add_argument("--ffn", type=_positive_int, default=14336, help="expert FFN size (default: Mixtral's 14336)")
    ap.add_argument("--ns", type=_token_counts, default=None,
                    help=f"comma list of token counts per expert (default {DEFAULTS['ns']}; --quick: {QUICK['ns']})")
    ap.add_argument("--paths", default="", help="comma list; default: every supported path but generic")
    ap.add_argument("--budget", type=_positive_float, default=None,
                    help=f"seconds of timing per row (default {DEFAULTS['budget']}; --quick: {QUICK['budget']})")
    ap.add_argument("--quick", action="store_true",
                    help=f"the 2-core CI machine's run: --ns {QUICK['ns']} --budget {QUICK['budget']} --experts "
                         f"{QUICK['experts']} where those are not given (an explicit value wins), and no prefill-like "
                         "grouped row")
    ap.add_argument("--no-xla", action="store_true", help="skip XLA's own CPU dot")
    ap.add_argument("--no-torch", action="store_true", help="skip torch (oneDNN)")
    ap.add_argument("--no-sweeps", action="store_true", help="skip the tuning sweeps")
    ap.add_argument("--rounds", type=_positive_int, default=7,
                    help="alternating ours/torch rounds per n (interleaved ratio)")
    ap.add_argument("--experts", type=_positive_int, default=None,
                    help="distinct experts the timed calls rotate through, so weights come from DRAM, not LLC "
                         f"(default {DEFAULTS['experts']}; --quick: {QUICK['experts']})")
    ap.add_argument("--amx-sweep", type=_json_list, default=None,
                    help="JSON list of set_tuning dicts (plus threads, pin, ns) for the AMX sweep")
    ap.add_argument("--json", default="kernel_bench.json", help="write the results here (default %(default)s)")
    a = ap.parse_args(argv)
    for key, value in (QUICK if a.quick else DEFAULTS).items():
        if getattr(a, key) is None:
            setattr(a, key, value)
    if a.json:  # refuse an unwritable --json now, not after minutes of timing
        path = os.path.abspath(os.path.expanduser(a.json))
        parent = os.path.dirname(path)
        if os.path.isdir(path):
            ap.error(f"--json {a.json}: {path} is a folder; give a file path")
        if not os.path.isdir(parent):
            ap.error(f"--json {a.json}: {parent} " + ("is a file, not a folder" if os.path.exists(parent) else
                                                      "does not exist"))
        if not os.access(parent, os.W_OK) or (os.path.exists(path) and not os.access(path, os.W_OK)):
            ap.error(f"--json {a.json}: {path} is not writable (permission denied)")
    return a


def main(argv=None) -> dict:
    a = parse_args(argv)
    start = time.perf_counter()

    def progress(what: str) -> None:  # the run takes minutes at Mixtral size: say what comes next
        print(f"-- {what} [{time.perf_counter() - start:.0f} s]", flush=True)

    ns = [int(s) for s in a.ns.split(",") if s]
    feats = K.cpu_features(ns)
    paths = [p for p in (a.paths.split(",") if a.paths else feats["supported_paths"]) if p]
    if not a.paths:
        paths = [p for p in paths if p != "generic"]
    unsupported = [p for p in paths if p not in feats["supported_paths"]]
    if unsupported:
        raise InvalidInputError(f"--paths {','.join(unsupported)}: not supported on this CPU; it supports "
                                f"{','.join(feats['supported_paths'])}")
    H, F = a.hidden, a.ffn
    rng = np.random.default_rng(0)
    E = max(a.experts, 6)
    print(f"bench-kernel: expert {H}x{F} bf16, paths {','.join(paths)}, n {a.ns}, {a.budget:g} s per row"
          + (" (--quick)" if a.quick else ""), flush=True)
    progress(f"making {E} random experts ({E * 3 * H * F * 2 / 1e9:.1f} GB) and measuring the read bandwidth")
    sw = [random_bf16(rng, (E, F, H)), random_bf16(rng, (E, F, H)), random_bf16(rng, (E, H, F))]
    experts = [(sw[0][e], sw[1][e], sw[2][e]) for e in range(E)]
    w1, w3, w2 = experts[0]
    wbytes = w1.nbytes + w3.nbytes + w2.nbytes
    # The bar: all E experts read once per repetition (E x 352 MB, far beyond any LLC), as the kernel calls do.
    bw = read_bandwidth(sw)
    bw_warm = read_bandwidth([w1, w3, w2])
    bar_s = wbytes / (bw * GIB)
    print(f"threads={K.get_num_threads()} expert={wbytes / 1e6:.0f} MB read bandwidth {bw:.1f} GiB/s over {E} "
          f"experts (one expert re-read: {bw_warm:.1f} GiB/s) -> streaming bar {bar_s * 1e3:.2f} ms", flush=True)
    rows, extra = [], {"read_bandwidth_one_expert_GiBps": bw_warm}
    cycle = {"i": 0}

    def next_index():
        cycle["i"] = (cycle["i"] + 1) % E
        return cycle["i"]

    def next_expert():
        return experts[next_index()]

    def run_single(n):
        K.expert_ffn_numpy(xs[n], *next_expert(), outs[n])

    def row(kind, path, n, t, nbytes=wbytes, flops_per_token=6 * H * F):
        bar = nbytes / (bw * GIB)
        r = {"kind": kind, "path": path, "n": n, "ms": t * 1e3, "ratio_to_bar": t / bar,
             "weight_GBps": nbytes / t / 1e9, "TFLOPs": flops_per_token * n / t / 1e12}
        rows.append(r)
        print(f"  {kind:8s} {path:12s} n={n:4d} {t * 1e3:9.2f} ms  x{t / bar:6.2f} bar  "
              f"{r['weight_GBps']:6.1f} GB/s  {r['TFLOPs']:6.2f} TFLOP/s", flush=True)
        return r

    xs = {n: random_bf16(rng, (n, H)) for n in ns}
    outs = {n: np.empty((n, H), BF16) for n in ns}
    progress(f"one expert per path: {len(paths) + 1} paths (with auto) x {len(ns)} token counts")
    for path in paths:
        K.set_kernel_path(path)
        for n in ns:
            t = timed(lambda: run_single(n), budget_s=a.budget)
            row("expert", path, n, t)
    K.set_kernel_path("auto")
    for n in ns:
        t = timed(lambda: run_single(n), budget_s=a.budget)
        row("expert", "auto:" + K.path_for_tokens(n), n, t)
    n1 = ns[0]
    t = timed(lambda: K.expert_ffn_numpy(xs[n1], w1, w3, w2, outs[n1]), budget_s=a.budget)
    row("warm", "auto:" + K.path_for_tokens(n1), n1, t)  # one expert re-read: partly LLC-resident

    # Correctness at full size: each path against the float64 reference (outputs poisoned with NaN first).
    checks = []
    progress(f"checking each path against a float64 reference at full size ({2 * len(paths) + 1} runs)")
    for path in paths + ["auto"]:
        K.set_kernel_path(path)
        for n in (1, 17) if path != "auto" else (300,):
            xc = random_bf16(rng, (n, H))
            y = K.expert_ffn_numpy(xc, w1, w3, w2, np.full((n, H), np.nan, np.float32))
            checks.append({"path": K.path_for_tokens(n), "n": n, "rel_err": rel_err(y, expert_ref(xc, w1, w3, w2))})
            print(f"  check    {checks[-1]['path']:12s} n={n:4d} relative error {checks[-1]['rel_err']:.2e}",
                  flush=True)
    K.set_kernel_path("auto")
    extra["full_size_checks"] = checks
    print("full-size checks:", json.dumps(checks), flush=True)
    worst = max(c["rel_err"] for c in checks)

    # Through XLA: the FFI custom call inside jax.jit on the CPU device (adds dispatch overhead only).
    progress("the same op through jax.jit (FFI custom call)" + ("" if a.no_xla else ", then XLA's own CPU dot"))
    import jax
    import jax.numpy as jnp
    cpu = jax.devices("cpu")[0]
    jws = [[jax.device_put(w, cpu) for w in ex] for ex in experts]
    jw = jws[0]
    f_ffi = jax.jit(K.expert_ffn)
    for n in [n for n in ns if n in (1, 16, 256)]:
        jx = jax.device_put(xs[n], cpu)
        t = timed(lambda: f_ffi(jx, *jws[next_index()]).block_until_ready(), budget_s=a.budget)
        row("jit-ffi", "auto", n, t)
    if not a.no_xla:
        def xla_ffn(x, w1, w3, w2):
            g = jnp.dot(x, w1.T, preferred_element_type=jnp.float32)
            u = jnp.dot(x, w3.T, preferred_element_type=jnp.float32)
            h = (jax.nn.silu(g) * u).astype(jnp.bfloat16)
            return jnp.dot(h, w2.T, preferred_element_type=jnp.float32).astype(jnp.bfloat16)
        f_xla = jax.jit(xla_ffn)
        for n in [n for n in ns if n in (1, 16)]:
            jx = jax.device_put(xs[n], cpu)
            t = timed(lambda: f_xla(jx, *jw).block_until_ready(), min_reps=2, max_reps=3, budget_s=a.budget)
            row("xla-dot", "xla", n, t)
    del jw, jws
    if not a.no_torch:
        try:
            progress("torch (oneDNN), then interleaved ours/torch rounds")
            import torch
            torch.set_num_threads(K.get_num_threads())
            tws = [[torch.from_numpy(w.view(np.int16)).view(torch.bfloat16) for w in ex] for ex in experts]

            def torch_ffn(tx):
                tw = tws[next_index()]
                return (torch.nn.functional.silu(tx @ tw[0].T) * (tx @ tw[1].T)) @ tw[2].T

            with torch.inference_mode():
                for n in ns:
                    tx = torch.from_numpy(xs[n].view(np.int16)).view(torch.bfloat16)
                    fn = lambda: torch_ffn(tx)  # noqa: E731
                    t = timed(fn, budget_s=a.budget)
                    row("torch", f"torch{torch.get_num_threads()}t", n, t)
                # Interleaved: the host's speed drifts by 10-50% between rows measured a minute apart, so the
                # ratio that counts is taken from alternating short rounds of ours (auto) and torch.
                K.set_kernel_path("auto")
                inter = []
                for n in [n for n in ns if n in (16, 256, 512)]:
                    tx = torch.from_numpy(xs[n].view(np.int16)).view(torch.bfloat16)
                    ours, theirs = [], []
                    for _ in range(a.rounds):
                        ours.append(timed(lambda: run_single(n), budget_s=0.25))
                        theirs.append(timed(lambda: torch_ffn(tx), budget_s=0.25))
                    ratios = sorted(t / o for o, t in zip(ours, theirs))
                    r = {"n": n, "ours_ms": statistics.median(ours) * 1e3, "torch_ms": statistics.median(theirs) * 1e3,
                         "torch_over_ours_median": statistics.median(ratios), "min": ratios[0], "max": ratios[-1],
                         "rounds": a.rounds}
                    inter.append(r)
                    print("  interleaved", json.dumps(r), flush=True)
                extra["interleaved_vs_torch"] = inter
        except ImportError:
            print("torch not importable: skipped")

    # Grouped, decode-like: 3 tokens x top-2 over the E stacked experts = 6 distinct experts, 1 token each.
    progress("the grouped op (decode-like" + (")" if a.quick else ", then prefill-like)"))
    T = 3
    xg = random_bf16(rng, (T, H))
    tok = np.array([0, 0, 1, 1, 2, 2], np.int32)
    exp = np.array([0, 1, 2, 3, 4, 5], np.int32)
    wts = np.full(6, 0.5, np.float32)
    og = np.empty((T, H), BF16)
    t = timed(lambda: K.grouped_expert_ffn_numpy(xg, tok, exp, wts, *sw, og), budget_s=a.budget)
    row("grouped", "auto:6x1", 1, t, nbytes=6 * wbytes)
    # the same six experts one after another (what the grouped op replaces)
    xs1 = [xg[i:i + 1] for i in tok]
    o1 = np.empty((1, H), BF16)
    t = timed(lambda: [K.expert_ffn_numpy(xs1[a], sw[0][e], sw[1][e], sw[2][e], o1) for a, e in enumerate(exp)],
                  budget_s=a.budget)
    row("6-single", "auto:6x1", 1, t, nbytes=6 * wbytes)
    if not a.quick:  # prefill-like: 256 tokens top-2 over 8 experts (~64 tokens each)
        Tp = 256
        xp = random_bf16(rng, (Tp, H))
        tokp = np.repeat(np.arange(Tp, dtype=np.int32), 2)
        expp = np.stack([np.arange(Tp) % E, (np.arange(Tp) * 3 + 1) % E], 1).reshape(-1).astype(np.int32)
        wtsp = np.full(2 * Tp, 0.5, np.float32)
        op = np.empty((Tp, H), BF16)
        t = timed(lambda: K.grouped_expert_ffn_numpy(xp, tokp, expp, wtsp, *sw, op), budget_s=a.budget)
        row("grouped", "auto:256x2", 2 * Tp // E, t, nbytes=E * wbytes, flops_per_token=6 * H * F * E)

    if not a.no_sweeps:
        if "avx512_bf16" in paths or "avx2" in paths:
            p = "avx512_bf16" if "avx512_bf16" in paths else "avx2"
            progress(f"tuning sweep on {p} at n={n1}: prefetch distance, threads and pinning")
            K.set_kernel_path(p)
            sweep = []
            for pf in (0, 256, 512, 1024, 2048):
                K.set_tuning(prefetch_bytes=pf)
                t = timed(lambda: run_single(n1), budget_s=a.budget)
                sweep.append({"path": p, "n": n1, "prefetch_bytes": pf, "ms": t * 1e3, "ratio_to_bar": t / bar_s})
                print("  sweep", json.dumps(sweep[-1]), flush=True)
            K.set_tuning(prefetch_bytes=int(os.environ.get("FIDDLER_KERNEL_PREFETCH", "0")))
            for nt in sorted({feats["physical_cores"], feats["logical_cpus"]}):
                for pin in (True, False):
                    K.set_num_threads(nt, pin=pin)
                    t = timed(lambda: run_single(n1), budget_s=a.budget)
                    sweep.append({"path": p, "n": n1, "threads": nt, "pin": pin, "ms": t * 1e3,
                                  "ratio_to_bar": t / bar_s})
                    print("  sweep", json.dumps(sweep[-1]), flush=True)
            K.set_num_threads(0)
            extra["sweep_small_n"] = sweep
            print("sweep small n:", json.dumps(sweep), flush=True)
        if "amx" in paths:
            progress("AMX tuning sweep")
            K.set_kernel_path("amx")
            sweep = []
            configs = json.loads(a.amx_sweep) if a.amx_sweep else DEFAULT_AMX_SWEEP
            for cfg in configs:
                cfg = dict(cfg)
                threads = cfg.pop("threads", 0)
                sweep_ns = cfg.pop("ns", None)
                K.set_num_threads(threads, pin=bool(cfg.pop("pin", False)))
                K.set_tuning(**cfg)
                for n in [n for n in ns if n >= 8 and (sweep_ns is None or n in sweep_ns)]:
                    t = timed(lambda: run_single(n), budget_s=min(a.budget, 0.4))
                    r = {"path": "amx", "n": n, **cfg, "threads": K.get_num_threads(), "ms": t * 1e3,
                         "ratio_to_bar": t / bar_s, "TFLOPs": 6 * H * F * n / t / 1e12}
                    sweep.append(r)
                    print("  sweep amx", json.dumps(r), flush=True)
                K.set_tuning(**AMX_DEFAULTS)
            K.set_num_threads(0)
            extra["sweep_amx_variant"] = sweep
        K.set_kernel_path("auto")

    result = {"git_sha": git_sha(), "git_dirty": git_dirty(), "versions": {**versions(), "cpu_model": cpu_model()},
              "cpu_features": feats, "hidden": H, "ffn": F,
              "expert_bytes": wbytes, "read_bandwidth_GiBps": bw, "streaming_bar_ms": bar_s * 1e3,
              "rows": rows, **extra}
    if a.json:
        try:
            with open(a.json, "w") as f:
                json.dump(result, f, indent=1)
        except OSError as e:
            raise InvalidInputError(f"cannot write --json {a.json}: {e.strerror or e}") from None
    # The table, last.
    print(f"\nexpert {H}x{F} bf16 ({wbytes / 1e6:.0f} MB), {K.get_num_threads()} threads; read bandwidth "
          f"{bw:.1f} GiB/s, streaming bar {bar_s * 1e3:.2f} ms (ratio = time / bar-time for the bytes read)")
    print(f"full-size check vs float64: worst relative error {worst:.2e} over {len(checks)} runs")
    print(f"{'kind':9s}{'path':18s}{'n':>5s}{'ms':>10s}{'x bar':>8s}{'GB/s':>8s}{'TFLOP/s':>9s}")
    for r in rows:
        print(f"{r['kind']:9s}{r['path']:18s}{r['n']:5d}{r['ms']:10.2f}{r['ratio_to_bar']:8.2f}"
              f"{r['weight_GBps']:8.1f}{r['TFLOPs']:9.2f}")
    for r in extra.get("interleaved_vs_torch", []):
        print(f"interleaved n={r['n']:4d}: ours {r['ours_ms']:.2f} ms, torch {r['torch_ms']:.2f} ms, torch/ours median "
              f"{r['torch_over_ours_median']:.2f}x (range {r['min']:.2f}-{r['max']:.2f}, {r['rounds']} rounds)")
    return result


if __name__ == "__main__":
    main()
