"""Device probe: where does a hybrid decode layer step spend the time the CPU kernel does not?

At 24 GiB a Mixtral-8x7B decode layer step took 5.8-6.4 ms of which the CPU lane was busy 4.8 ms (session 5's
trace); the rest is host work and waiting. This probe builds the engine over a random model with Mixtral-8x7B's
layer geometry and fewer layers (``--layers``, default 8; ``--resident`` experts on the GPU, default 2 per
layer: about 1.5 offloaded experts per layer step, as at 24 GiB), then in one process:

1. decodes with host timers around each part of the step -- the attention segment's dispatch, the routing sync
   (``jax.device_get``), the planner, the GPU mix's dispatch, the CPU lane, the rest of ``_hybrid_moe``, and
   what is left per step outside it (embedding, head, sampling, the loop) -- for variants of the kernel's thread
   pool and of the CPU lane, in interleaved rounds: ``default`` (the engine's defaults: the resident experts'
   mix queued before the routing sync, the main thread then runs the kernel; pool spin 50 us), ``late_mix``
   (the mix queued after the plan, the order before session 7), ``pinned_out`` (the CPU lane's output through
   a pinned buffer and one DMA, as prefill's large outputs go, instead of numpy), ``inline`` (as before
   session 6: spin 200 us;
   the pool's slots are claimed by whoever is awake), ``thread`` (the kernel
   starts on the lane's worker thread before the GPU calls are queued), ``wait_all`` (the pool's old contract:
   every worker joins every phase), ``spin 1 ms`` (workers stay awake between layer steps), ``15 threads`` (a
   core left to Python and XLA); it checks that every variant generates the same tokens;
2. times the routing sync's transfer alone: ``device_get`` of the step's five small arrays against one packed
   array of the same bytes;
   (the step's sync is now one packed transfer, ``runtime/routing_sync.py``);
3. times the kernel alone on the engine's pinned experts (1 and 2 experts, one token): back to back, and after
   1 ms idle (the pool's workers asleep), per pool variant.

Prints a table last; writes $OUT/probe_decode_step.json when $OUT is set.

    python scripts/probe_decode_step.py [--layers 8] [--resident 16] [--tokens 48] [--rounds 2]
"""
from __future__ import annotations

import argparse
import collections
import dataclasses
import functools
import json
import os
import time

import fiddler_jax  # noqa: F401  (first: raises the pinned host memory cap before JAX starts)

import jax
import jax.numpy as jnp
import numpy as np

from fiddler_jax import kernels as K
from fiddler_jax.experiments.bench import random_model_config
from fiddler_jax.runtime import engine as E
from fiddler_jax.runtime.pinned_activations import PinnedActivations

TIMES: dict[str, float] = collections.defaultdict(float)
CALLS: dict[str, int] = collections.defaultdict(int)


