"""Device probe for the engine's host-memory lanes (run on the GPU machine; prints a table last).

Questions, for one Mixtral-8x7B expert (3 × 4096 × 14336 bf16 = 352 MB) held in JAX ``pinned_host`` memory:
  1. how fast does a host stack reach pinned memory (load time), and is ``np.asarray`` of it a zero-copy view?
  2. which copy path into a GPU staging slot is fastest: eager device_put of pageable numpy (today's engine),
     eager device_put of a pinned per-expert array, a jit that slices a pinned stack and moves the slice, a jit
     that moves per-expert pinned arrays?
  3. does the dispatch of that copy return before the copy ends (so the CPU lane can run beside it)?
  4. does the C++ kernel, reading the pinned view, slow down while copies run from the same memory?
"""
from __future__ import annotations

import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

H, F, E = int(os.environ.get("PROBE_HIDDEN", 4096)), int(os.environ.get("PROBE_FFN", 14336)), 4
REPEAT = int(os.environ.get("PROBE_REPEAT", 8))
gpu = jax.devices()[0]
PINNED = jax.sharding.SingleDeviceSharding(gpu, memory_kind="pinned_host")
DEVICE = jax.sharding.SingleDeviceSharding(gpu, memory_kind="device")
rows: list[tuple[str, str]] = []
result: dict = {"device": str(gpu), "platform": gpu.platform, "jax": jax.__version__}


def random_bf16(shape, seed):
    bits = np.random.default_rng(seed).integers(0, 1 << 16, size=shape, dtype=np.uint16)
    return ((bits & 0x807F) | 0x3C00).view(ml_dtypes.bfloat16)  # |x| in [2^-7, 2^-6): finite, no denormals


def median_time(fn, repeat=REPEAT):
    fn()
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return float(np.median(times))


expert_bytes = 3 * H * F * 2
stacks = {"w1": random_bf16((E, F, H), 1), "w3": random_bf16((E, F, H), 2), "w2": random_bf16((E, H, F), 3)}

# 1. load into pinned memory, zero-copy view
t = time.perf_counter()
pinned = {k: jax.device_put(v, PINNED) for k, v in stacks.items()}
jax.block_until_ready(pinned)
load_s = time.perf_counter() - t
rows.append(("stack numpy -> pinned_host (device_put)", f"{3 * E * H * F * 2 / load_s / 2**30:.1f} GiB/s"))
view = np.asarray(pinned["w1"])
ptr = pinned["w1"].unsafe_buffer_pointer()
zero_copy = view.ctypes.data == ptr
rows.append(("np.asarray(pinned) zero-copy", f"{zero_copy} (view {view.ctypes.data:#x}, buffer {ptr:#x})"))
try:
    dl = np.from_dlpack(pinned["w1"])
    rows.append(("np.from_dlpack(pinned) zero-copy", str(dl.ctypes.data == ptr)))
except Exception as e:  # noqa: BLE001
    rows.append(("np.from_dlpack(pinned)", f"fails: {type(e).__name__}: {str(e)[:80]}"))
t = time.perf_counter()
np.asarray(pinned["w2"])
rows.append(("np.asarray(pinned w2 stack) time", f"{(time.perf_counter() - t) * 1e3:.2f} ms"))
result["np_asarray_zero_copy"] = bool(zero_copy)
assert np.array_equal(np.asarray(pinned["w3"]).view(np.uint16), stacks["w3"].view(np.uint16))
per_expert = [{k: jax.device_put(v[e], PINNED) for k, v in stacks.items()} for e in range(E)]
jax.block_until_ready(per_expert)

# 2. copy paths into a 2-slot staging stack
staging = {"w1": jnp.zeros((2, F, H), jnp.bfloat16), "w3": jnp.zeros((2, F, H), jnp.bfloat16),
           "w2": jnp.zeros((2, H, F), jnp.bfloat16)}


@jax.jit
def write_slot(stack, slot, w):
    return jax.lax.dynamic_update_index_in_dim(stack, w, slot, 0)


write_slot = jax.jit(write_slot.__wrapped__, donate_argnums=0)


@jax.jit
def copy_from_stack(staging, slot, pinned, e):
    out = {}
    for k in ("w1", "w3", "w2"):
        w = jax.device_put(jax.lax.dynamic_index_in_dim(pinned[k], e, keepdims=False), DEVICE)
        out[k] = jax.lax.dynamic_update_index_in_dim(staging[k], w, slot, 0)
    return out


copy_from_stack = jax.jit(copy_from_stack.__wrapped__, donate_argnums=0)


@jax.jit
def copy_from_expert(staging, slot, weights):
    return {k: jax.lax.dynamic_update_index_in_dim(staging[k], jax.device_put(weights[k], DEVICE), slot, 0)
            for k in staging}


copy_from_expert = jax.jit(copy_from_expert.__wrapped__, donate_argnums=0)


