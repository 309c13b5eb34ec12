"""The CPU kernel on quantised experts: does it read int8 / int4 bytes as fast as the host can deliver them?

    python benchmarks/quant_kernel.py [--shapes qwen3,mixtral] [--ns 1,4,16] [--pool-gib 2] [--calls 40]
                                      [--json PATH]

First a check on fresh random inputs (every precision, both shapes scaled down to 256 x 512 and 512 x 256): the
kernel against a float64 reference computed from the dequantised weights q * scale (tight: the kernel's own
arithmetic is exact products, float32 sums and h rounded to bf16), and the output's change against the bf16
weights (the format's error).

Then, per shape, precision and token count n: the call the engine's CPU lane makes (``grouped_expert_ffn_numpy``
over prepared ``ExpertTables``, k experts per call -- Qwen3-30B-A3B 8, Mixtral-8x7B 2 -- every token routed to all
k), each call on the next k experts of a pool of at least ``--pool-gib`` GiB per precision, so the weights come
from DRAM. Reported: median ms per call, the bytes the call reads (its experts' stored bytes: q + scales) per
second, and that over the host read ceiling (``kernels.read_bandwidth`` over the same pool, measured in the same
process right before), and the call's speed-up over bf16 at the same n. The precisions alternate call by call
in every round, so a noisy host affects all alike. Prints the table last and writes JSON (git SHA, versions,
hardware, the arguments) to ``--json`` (default ``$OUT/quant_kernel.json``, or ./quant_kernel.json).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import ml_dtypes
import numpy as np

import fiddler_jax.kernels as K
from fiddler_jax.models import quantization as Q
from fiddler_jax.provenance import provenance
from fiddler_jax.random_bits import random_bf16

SHAPES = {"qwen3": dict(hidden=2048, ffn=768, k=8), "mixtral": dict(hidden=4096, ffn=14336, k=2)}
PRECISIONS = (("bf16", None), ("int8", None), ("int4", 32), ("int4", 64), ("int4", 128))
GIB = 1 << 30


def label(precision: str, group: int | None) -> str:
    return precision if group is None else f"{precision}/g{group}"


def quantized(w, precision: str, group: int | None):
    return w if precision == "bf16" else Q.quantize(w, precision, group or Q.DEFAULT_INT4_GROUP)


def reference(x, mats, tok, exp, wts) -> np.ndarray:
    """float64 mix over the given weights, h rounded to bf16 as the kernel rounds it."""
    out = np.zeros((x.shape[0], mats[0][2].shape[0]))
    for a in range(len(tok)):
        w1, w3, w2 = mats[exp[a]]
        xx = x[tok[a]].astype(np.float64)
        g, u = w1 @ xx, w3 @ xx
        h = (g / (1 + np.exp(-g)) * u).astype(np.float32).astype(ml_dtypes.bfloat16).astype(np.float64)
        out[tok[a]] += wts[a] * (w2 @ h)
    return out


def dense64(m) -> np.ndarray:
    """The weights the kernel computes with: bf16 ones as they are, quantised ones exactly q * scale."""
    return (Q.dequantize(m) if isinstance(m, Q.QuantizedMatrix) else np.asarray(m, np.float32)).astype(np.float64)


def check(rng) -> list[dict]:
    rows = []
    for hidden, ffn in ((256, 512), (512, 256)):
        E, T = 4, 5
        base = [[random_bf16(rng, s, std=0.05) for s in ((ffn, hidden), (ffn, hidden), (hidden, ffn))]
                for _ in range(E)]
        x = random_bf16(rng, (T, hidden), std=1.0)
        tok = np.array([0, 0, 1, 2, 3, 4, 4], np.int32)
        exp = np.array([0, 1, 1, 3, 2, 0, 2], np.int32)
        wts = rng.random(len(tok)).astype(np.float32)
        bf16_ref = reference(x, [[dense64(m) for m in ws] for ws in base], tok, exp, wts)
        for precision, group in PRECISIONS:
            held = [[quantized(m, precision, group) for m in ws] for ws in base]
            tables = K.ExpertTables(*[[h[i] for h in held] for i in range(3)], hidden=hidden)
            out = np.full((T, hidden), np.nan, np.float32)
            K.grouped_expert_ffn_numpy(x, tok, exp, wts, tables, None, None, out=out)
            ref = reference(x, [[dense64(m) for m in ws] for ws in held], tok, exp, wts)
            err = float(np.linalg.norm(out - ref) / np.linalg.norm(ref))
            fmt = float(np.linalg.norm(ref - bf16_ref) / np.linalg.norm(bf16_ref))
            ok = bool(np.isfinite(out).all() and err < 1e-4)
            rows.append(dict(shape=f"{hidden}x{ffn}", precision=label(precision, group), rel_err=err,
                             format_err_vs_bf16=fmt, ok=ok))
            print(f"check {hidden}x{ffn} {label(precision, group):9s} kernel vs float64(q*s) {err:.2e}  "
                  f"q*s vs bf16 weights {fmt:.2e}  {'ok' if ok else 'FAILED'}", flush=True)
    return rows


class PrecisionPool:
    """E experts of one shape at one precision (quantised from the same bf16 pool), prepared for the kernel."""

    def __init__(self, base: list, hidden: int, precision: str, group: int | None):
        self.held = [[quantized(m, precision, group) for m in ws] for ws in base]
        self.tables = K.ExpertTables(*[[h[i] for h in self.held] for i in range(3)], hidden=hidden)
        self.buffers = [b for ws in self.held for m in ws
                        for b in ((m.q, m.scales) if isinstance(m, Q.QuantizedMatrix) else (m,))]
        self.expert_bytes = sum(b.nbytes for b in self.buffers) // len(self.held)


def bench_shape(rng, name: str, shape: dict, ns, pool_gib: float, calls: int, rounds: int) -> list[dict]:
    hidden, ffn, k = shape["hidden"], shape["ffn"], shape["k"]
    bf16_bytes = 3 * hidden * ffn * 2
    E = max(2 * k, int(pool_gib * GIB // bf16_bytes))
    print(f"{name}: {E} experts of {hidden}x{ffn} ({E * bf16_bytes / GIB:.1f} GiB bf16), k={k}", flush=True)
    base = [[random_bf16(rng, s) for s in ((ffn, hidden), (ffn, hidden), (hidden, ffn))] for _ in range(E)]
    pools = {label(p, g): PrecisionPool(base, hidden, p, g) for p, g in PRECISIONS}
    del base
    ceiling = {lab: K.read_bandwidth(pool.buffers) for lab, pool in pools.items()}
    rows = []
    for n in ns:
        x = random_bf16(rng, (n, hidden), std=1.0)
        out = np.zeros((n, hidden), np.float32)
        tok = np.repeat(np.arange(n, dtype=np.int32), k)
        wts = np.full(n * k, 1.0 / k, np.float32)
        cycle = E // k
        exps = [np.tile((np.arange(k) + c * k).astype(np.int32), n) for c in range(cycle)]
        times = {lab: [] for lab in pools}
        i = 0
        for _ in range(rounds):
            order = list(pools) if _ % 2 == 0 else list(reversed(pools))
            for _call in range(calls):
                for lab in order:
                    i = (i + 1) % cycle
                    t0 = time.perf_counter()
                    K.grouped_expert_ffn_numpy(x, tok, exps[i], wts, pools[lab].tables, None, None, out=out)
                    times[lab].append(time.perf_counter() - t0)
        for lab, pool in pools.items():
            t = statistics.median(times[lab])
            nbytes = k * pool.expert_bytes
            rows.append(dict(shape=name, n=n, precision=lab, ms=t * 1e3, bytes_per_call=nbytes,
                             GBps=nbytes / t / 1e9, ceiling_GBps=ceiling[lab] / 1e9,
                             of_ceiling=nbytes / t / ceiling[lab],
                             speedup_vs_bf16=statistics.median(times["bf16"]) / t))
            r = rows[-1]
            print(f"{name:8s} n={n:<3d} {lab:9s} {r['ms']:8.3f} ms {r['GBps']:7.1f} GB/s "
                  f"({r['of_ceiling']:.2f} of {r['ceiling_GBps']:.1f}) x{r['speedup_vs_bf16']:.2f} vs bf16",
                  flush=True)
    return rows


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", default="qwen3,mixtral")
    ap.add_argument("--ns", default="1,4,16")
    ap.add_argument("--pool-gib", type=float, default=2.0)
    ap.add_argument("--calls", type=int, default=40)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json", default=os.path.join(os.environ.get("OUT", "."), "quant_kernel.json"))
    args = ap.parse_args(argv)
    shapes = [s for s in args.shapes.split(",") if s]
    bad = [s for s in shapes if s not in SHAPES]
    if bad:
        raise SystemExit(f"error: unknown shape {bad[0]!r}; use {', '.join(SHAPES)}")
    ns = [int(n) for n in args.ns.split(",")]
    rng = np.random.default_rng(0)
    checks = check(rng)
    rows = []
    for name in shapes:
        rows += bench_shape(rng, name, SHAPES[name], ns, args.pool_gib, args.calls, args.rounds)
    record = {"provenance": provenance(), "args": vars(args), "threads": K.get_num_threads(),
              "checks": checks, "rows": rows}
    with open(args.json, "w") as f:
        json.dump(record, f, indent=1)
    print(f"\nwrote {args.json}; kernel threads {K.get_num_threads()}")
    print(f"{'shape':8s} {'n':>3s} {'precision':9s} {'ms':>8s} {'GB/s':>7s} {'of ceil':>7s} {'vs bf16':>7s}")
    for r in rows:
        print(f"{r['shape']:8s} {r['n']:3d} {r['precision']:9s} {r['ms']:8.3f} {r['GBps']:7.1f} "
              f"{r['of_ceiling']:7.2f} {r['speedup_vs_bf16']:7.2f}")
    if not all(c["ok"] for c in checks):
        raise SystemExit("error: a quantised kernel path disagrees with its float64 reference (see the checks)")


if __name__ == "__main__":
    main()