def timed(name, fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        t = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            TIMES[name] += time.perf_counter() - t
            CALLS[name] += 1
    return wrapper


LAST: dict[str, tuple] = {}  # the last arguments of the attention segment and of the GPU mix


def capture(name, fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        LAST[name] = args
        return fn(*args, **kwargs)
    return wrapper


def instrument(engine) -> None:
    """Host timers around the step's parts (the probe's own process only)."""
    E._stack_mix = timed("gpu mix dispatch", capture("mix", E._stack_mix))
    E.Engine._plan = timed("planner", E.Engine._plan)
    E.Engine._run_cpu_lane = timed("cpu lane", E.Engine._run_cpu_lane)
    E.Engine._hybrid_moe = timed("_hybrid_moe", E.Engine._hybrid_moe)
    engine._steps = [(fused, timed("attention dispatch", capture("attention", attn))) for fused, attn in engine._steps]


def dispatch_micro(engine, repeat=50) -> dict:
    """The attention segment and the GPU mix called alone with the last decode step's arguments: host time of
    the call (dispatch) and to the result on the host, with the CPU lane's output as numpy (as the engine passes
    it) and already on the device."""
    leaves, pending, _, start, lookahead = LAST["attention"]
    attn = engine._steps[0][1].__wrapped__.__wrapped__
    kv = engine.model.init_cache(1, 256)[0]
    res = {}
    variants = {"attention, cpu_out numpy": pending}
    if len(pending) == 3:
        variants["attention, cpu_out on device"] = pending[:2] + (jax.device_put(pending[2], jax.devices()[0]),)
    for name, pend in variants.items():
        disp, total = [], []
        for _ in range(repeat):
            t = time.perf_counter()
            out = attn(leaves, pend, kv, start, lookahead)
            t1 = time.perf_counter()
            jax.block_until_ready(out)
            disp.append(t1 - t)
            total.append(time.perf_counter() - t)
            kv = out[-1]
        res[name] = {"dispatch_ms": float(np.median(disp) * 1e3), "done_ms": float(np.median(total) * 1e3)}
    mix = E._stack_mix.__wrapped__.__wrapped__
    disp, total = [], []
    for _ in range(repeat):
        t = time.perf_counter()
        out = mix(*LAST["mix"])
        t1 = time.perf_counter()
        out.block_until_ready()
        disp.append(t1 - t)
        total.append(time.perf_counter() - t)
    res["gpu mix"] = {"dispatch_ms": float(np.median(disp) * 1e3), "done_ms": float(np.median(total) * 1e3)}
    return res


POOLS = {
    # the engine's defaults since session 7: pool spin 50 us, CPU lane inline, resident mix queued before the sync
    "default": dict(threads=0, spin_us=50, wait_all=False, thread=False),
    "late_mix": dict(threads=0, spin_us=50, wait_all=False, thread=False, late_mix=True),  # the order before
    # decode's 16 KB CPU output also through a pinned buffer and one DMA (by default only outputs from 1 MiB)
    "pinned_out": dict(threads=0, spin_us=50, wait_all=False, thread=False, pinned_out=True),
    "inline": dict(threads=0, spin_us=200, wait_all=False, thread=False),
    "thread": dict(threads=0, spin_us=200, wait_all=False, thread=True),
    "inline+wait_all": dict(threads=0, spin_us=200, wait_all=True, thread=False),
    "inline+spin_1ms": dict(threads=0, spin_us=1000, wait_all=False, thread=False),
    "inline+15_threads": dict(threads=15, spin_us=200, wait_all=False, thread=False),
    "inline+spin_50us": dict(threads=0, spin_us=50, wait_all=False, thread=False),
    "thread+spin_50us": dict(threads=0, spin_us=50, wait_all=False, thread=True),
    "thread+spin_0": dict(threads=0, spin_us=0, wait_all=False, thread=True),
}


def use_pool(name: str, engine=None) -> None:
    """A variant: the kernel pool's threads, spin and contract, and whether the CPU lane runs inline on the main
    thread (after the GPU calls are queued) or on its worker thread (before)."""
    p = POOLS[name]
    K.set_num_threads(p["threads"])
    K.set_pool(spin_us=p["spin_us"], wait_all=p["wait_all"])
    if engine is not None:
        engine.cpu_lane_thread = p["thread"]
        engine.early_resident_mix = not p.get("late_mix", False)
        engine.set_pinned_activations(True)
        if p.get("pinned_out"):
            engine.pinned = PinnedActivations(jax.devices()[0], min_bytes=0)


def decode(engine, prompt, tokens) -> dict:
    TIMES.clear()
    CALLS.clear()
    engine.trace.clear()
    t = time.perf_counter()
    ids, stats = engine.generate_with_stats(prompt, tokens)
    wall = time.perf_counter() - t
    steps = CALLS["_hybrid_moe"]
    per_step = {k: v / steps * 1e3 for k, v in TIMES.items()}
    # the trace's plan span is the routing sync (waiting for the attention segment, one transfer) + the planner
    per_step["sync"] = sum(r.busy_s("plan") for r in engine.trace.steps) / steps * 1e3 - per_step["planner"]
    # the GPU mix is dispatched inside _hybrid_moe (late) or before it, in the layer loop (early, the default)
    mix_inside = 0.0 if engine.early_resident_mix else per_step.get("gpu mix dispatch", 0.0)
    mix_outside = per_step.get("gpu mix dispatch", 0.0) - mix_inside
    inner = sum(per_step.get(k, 0.0) for k in ("sync", "planner", "cpu lane")) + mix_inside
    per_step["rest of _hybrid_moe"] = per_step["_hybrid_moe"] - inner
    per_step["outside the step"] = (wall / steps * 1e3 - per_step["_hybrid_moe"] - per_step["attention dispatch"]
                                    - mix_outside)
    cpu_experts = engine.trace.summary()["experts_per_lane"]["cpu"]
    return {"ids": np.asarray(ids).tolist(), "decode_tokens_per_s": stats.decode_tokens_per_s, "wall_s": wall, "steps": steps,
            "ms_per_step": wall / steps * 1e3, "cpu_experts_per_step": cpu_experts / steps, "per_step_ms": per_step}


def sync_transfer(engine, repeat=300) -> dict:
    """device_get of the decode step's five arrays (counts, experts, weights, predicted, moe_in) against one
    packed uint32 array of the same bytes, all ready on the device."""
    cfg = engine.config
    dev = jax.devices()[0]
    parts = (jnp.zeros(cfg.num_local_experts, jnp.int32), jnp.zeros((1, 2), jnp.int32),
             jnp.zeros((1, 2), jnp.float32), jnp.zeros(cfg.num_local_experts, jnp.int32),
             jnp.zeros((1, cfg.hidden_size), jnp.bfloat16))
    parts = jax.device_put(parts, dev)
    packed = jax.device_put(jnp.zeros(8 + 2 + 2 + 8 + cfg.hidden_size // 2, jnp.uint32), dev)
    jax.block_until_ready((parts, packed))
    out = {}
    for name, value in (("five arrays", parts), ("one packed array", packed)):
        jax.device_get(value)
        t = time.perf_counter()
        for _ in range(repeat):
            jax.device_get(value)
        out[name] = (time.perf_counter() - t) / repeat * 1e3
    return out


def kernel_alone(engine, repeat=20) -> dict:
    """The grouped kernel on the engine's pinned experts of the first hybrid layer, one token."""
    layer = next(n for n in range(engine.config.num_hidden_layers) if not engine.placement.layer_all_resident(n))
    offloaded = np.flatnonzero(~engine.placement.resident[layer])
    tables = engine.host.tables(layer)
    x = np.asarray(jax.random.normal(jax.random.key(0), (1, engine.config.hidden_size), jnp.bfloat16))
    out = np.zeros(x.shape, np.float32)
    res = {}
    for k in (1, 2):
        experts = [np.asarray(offloaded[i:i + k], np.int32) for i in range(0, len(offloaded) - k + 1, k)]
        for idle in (0.0, 1e-3):
            samples = []
            for i in range(repeat):
                ex = experts[i % len(experts)]
                if idle:
                    time.sleep(idle)
                t = time.perf_counter()
                K.grouped_expert_ffn_numpy(x, np.zeros(k, np.int32), ex, np.full(k, 0.5, np.float32), *tables,
                                           out=out)
                samples.append(time.perf_counter() - t)
            res[f"{k} expert{'s' if k > 1 else ''}, {'after 1 ms idle' if idle else 'back to back'}"] = \
                float(np.median(samples) * 1e3)
    return res


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--resident", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=48)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--planner", default="fiddler_overlap")
    ap.add_argument("--latency", default="fiddler_jax/runtime/latency_h100.json")
    ap.add_argument("--pools", default=",".join(POOLS))
    ap.add_argument("--profile", action="store_true", help="cProfile one decode with the default variant")
    ap.add_argument("--hidden", type=int, default=4096)  # smaller: a quick run on the CPU
    ap.add_argument("--ffn", type=int, default=14336)
    args = ap.parse_args()
    # Mixtral-8x7B's geometry (conf/model/mixtral_8x7b_random.yaml) with fewer layers
    config = dataclasses.replace(random_model_config(), num_hidden_layers=args.layers, hidden_size=args.hidden,
                                 intermediate_size=args.ffn)
    t = time.perf_counter()
    engine = E.Engine.from_random(config, gpu_budget="40GiB", resident_experts=args.resident,
                                  planner=args.planner, latency=args.latency, max_context=256, progress=False)
    print(f"engine built in {time.perf_counter() - t:.0f} s: {engine.placement.memory}", flush=True)
    instrument(engine)
    prompt = np.arange(1, 17, dtype=np.int32)[None]
    use_pool("default", engine)
    decode(engine, prompt, 8)  # compile
    rounds = collections.defaultdict(list)
    pools = args.pools.split(",")
    for r in range(args.rounds):
        for name in pools:
            use_pool(name, engine)
            decode(engine, prompt, 4)  # the pool warms up
            rounds[name].append(decode(engine, prompt, args.tokens))
            print(r, name, f"{rounds[name][-1]['decode_tokens_per_s']:.2f} tok/s", flush=True)
    kernel = {}
    for name in pools:
        use_pool(name)
        kernel[name] = kernel_alone(engine)
    use_pool("default", engine)
    same = len({json.dumps(r["ids"]) for runs in rounds.values() for r in runs}) == 1
    print("every variant generated the same tokens:", same, flush=True)
    sync = sync_transfer(engine)
    micro = dispatch_micro(engine)
    if args.profile:
        import cProfile
        import pstats

        prof = cProfile.Profile()
        prof.enable()
        decode(engine, prompt, args.tokens)
        prof.disable()
        pstats.Stats(prof).sort_stats("tottime").print_stats(25)
    result = {"same_tokens": same, "calls_alone_ms": micro, "args": vars(args), "device": str(jax.devices()[0]), "jax": jax.__version__,
              "git_sha": os.environ.get("FIDDLER_GIT_SHA", "unknown"), "decode": rounds, "kernel_ms": kernel,
              "sync_transfer_ms": sync}
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], "probe_decode_step.json"), "w") as f:
            json.dump(result, f, indent=1)

    print("\ncalls alone with the last decode step's arguments (ms, median):")
    for k, v in micro.items():
        print(f"  {k:32s} dispatch {v['dispatch_ms']:.3f}  to done {v['done_ms']:.3f}")
    print(f"\nrouting sync transfer alone (ms): " + ", ".join(f"{k} {v:.3f}" for k, v in sync.items()))
    print("\nkernel alone on pinned experts, one token (ms, median):")
    keys = list(next(iter(kernel.values())))
    print(f"{'pool':20s}" + "".join(f"{k:>34s}" for k in keys))
    for name, row in kernel.items():
        print(f"{name:20s}" + "".join(f"{row[k]:34.3f}" for k in keys))
    parts = ["attention dispatch", "sync", "planner", "gpu mix dispatch", "cpu lane", "rest of _hybrid_moe",
             "outside the step"]
    print(f"\ndecode, {args.layers} layers, {args.resident} resident, {args.tokens} tokens; per layer step (ms), "
          f"median of {args.rounds} rounds:")
    print(f"{'pool':20s}{'tok/s':>8s}{'ms/step':>9s}{'cpu exp':>8s}" + "".join(f"{p[:18]:>20s}" for p in parts))
    for name, runs in rounds.items():
        med = lambda f: float(np.median([f(r) for r in runs]))  # noqa: E731
        print(f"{name:20s}{med(lambda r: r['decode_tokens_per_s']):8.2f}{med(lambda r: r['ms_per_step']):9.3f}"
              f"{med(lambda r: r['cpu_experts_per_step']):8.2f}"
              + "".join(f"{med(lambda r, p=p: r['per_step_ms'][p]):20.3f}" for p in parts))


if __name__ == "__main__":
    main()