def run_path(name, step):
    global staging
    counter = [0]

    def once():
        global staging
        e = counter[0] % E
        counter[0] += 1
        staging = step(staging, e)
        jax.block_until_ready(staging)

    s = median_time(once)
    rows.append((f"copy 1 expert: {name}", f"{s * 1e3:.2f} ms = {expert_bytes / s / 2**30:.1f} GiB/s"))
    result[f"copy_ms[{name}]"] = s * 1e3
    # correctness: slot 0 holds the expert just copied
    e = counter[0] % E
    staging = step(staging, e)
    ok = all(np.array_equal(np.asarray(staging[k][0]).view(np.uint16), stacks[k][e].view(np.uint16)) for k in staging)
    rows.append((f"  {name} copies the right bytes", str(ok)))
    return s


paths = {
    "eager device_put(pageable numpy)": lambda st, e: {k: write_slot(st[k], jnp.int32(0), jax.device_put(stacks[k][e]))
                                                        for k in st},
    "eager device_put(pinned expert)": lambda st, e: {k: write_slot(st[k], jnp.int32(0),
                                                                    jax.device_put(per_expert[e][k], DEVICE))
                                                       for k in st},
    "jit slice pinned stack": lambda st, e: copy_from_stack(st, jnp.int32(0), pinned, jnp.int32(e)),
    "jit pinned expert": lambda st, e: copy_from_expert(st, jnp.int32(0), per_expert[e]),
}
for name, step in paths.items():
    try:
        run_path(name, step)
    except Exception as exc:  # noqa: BLE001
        rows.append((f"copy 1 expert: {name}", f"fails: {type(exc).__name__}: {str(exc)[:100]}"))
        staging = {"w1": jnp.zeros((2, F, H), jnp.bfloat16), "w3": jnp.zeros((2, F, H), jnp.bfloat16),
                   "w2": jnp.zeros((2, H, F), jnp.bfloat16)}

# 3. dispatch time vs completion time of the jit copy
for name in ("jit slice pinned stack", "jit pinned expert"):
    try:
        t = time.perf_counter()
        staging = paths[name](staging, 1)
        dispatch = time.perf_counter() - t
        jax.block_until_ready(staging)
        total = time.perf_counter() - t
        rows.append((f"{name}: dispatch / done", f"{dispatch * 1e3:.2f} / {total * 1e3:.2f} ms"))
    except Exception as exc:  # noqa: BLE001
        rows.append((f"{name}: dispatch", f"fails: {exc!s:.80}"))

# 4. CPU kernel on the pinned view, alone and beside copies
sys.path.insert(0, os.getcwd())
from fiddler_jax.kernels import cpu_features, grouped_expert_ffn_numpy  # noqa: E402

feats = cpu_features()
result["cpu_features"] = {k: v for k, v in feats.items() if k != "paths_for_tokens"}
views = {k: np.asarray(v) for k, v in pinned.items()}
x = random_bf16((1, H), 9)
out = np.zeros((1, H), np.float32)
tok = np.zeros(E, np.int32)
exp = np.arange(E, dtype=np.int32)
wts = np.full(E, 0.25, np.float32)


def kernel():
    grouped_expert_ffn_numpy(x, tok, exp, wts, views["w1"], views["w3"], views["w2"], out=out)


k_alone = median_time(kernel)
rows.append((f"CPU kernel n=1 x {E} experts alone (pinned view)", f"{k_alone * 1e3:.2f} ms"))
best = min((n for n in ("jit slice pinned stack", "jit pinned expert") if f"copy_ms[{n}]" in result),
           key=lambda n: result[f"copy_ms[{n}]"], default=None)
if best:
    copies = 4

    def both():
        global staging
        t0 = time.perf_counter()
        for i in range(copies):
            staging = paths[best](staging, i % E)
        t_disp = time.perf_counter() - t0
        kernel()
        t_k = time.perf_counter() - t0
        jax.block_until_ready(staging)
        return t_disp, t_k, time.perf_counter() - t0

    both()
    samples = [both() for _ in range(REPEAT)]
    disp, kend, total = (float(np.median([s[i] for s in samples])) for i in range(3))
    copies_alone = result[f"copy_ms[{best}]"] * copies
    rows.append((f"{copies} copies ({best}) alone (sum)", f"{copies_alone:.2f} ms"))
    rows.append((f"{copies} copies + kernel together", f"dispatch {disp * 1e3:.2f}, kernel done {kend * 1e3:.2f}, "
                 f"all done {total * 1e3:.2f} ms"))
    result["overlap"] = {"copies_alone_ms": copies_alone, "kernel_alone_ms": k_alone * 1e3,
                         "together_ms": total * 1e3, "kernel_end_ms": kend * 1e3}

ref = np.zeros((1, H), np.float64)
for e in range(E):
    xe = x.astype(np.float64)
    g = xe @ stacks["w1"][e].astype(np.float64).T
    u = xe @ stacks["w3"][e].astype(np.float64).T
    ref += 0.25 * ((g / (1 + np.exp(-g)) * u) @ stacks["w2"][e].astype(np.float64).T)
kernel()
rows.append(("kernel on pinned view vs float64", f"rel err {np.linalg.norm(out - ref) / np.linalg.norm(ref):.2e}"))

out_dir = os.environ.get("OUT", ".")
with open(os.path.join(out_dir, "probe_pinned_lane.json"), "w") as f:
    json.dump(result, f, indent=1)
width = max(len(r[0]) for r in rows)
print("\n" + "\n".join(f"{a:<{width}}  {b}" for a, b in rows))
