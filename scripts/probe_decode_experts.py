"""Device probe: how should a decode step (a few rows, each through one expert of a stack on the GPU) read the
expert weights? The engine's ``gathered_expert_ffn`` indexes the stack (``w1[expert_ids]``), which XLA may
materialise as a copy of the chosen experts: 3x the HBM traffic of the product and an expert-sized transient
that the budget does not count.

For a stack of S Mixtral-8x7B experts (bf16) and M rows, per variant: XLA's temp bytes (compiled memory
analysis), the median time and the effective weight-read bandwidth (M distinct experts' bytes / time).
  gather      ``gathered_expert_ffn`` (the engine's form before rowwise)
  rowwise     ``rowwise_expert_ffn``: multiply-and-sum per row, the slice fused into the reduction
  dynslice    one dynamic_slice per row (static unroll over M)
  ragged      ``grouped_expert_ffn`` (ragged_dot over the whole stack with group sizes)
  switch      lax.switch per row over static slices of the stack
  onehot_sum  every expert of the stack masked (reads all S: the upper bound of waste)
Prints a table last; writes $OUT/probe_decode_experts.json when OUT is set.
"""
from __future__ import annotations

import json
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from fiddler_jax.models.moe import gathered_expert_ffn, grouped_expert_ffn, rowwise_expert_ffn

H, F = int(os.environ.get("PROBE_HIDDEN", 4096)), int(os.environ.get("PROBE_FFN", 14336))
S = int(os.environ.get("PROBE_SLOTS", 8))
REPS = int(os.environ.get("PROBE_REPS", 30))
F32 = jnp.float32


def ffn(x, w1, w3, w2):
    gate = jnp.dot(x, w1.T, preferred_element_type=F32)
    up = jnp.dot(x, w3.T, preferred_element_type=F32)
    return jnp.dot((jax.nn.silu(gate) * up).astype(w2.dtype), w2.T, preferred_element_type=F32)


def dynslice(x, ids, w1, w3, w2):
    rows = []
    for m in range(x.shape[0]):
        take = lambda w: jax.lax.dynamic_index_in_dim(w, ids[m], keepdims=False)
        rows.append(ffn(x[m:m + 1], take(w1), take(w3), take(w2)))
    return jnp.concatenate(rows)


def switch(x, ids, w1, w3, w2):
    branches = [lambda xm, i=i: ffn(xm, w1[i], w3[i], w2[i]) for i in range(w1.shape[0])]
    return jnp.concatenate([jax.lax.switch(ids[m], branches, x[m:m + 1]) for m in range(x.shape[0])])


def ragged(x, ids, w1, w3, w2):
    order = jnp.argsort(ids)
    sizes = jnp.bincount(ids, length=w1.shape[0]).astype(jnp.int32)
    y = grouped_expert_ffn(x[order], sizes, w1, w3, w2)
    return jnp.zeros_like(y).at[order].set(y)


def onehot_sum(x, ids, w1, w3, w2):
    y = jax.vmap(ffn, in_axes=(None, 0, 0, 0))(x, w1, w3, w2)  # [S, M, H]
    return jnp.einsum("ms,smh->mh", jax.nn.one_hot(ids, w1.shape[0], dtype=F32), y)


VARIANTS = {"gather": gathered_expert_ffn, "rowwise": rowwise_expert_ffn, "dynslice": dynslice, "ragged": ragged, "switch": switch,
            "onehot_sum": onehot_sum}


def main():
    key = jax.random.key(0)
    k1, k3, k2, kx = jax.random.split(key, 4)
    w1 = (jax.random.normal(k1, (S, F, H), jnp.bfloat16) * 0.02)
    w3 = (jax.random.normal(k3, (S, F, H), jnp.bfloat16) * 0.02)
    w2 = (jax.random.normal(k2, (S, H, F), jnp.bfloat16) * 0.02)
    expert_bytes = 3 * H * F * 2
    rows, out = [], {"device": str(jax.devices()[0]), "jax": jax.__version__, "H": H, "F": F, "S": S, "runs": []}
    for m in tuple(int(v) for v in os.environ.get("PROBE_ROWS", "1,2,4").split(",")):
        x = jax.random.normal(kx, (m, H), jnp.bfloat16)
        ids = jnp.asarray(np.arange(m) * 3 % S, jnp.int32)
        ref = None
        for name, fn in VARIANTS.items():
            jf = jax.jit(fn)
            compiled = jf.lower(x, ids, w1, w3, w2).compile()
            mem = compiled.memory_analysis()
            temp = getattr(mem, "temp_size_in_bytes", None) if mem is not None else None
            y = np.asarray(jf(x, ids, w1, w3, w2), np.float32)
            ref = y if ref is None else ref
            err = float(np.abs(y - ref).max() / (np.abs(ref).max() + 1e-30))
            times = []
            for _ in range(REPS):
                t = time.perf_counter()
                jf(x, ids, w1, w3, w2).block_until_ready()
                times.append(time.perf_counter() - t)
            med = statistics.median(times)
            distinct = len(set(np.asarray(ids).tolist()))
            rec = {"variant": name, "M": m, "temp_bytes": temp, "median_s": med, "rel_err_vs_gather": err,
                   "weight_read_GBps": distinct * expert_bytes / med / 1e9}
            out["runs"].append(rec)
            rows.append(f"{name:11s} M={m}  temp {(temp or 0) / 2**20:9.1f} MiB  {med * 1e3:8.3f} ms  "
                        f"{rec['weight_read_GBps']:8.1f} GB/s  err {err:.1e}")
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], "probe_decode_experts.json"), "w") as f:
            json.dump(out, f, indent=1)
    print(f"decode expert read, stack of {S} experts {H}x{F} bf16 on {out['device']} (jax {jax.__version__})")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
