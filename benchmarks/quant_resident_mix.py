"""The GPU's resident mix on quantised stacks: does a decode step read int8 / int4 bytes, dequantised inside the
product (``QuantizedStack.matvec``: elementwise work on the quantised rows feeding the row-wise reduction), as
fast as the device reads memory?

    python benchmarks/quant_resident_mix.py [--shapes mixtral,qwen3] [--slots 8] [--tokens 1,4] [--iters 50]
                                            [--json PATH]

Per shape (Mixtral-8x7B: 4096 x 14336, top-2; Qwen3-30B-A3B: 2048 x 768, top-8) a stack of ``--slots`` random
experts per precision (bf16; int8; int4 with groups of 64), and the engine's resident mix (``segments.stack_mix``:
routing, the row-wise or grouped form, the weighted combine) on n tokens, every token routed to k distinct
resident experts. First a check: each quantised stack's mix against the same mix over its W' as a bf16 stack
(the same weights; XLA may order the float32 sums differently once the dequantisation is fused into them, which
can flip the bf16 rounding of an intermediate, so the bar is bf16 rounding, 1e-2 of the largest output). Then, precisions interleaved call by call in every round (``--iters`` in
all), the median time per call (``block_until_ready`` after each) and the stored bytes of the chosen experts
(q + scales, or bf16 weights) per second, and the speed-up over bf16. ``form`` says which product ran: the
row-wise form (at most min(slots, 16) assignments: the decode form, dequantising the rows it reads) or the
grouped one (more: the whole stack dequantised first, so its GB/s undercounts what it reads). A device-to-device copy of
a 1 GiB buffer, timed the same way, gives the device's read+write rate for reference. Prints the table last and
writes JSON (git SHA, versions, hardware, arguments) to ``--json`` (default ``$OUT/quant_resident_mix.json``).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from fiddler_jax.models.moe import ROWWISE_MAX_ROWS, Routing
from fiddler_jax.models.quantized_experts import dense_stack, quantize_stack
from fiddler_jax.provenance import provenance
from fiddler_jax.runtime.segments import stack_mix

SHAPES = {"mixtral": dict(hidden=4096, ffn=14336, k=2), "qwen3": dict(hidden=2048, ffn=768, k=8)}
PRECISIONS = (("bf16", 0), ("int8", 0), ("int4", 64))


def label(precision: str, group: int) -> str:
    return f"{precision}/g{group}" if group else precision


def stacks(shape: dict, slots: int, key) -> dict:
    """{label: (w1, w3, w2)} over the same random bf16 experts."""
    h, f = shape["hidden"], shape["ffn"]
    k1, k2, k3 = jax.random.split(key, 3)
    base = tuple((jax.random.normal(k, s, jnp.float32) * 0.02).astype(jnp.bfloat16)
                 for k, s in ((k1, (slots, f, h)), (k2, (slots, f, h)), (k3, (slots, h, f))))
    out = {}
    for precision, group in PRECISIONS:
        if precision == "bf16":
            out[label(precision, group)] = base
        else:
            out[label(precision, group)] = tuple(quantize_stack(w, precision=precision, group=group) for w in base)
    return out


def nbytes(w) -> int:
    return w.nbytes if not hasattr(w, "q") else w.q.nbytes + w.scales.nbytes


def routing(n: int, k: int, slots: int, seed: int) -> Routing:
    rng = np.random.default_rng(seed)
    experts = np.stack([rng.choice(slots, k, replace=False) for _ in range(n)]).astype(np.int32)
    weights = rng.random((n, k)).astype(np.float32)
    return Routing(jnp.asarray(weights / weights.sum(1, keepdims=True)), jnp.asarray(experts))


def timed(fn, *args) -> float:
    t = time.perf_counter()
    jax.block_until_ready(fn(*args))
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", default="mixtral,qwen3")
    ap.add_argument("--slots", type=int, default=8)
    ap.add_argument("--tokens", default="1,4")
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--json", default=os.path.join(os.environ.get("OUT", "."), "quant_resident_mix.json"))
    args = ap.parse_args()
    device = jax.devices()[0]
    print(f"device: {device.device_kind} ({device.platform})", flush=True)

    big = jnp.ones((1 << 29,), jnp.uint16)  # 1 GiB
    copy = jax.jit(lambda a: a + jnp.uint16(1))
    copy(big).block_until_ready()
    copy_s = statistics.median(timed(copy, big) for _ in range(10))
    copy_gbps = 2 * big.nbytes / copy_s / 1e9
    del big
    print(f"device copy (read + write): {copy_gbps:.0f} GB/s", flush=True)

    rows, checks = [], []
    for name in args.shapes.split(","):
        shape = SHAPES[name]
        k = min(shape["k"], args.slots)
        held = stacks(shape, args.slots, jax.random.key(0))
        slot_of = jnp.arange(args.slots, dtype=jnp.int32)
        for n in map(int, args.tokens.split(",")):
            x = (jax.random.normal(jax.random.key(n), (n, shape["hidden"]), jnp.float32)).astype(jnp.bfloat16)
            r = routing(n, k, args.slots, seed=n)
            chosen = len(set(np.asarray(r.experts).reshape(-1).tolist()))
            form = "rowwise" if n * k <= min(args.slots, ROWWISE_MAX_ROWS) else "grouped"
            for lab, ws in held.items():
                out = np.asarray(stack_mix(x, r, slot_of, *ws))
                if lab != "bf16":  # the same mix over W' as plain bf16 stacks
                    want = np.asarray(stack_mix(x, r, slot_of, *(dense_stack(w) for w in ws)))
                    err = float(np.abs(out - want).max() / max(np.abs(want).max(), 1e-30))
                    checks.append({"shape": name, "n": n, "precision": lab, "rel_err": err})
                    print(f"check {name} n={n} {lab}: max |mix - mix over W'| / max = {err:.2e}", flush=True)
                    assert err < 1e-2, (name, n, lab, err)
            times = {lab: [] for lab in held}
            for _ in range(args.iters):
                for lab, ws in held.items():
                    times[lab].append(timed(stack_mix, x, r, slot_of, *ws))
            for lab, ws in held.items():
                ms = statistics.median(times[lab]) * 1e3
                read = chosen * sum(nbytes(w) for w in ws) / args.slots
                rows.append({"shape": name, "n": n, "form": form, "precision": lab, "ms": ms, "bytes": read,
                             "GBps": read / ms / 1e6, "experts_read": chosen})
            base = next(r_ for r_ in rows if r_["shape"] == name and r_["n"] == n and r_["precision"] == "bf16")
            for r_ in rows:
                if r_["shape"] == name and r_["n"] == n:
                    r_["speedup_vs_bf16"] = base["ms"] / r_["ms"]

    result = {"rows": rows, "checks": checks, "device_copy_GBps": copy_gbps, "args": vars(args),
              **provenance()}
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump(result, f, indent=1)
    print(f"\n{'shape':8s}{'n':>3s} {'form':8s}{'precision':10s}{'ms':>9s}{'GB/s':>8s}{'x bf16':>8s}")
    for r_ in rows:
        print(f"{r_['shape']:8s}{r_['n']:3d} {r_['form']:8s}{r_['precision']:10s}{r_['ms']:9.3f}{r_['GBps']:8.0f}"
              f"{r_['speedup_vs_bf16']:8.2f}")
    print(f"(device copy {copy_gbps:.0f} GB/s read + write; JSON: {args.json})")


if __name__ == "__main__":
    main()
