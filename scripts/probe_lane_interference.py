"""Device probe: does what the main thread does while the CPU lane runs slow the CPU kernel down?

Session 5's 4096-token prefill at 24 GiB got slower when the PCIe lane's copies became eager ``device_put``s: its
CPU lane (the kernel in a worker thread) was busy 1.62 s instead of 0.98 s for the same 65 experts. In prefill
the main thread meanwhile runs the PCIe lane: it issues copies and waits on them and on the GPU's mixes. Two
suspects: (a) a host wait that spins holds a core the kernel's 16 threads need; (b) the copies' DMA reads the
same DRAM as the kernel. This probe runs kernel calls in a worker thread (as the engine's CPU lane does) while
the main thread:
  idle          -- sleeps;
  gpu wait      -- runs GPU work (a chain of matmuls) and ``block_until_ready``s it, back to back;
  gpu poll      -- the same GPU work, waited for by polling ``is_ready()`` with 50 us sleeps;
  eager copies  -- copies experts from pinned_host to the device with ``device_put`` and waits on each;
  jitted copies -- the same copy as a jitted identity into device memory;
for a decode-like kernel call (2 experts, one token: memory-bound) and a prefill-like one (1 expert, 512
tokens: AMX, compute-bound), with the kernel pool's two contracts (``claim``, ``wait_all``). For each it reports
the kernel's median ms and the main thread's CPU seconds per wall second (1.0: it spun the whole time).

Prints a table last; writes $OUT/probe_lane_interference.json when $OUT is set.
"""
from __future__ import annotations

import concurrent.futures
import json
import os
import threading
import time

import fiddler_jax  # noqa: F401  (pinned host memory cap before JAX starts)
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from fiddler_jax import kernels as K

H, F = int(os.environ.get("PROBE_HIDDEN", 4096)), int(os.environ.get("PROBE_FFN", 14336))
EXPERTS = int(os.environ.get("PROBE_EXPERTS", 6))
CALLS = int(os.environ.get("PROBE_CALLS", 24))
gpu = jax.devices()[0]
PINNED = jax.sharding.SingleDeviceSharding(gpu, memory_kind="pinned_host")
DEVICE = jax.sharding.SingleDeviceSharding(gpu, memory_kind="device")


def random_bf16(shape, seed):
    bits = np.random.default_rng(seed).integers(0, 1 << 16, size=shape, dtype=np.uint16)
    return ((bits & 0x807F) | 0x3C00).view(ml_dtypes.bfloat16)


pinned = [{w: jax.device_put(random_bf16(s, 10 * e + i), PINNED)
           for i, (w, s) in enumerate((("w1", (F, H)), ("w3", (F, H)), ("w2", (H, F))))} for e in range(EXPERTS)]
jax.block_until_ready(pinned)
tables = tuple([np.asarray(p[w]) for p in pinned] for w in ("w1", "w3", "w2"))
WORKLOADS = {
    "decode (2 experts, 1 token)": (random_bf16((1, H), 1), 2),
    "prefill (1 expert, 512 tokens)": (random_bf16((512, H), 2), 1),
}


@jax.jit
def busy(x):
    for _ in range(8):
        x = jnp.tanh(x @ x)
    return x


@jax.jit
def jitted_copy(w):
    return jax.tree.map(lambda a: jax.device_put(a, DEVICE), w)


def kernel_calls(x, k, stop_after):
    """Kernel calls rotating over the pinned experts; each call's wall seconds."""
    n = x.shape[0]
    out = np.zeros((n, H), np.float32)
    samples = []
    for i in range(stop_after):
        experts = np.asarray([(i * k + j) % EXPERTS for j in range(k)], np.int32)
        token = np.repeat(np.arange(n, dtype=np.int32), k)
        t = time.perf_counter()
        K.grouped_expert_ffn_numpy(x, token, np.tile(experts, n), np.full(n * k, 0.5, np.float32), *tables, out=out)
        samples.append(time.perf_counter() - t)
    return samples


def main_thread_load(kind, done: threading.Event):
    """Keeps the main thread doing `kind` until `done`; returns its CPU seconds per wall second."""
    a = jnp.ones((4096, 4096), jnp.bfloat16) * 1e-3
    t_wall, t_cpu = time.perf_counter(), time.thread_time()
    i = 0
    while not done.is_set():
        if kind == "idle":
            time.sleep(1e-3)
        elif kind in ("gpu wait", "gpu poll"):
            y = busy(a)
            if kind == "gpu wait":
                y.block_until_ready()
            else:
                while not y.is_ready():
                    time.sleep(50e-6)
        elif kind == "eager copies":
            jax.block_until_ready({w: jax.device_put(v, DEVICE) for w, v in pinned[i % EXPERTS].items()})
        elif kind == "jitted copies":
            jax.block_until_ready(jitted_copy(pinned[i % EXPERTS]))
        i += 1
    return (time.thread_time() - t_cpu) / (time.perf_counter() - t_wall)


def run(kind, x, k):
    done = threading.Event()
    with concurrent.futures.ThreadPoolExecutor(1) as lane:
        kernel_calls(x, k, 2)  # warm
        future = lane.submit(lambda: (kernel_calls(x, k, CALLS), done.set())[0])
        cpu_per_wall = main_thread_load(kind, done)
        samples = future.result()
    return float(np.median(samples) * 1e3), cpu_per_wall


def main():
    # warm every main-thread load once (compiles)
    a = jnp.ones((4096, 4096), jnp.bfloat16)
    busy(a).block_until_ready()
    jax.block_until_ready(jitted_copy(pinned[0]))
    loads = ("idle", "gpu wait", "gpu poll", "eager copies", "jitted copies")
    result = {"device": str(gpu), "jax": jax.__version__, "threads": K.get_num_threads(), "rows": []}
    for pool in ("claim", "wait_all"):
        K.set_pool(spin_us=200, wait_all=pool == "wait_all")
        for workload, (x, k) in WORKLOADS.items():
            for kind in loads:
                ms, cpu = run(kind, x, k)
                result["rows"].append({"pool": pool, "workload": workload, "main thread": kind, "kernel_ms": ms,
                                       "main_cpu_per_wall": cpu})
                print(pool, workload, kind, f"{ms:.2f} ms", f"main thread cpu {cpu:.2f}", flush=True)
    K.set_pool(wait_all=False)
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], "probe_lane_interference.json"), "w") as f:
            json.dump(result, f, indent=1)
    print(f"\nkernel in a worker thread while the main thread works ({result['threads']} kernel threads; ms median, "
          "x idle; main thread CPU s per wall s)")
    print(f"{'pool':10s}{'workload':32s}" + "".join(f"{k:>22s}" for k in loads))
    for pool in ("claim", "wait_all"):
        for workload in WORKLOADS:
            rows = {r["main thread"]: r for r in result["rows"] if r["pool"] == pool and r["workload"] == workload}
            idle = rows["idle"]["kernel_ms"]
            print(f"{pool:10s}{workload:32s}" + "".join(
                f"{rows[k]['kernel_ms']:8.2f} {rows[k]['kernel_ms'] / idle:4.2f}x {rows[k]['main_cpu_per_wall']:4.2f}"
                + " " * 4 for k in loads))


if __name__ == "__main__":
    main()
