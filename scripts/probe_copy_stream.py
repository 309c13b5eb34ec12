"""Device probe: can an expert copy from pinned host memory run beside GPU compute (for cross-layer prefetch)?

The engine's PCIe lane copies inside a jit (``host_experts.copy_into_slot``). A prefetch of the next layer's
likely experts must not delay the next layer's attention, so its copy has to run on a stream other than the one
XLA computes on. Questions, for one Mixtral-8x7B expert (3 arrays, 352 MB bf16) in ``pinned_host`` memory:
  1. copy alone: jitted copy into a slot, eager ``device_put`` of the per-expert arrays (dispatch and done);
  2. a compute (``busy``, a chain of matmuls) alone;
  3. copy dispatched first, then compute: when does the compute finish? Near ``busy`` alone means the copy ran
     on another stream; near copy + busy means it sat in front of the compute;
  4. small synced steps (the decode step pattern: a short jit, then a host read) while a copy is in flight:
     their latency against the same steps alone;
  5. a jit that reads the eagerly copied arrays sees the right bytes (it waits for the copy).
Prints a table last; writes $OUT/probe_copy_stream.json when $OUT is set.
"""
from __future__ import annotations

import json
import os
import time

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

H, F = int(os.environ.get("PROBE_HIDDEN", 4096)), int(os.environ.get("PROBE_FFN", 14336))
REPEAT = int(os.environ.get("PROBE_REPEAT", 7))
gpu = jax.devices()[0]
PINNED = jax.sharding.SingleDeviceSharding(gpu, memory_kind="pinned_host")
DEVICE = jax.sharding.SingleDeviceSharding(gpu, memory_kind="device")
rows: list[tuple[str, str]] = []
result: dict = {"device": str(gpu), "jax": jax.__version__}


def random_bf16(shape, seed):
    bits = np.random.default_rng(seed).integers(0, 1 << 16, size=shape, dtype=np.uint16)
    return ((bits & 0x807F) | 0x3C00).view(ml_dtypes.bfloat16)


