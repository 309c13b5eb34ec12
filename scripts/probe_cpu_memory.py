"""Device probe: does the CPU kernel read pinned_host JAX arrays as fast as numpy arrays? (Calibration through
the engine's pinned views measured 6.7 ms for one expert at n=1 against 3.3 ms on numpy stacks.) Times one
expert at n=1 and four experts at n=1 in one grouped call, over: numpy stack, pinned stack view, pinned
per-expert views (the engine), numpy per-expert arrays. Prints a table last."""
from __future__ import annotations

import os
import time

import fiddler_jax  # noqa: F401  (pinned cap)
import jax
import ml_dtypes
import numpy as np

from fiddler_jax.kernels import grouped_expert_ffn_numpy

H, F, E, REPEAT = 4096, 14336, 4, 20
PINNED = jax.sharding.SingleDeviceSharding(jax.devices()[0], memory_kind="pinned_host")


def random_bf16(shape, seed):
    bits = np.random.default_rng(seed).integers(0, 1 << 16, size=shape, dtype=np.uint16)
    return ((bits & 0x807F) | 0x3C00).view(ml_dtypes.bfloat16)


def meminfo(key):
    for line in open("/proc/meminfo"):
        if line.startswith(key):
            return line.split(":")[1].strip()


stacks = {"w1": random_bf16((E, F, H), 1), "w3": random_bf16((E, F, H), 2), "w2": random_bf16((E, H, F), 3)}
pinned_stack = {k: jax.device_put(v, PINNED) for k, v in stacks.items()}
pinned_expert = [{k: jax.device_put(np.ascontiguousarray(v[e]), PINNED) for k, v in stacks.items()} for e in range(E)]
jax.block_until_ready((pinned_stack, pinned_expert))
layouts = {
    "numpy stack": tuple(stacks[k] for k in ("w1", "w3", "w2")),
    "pinned stack view": tuple(np.asarray(pinned_stack[k]) for k in ("w1", "w3", "w2")),
    "pinned per-expert views": tuple([np.asarray(p[k]) for p in pinned_expert] for k in ("w1", "w3", "w2")),
    "numpy per-expert copies": tuple([np.array(stacks[k][e]) for e in range(E)] for k in ("w1", "w3", "w2")),
}
x = random_bf16((1, H), 9)
rows = []
for name, (w1, w3, w2) in layouts.items():
    out = np.zeros((1, H), np.float32)
    res = {}
    for label, experts in (("1 expert", [[e] for e in range(E)]), (f"{E} experts", [list(range(E))])):
        calls = [(np.zeros(len(ex), np.int32), np.asarray(ex, np.int32), np.full(len(ex), 0.5, np.float32))
                 for ex in experts]
        for c in calls:
            grouped_expert_ffn_numpy(x, *c, w1, w3, w2, out=out)
        times = []
        for i in range(REPEAT):
            c = calls[i % len(calls)]
            t = time.perf_counter()
            grouped_expert_ffn_numpy(x, *c, w1, w3, w2, out=out)
            times.append((time.perf_counter() - t) / len(c[1]))
        res[label] = np.median(times) * 1e3
    ptr = (w1 if isinstance(w1, np.ndarray) else w1[0]).ctypes.data
    rows.append(f"{name:26s} {res['1 expert']:8.2f} {res[f'{E} experts']:12.2f}   addr {ptr:#x}")
thp = open("/sys/kernel/mm/transparent_hugepage/enabled").read().strip() if os.path.exists(
    "/sys/kernel/mm/transparent_hugepage/enabled") else "?"
print(f"THP: {thp}; AnonHugePages {meminfo('AnonHugePages')}; HugePages_Total {meminfo('HugePages_Total')}")
print(f"{'weights':26s} {'ms/expert n=1':>8s} {'(4 in 1 call)':>12s}")
print("\n".join(rows))