def median(fn, repeat=REPEAT):
    fn()
    samples = []
    for _ in range(repeat):
        t = time.perf_counter()
        out = fn()
        samples.append((time.perf_counter() - t, out))
    samples.sort(key=lambda s: s[0])
    return samples[len(samples) // 2]


experts = [{k: jax.device_put(random_bf16(s, 10 * e + i), PINNED)
            for i, (k, s) in enumerate((("w1", (F, H)), ("w3", (F, H)), ("w2", (H, F))))} for e in range(3)]
jax.block_until_ready(experts)
expert_bytes = sum(a.nbytes for a in experts[0].values())
slots = {"w1": jnp.zeros((1, F, H), jnp.bfloat16), "w3": jnp.zeros((1, F, H), jnp.bfloat16),
         "w2": jnp.zeros((1, H, F), jnp.bfloat16)}


@jax.jit
def _copy(buffers, weights):
    return {k: jax.lax.dynamic_update_index_in_dim(buffers[k], jax.device_put(weights[k], DEVICE), 0, 0)
            for k in buffers}


copy_jit = jax.jit(_copy.__wrapped__, donate_argnums=0)

N = int(os.environ.get("PROBE_N", 8192))
a = jax.device_put(random_bf16((N, N), 99).astype(np.float32) * 0.01, gpu).astype(jnp.bfloat16)


@jax.jit
def busy(x):
    def body(_, y):
        return jnp.tanh(y @ a)
    return jax.lax.fori_loop(0, 6, body, x)


@jax.jit
def small(x):
    return (x @ a[:, :64]).sum()


x0 = a[:64]
busy(a).block_until_ready()
small(x0).block_until_ready()


def eager_copy(e):
    return {k: jax.device_put(v, DEVICE) for k, v in experts[e].items()}


def t_copy_jit():
    global slots
    slots = copy_jit(slots, experts[0])
    jax.block_until_ready(slots)


def t_eager():
    t = time.perf_counter()
    out = eager_copy(1)
    dispatch = time.perf_counter() - t
    jax.block_until_ready(out)
    return dispatch


def t_busy():
    busy(a).block_until_ready()


copy_jit_s, _ = median(t_copy_jit)
eager_s, eager_dispatch = median(t_eager)
busy_s, _ = median(t_busy)
rows += [("copy one expert, jit (done)", f"{copy_jit_s * 1e3:.2f} ms = {expert_bytes / copy_jit_s / 1e9:.1f} GB/s"),
         ("copy one expert, eager device_put (done)", f"{eager_s * 1e3:.2f} ms = {expert_bytes / eager_s / 1e9:.1f} GB/s"),
         ("  eager dispatch returns after", f"{eager_dispatch * 1e3:.2f} ms"),
         ("busy compute alone", f"{busy_s * 1e3:.2f} ms")]
result.update(copy_jit_ms=copy_jit_s * 1e3, eager_ms=eager_s * 1e3, eager_dispatch_ms=eager_dispatch * 1e3,
              busy_ms=busy_s * 1e3)


def copy_then_busy(kind):
    def run():
        global slots
        t = time.perf_counter()
        if kind == "jit":
            slots = copy_jit(slots, experts[0])
            copied = slots
        else:
            copied = eager_copy(2)
        busy(a).block_until_ready()
        t_busy_done = time.perf_counter() - t
        jax.block_until_ready(copied)
        return t_busy_done, time.perf_counter() - t
    total, (busy_done, both_done) = median(run)
    return busy_done, both_done


for kind in ("jit", "eager"):
    busy_done, both_done = copy_then_busy(kind)
    rows.append((f"{kind} copy, then busy: busy done / all done",
                 f"{busy_done * 1e3:.2f} / {both_done * 1e3:.2f} ms (busy alone {busy_s * 1e3:.2f})"))
    result[f"copy_then_busy[{kind}]"] = {"busy_done_ms": busy_done * 1e3, "all_done_ms": both_done * 1e3}


def synced_steps(n=20, kind=None):
    """n small jit + host reads; with ``kind``, a copy dispatched first. Returns (median step, copy done)."""
    global slots
    copied = None
    t0 = time.perf_counter()
    if kind == "jit":
        slots = copy_jit(slots, experts[0])
        copied = slots
    elif kind == "eager":
        copied = eager_copy(1)
    steps = []
    for _ in range(n):
        t = time.perf_counter()
        float(small(x0))
        steps.append(time.perf_counter() - t)
    jax.block_until_ready(copied)
    return float(np.median(steps[:5])), time.perf_counter() - t0


for kind in (None, "jit", "eager"):
    synced_steps(kind=kind)
    step, done = synced_steps(kind=kind)
    label = kind or "no copy"
    rows.append((f"first 5 synced small steps, {label}", f"median {step * 1e3:.3f} ms (all done {done * 1e3:.1f} ms)"))
    result[f"small_step_ms[{label}]"] = step * 1e3

# 5. a jit reading an eagerly copied expert sees the right bytes
copied = eager_copy(2)
checksum = jax.jit(lambda w: {k: v.view(jnp.uint16).astype(jnp.uint32).sum() for k, v in w.items()})(copied)
expected = {k: int(np.asarray(v).view(np.uint16).astype(np.uint64).sum() % (1 << 32)) for k, v in experts[2].items()}
ok = all(int(checksum[k]) == expected[k] for k in expected)
rows.append(("jit over eager copy sees the bytes", str(ok)))
result["eager_copy_bytes_ok"] = ok

out = os.environ.get("OUT")
if out:
    with open(os.path.join(out, "probe_copy_stream.json"), "w") as f:
        json.dump(result, f, indent=2)
width = max(len(r[0]) for r in rows)
print("\n".join(f"{k:<{width}}  {v}" for k, v in rows))
