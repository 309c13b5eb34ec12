"""Where a decode token's time goes, layer step by layer step, for several planners on one engine (a script).

    python benchmarks/layer_step_anatomy.py [--model qwen3_30b_a3b_random] [--budget 16GiB] [--prompt 128]
        [--tokens 32] [--layers N] [--variants cpu_only,cpu_only/synced,fiddler_overlap,fiddler_overlap/synced,fiddler]
        [--profile fiddler_overlap/synced] [--json PATH]

The model is a random-weight preset of ``fiddler_jax/conf/model/`` (its exact geometry, weights made in memory),
the latency model this machine's calibration (``latency=auto``). A variant is ``planner`` or ``planner/<mode>``:
``synced`` (the streamed lane off: every MoE step syncs and plans), ``perlayer`` (streamed steps dispatched layer by
layer, not as one program per token), ``serial`` (a streamed step's CPU lane after its resident mix). For each
variant, after a warm-up that compiles every shape, one greedy decode of ``--tokens`` tokens with the trace on,
and per decode token:
  * tok/s (steady state, ``GenerationStats``) and ms per token;
  * layer steps that synced and planned / that streamed, experts per lane;
  * per synced step: the ``plan`` span (waiting for the routing sync, then planning), the ``cpu``, ``pcie`` and
    ``gpu`` spans (:mod:`fiddler_jax.runtime.trace`), the planner's predicted makespan and the step's wall time;
  * ``unaccounted``: token time minus the synced steps' wall time -- attention, the head and the Python between
    steps, or for streamed steps the device's own queue.
``--profile``: one variant also runs under cProfile (8 tokens); the functions with the most own time, and the
call counts of the engine's dispatching methods per token, are printed (the dispatches per token).
Also printed: the latency model's numbers for this geometry (cpu(1), gpu(1), copy, sync). Prints a line per stage,
the table last; writes JSON (config, git SHA, versions, hardware) to ``--json`` (default
``$OUT/layer_step_anatomy.json``).
"""
from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import pstats
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# the engine's methods that dispatch device work or hand work to a lane, counted per token under --profile
DISPATCHERS = ("attention_and_router", "attention_and_cpu_begin", "end", "fused_layer", "resident_mix", "mix",
               "_dispatch", "copy_and_mix", "run", "_run_program", "submit", "unpack", "to_device", "fetch", "head",
               "embed")


def log(msg: str) -> None:
    print(f"[anatomy {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def build(model: str, budget: str, context: int, layers: int | None = None):
    from omegaconf import OmegaConf

    from fiddler_jax.experiments.model_group import random_model_config
    from fiddler_jax.runtime.engine import Engine

    preset = OmegaConf.load(os.path.join(ROOT, "fiddler_jax", "conf", "model", f"{model}.yaml"))
    if not preset.get("random"):
        raise SystemExit(f"error: model={model} is not a random-weight preset")
    if layers:
        preset.geometry.num_hidden_layers = layers
    config = random_model_config(preset.geometry, model)
    return Engine.from_random(config, weight_seed=int(preset.weight_seed), router_bias=float(preset.router_bias),
                              gpu_budget=budget, latency="auto", max_batch=1, max_context=context,
                              planner="fiddler_overlap")


def variant_engine(engine, variant: str):
    from fiddler_jax.runtime.options import EngineOptions

    planner, _, mode = variant.partition("/")
    modes = {"": {}, "synced": dict(streamed_cpu_lane=False), "perlayer": dict(token_program=False),
             "serial": dict(streamed_overlap=False)}
    if mode not in modes:
        raise SystemExit(f"error: variant {variant!r}: the mode after / must be one of synced, perlayer, serial")
    return engine.with_planner(planner, options=EngineOptions(**modes[mode]))


def anatomy(engine, steps, tokens: int, token_s: float, top_k: int) -> dict:
    """Per-token figures of the one-token layer steps in ``steps`` (module docstring)."""
    decode = [s for s in steps if int(s.counts.sum()) == top_k]
    synced = [s for s in decode if "plan" in s.spans]
    per = lambda x: x / (tokens - 1)  # noqa: E731  (the first new token comes from the prefill)
    lanes = np.concatenate([s.lanes[s.counts > 0] for s in decode]) if decode else np.zeros(0, np.int8)
    from fiddler_jax.runtime.planning import Lane

    def mean_ms(values):
        return float(np.mean(values) * 1e3) if len(values) else 0.0

    out = {
        "ms_per_token": token_s * 1e3,
        "synced_steps": per(len(synced)), "streamed_steps": per(len(decode) - len(synced)),
        "experts_gpu": per(int((lanes == Lane.GPU).sum())), "experts_cpu": per(int((lanes == Lane.CPU).sum())),
        "experts_copied": per(int((lanes == Lane.TRANSFER).sum())),
        "synced_ms": {lane: mean_ms([s.busy_s(lane) for s in synced if lane in s.spans])
                      for lane in ("plan", "cpu", "pcie", "gpu")},
        "synced_wall_ms": mean_ms([s.wall_s for s in synced]),
        "synced_predicted_ms": mean_ms([s.predicted_s for s in synced]),
        "streamed_cpu_ms": mean_ms([s.busy_s("cpu") for s in decode if "plan" not in s.spans]),
    }
    out["unaccounted_ms_per_token"] = out["ms_per_token"] - out["synced_steps"] * out["synced_wall_ms"]
    return out


def host_ms(fn, reps: int) -> float:
    """Median host milliseconds one call of ``fn`` holds the calling thread (the device idle before each call:
    what the call's dispatch costs, not its device work)."""
    import jax

    times = []
    for _ in range(reps):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
        jax.block_until_ready(out)
    return float(np.median(times) * 1e3)


def entry_ops(lowered) -> int:
    """Instructions of the compiled program's entry computation other than parameters, constants, tuples and
    bitcasts: about the kernels (or command-buffer launches) one call issues."""
    text = lowered.compile().as_text()
    entry = text[text.index("ENTRY"):]
    entry = entry[:entry.index("\n}")]
    skip = ("parameter(", "constant(", "tuple(", "get-tuple-element(", "bitcast(")
    return sum(1 for line in entry.splitlines()[1:] if "=" in line and not any(k in line for k in skip))


def vectorized_rowwise_ffn(x_rows, expert_ids, w1, w3, w2):
    """The rowwise form without the unroll: every row's expert rows gathered inside one multiply-and-sum per
    weight (what XLA can fuse into one reduction kernel each)."""
    import jax
    import jax.numpy as jnp

    f32 = jnp.float32

    def matvecs(w, v):  # w [E, out, in], v [M, in] -> [M, out]
        return jnp.sum(w[expert_ids].astype(f32) * v.astype(f32)[:, None, :], axis=-1)

    act = (jax.nn.silu(matvecs(w1, x_rows)) * matvecs(w3, x_rows)).astype(w2.dtype)
    return matvecs(w2, act)


def dispatch_costs(engine, context: int, reps: int = 200) -> dict:
    """Host ms per call of each jitted piece of a synced decode step, with the arguments the engine passes, the
    device time of a call (host call to ready, device idle before), and the compiled entry's op count."""
    import jax
    import jax.numpy as jnp

    from fiddler_jax.models import moe
    from fiddler_jax.runtime.segments import stack_mix, staged_mix
    from fiddler_jax.timing import median_of

    seg, ex = engine.resources.segments, engine.executor
    layer = next(n for n, row in enumerate(engine.placement.resident) if not row.all())
    dev = engine.resources.device
    cache = [engine.model.init_cache(1, context)[layer]]
    start = jnp.int32(5)
    x = seg.embed(jnp.zeros((1, 1), jnp.int32))
    hidden = x.shape[-1]
    numpy_out = np.zeros((1, hidden), np.float32)
    device_out = jnp.zeros((1, hidden), jnp.float32, device=dev)
    attention_fn = seg.steps[layer][1]

    def attention(pending):
        def call():
            out = seg.attention_and_router(layer, pending, cache[0], start, False)
            cache[0] = out[-1]
            return out
        return call, lambda: attention_fn.lower(seg.layers[layer].leaves, pending, cache[0], start, None)

    h, moe_in, routing, shared, sync, kv = attention((x,))[0]()
    cache[0] = kv
    gpu_out = ex.gpu.resident_mix(layer, moe_in, routing, shared)
    pool = ex.pcie.pool
    E = engine.config.num_experts
    offloaded = np.flatnonzero(~engine.placement.resident[layer])
    stack = pool.stack()
    slot_np = np.full(E, -1, np.int32)
    slot_np[offloaded[:2]] = [0, 1]
    slot_dev = jnp.asarray(slot_np, device=dev)
    trivial = jax.jit(lambda a, b: a + b)
    resident_args = (moe_in, routing, ex.gpu._slot_of[layer], *ex.gpu._stacks[layer], shared)
    staged_args = (moe_in, routing, slot_dev, stack["w1"], stack["w3"], stack["w2"], gpu_out)

    original = moe.rowwise_expert_ffn
    moe.rowwise_expert_ffn = vectorized_rowwise_ffn
    try:  # the same mixes with the vectorized form, traced now (jax.jit traces on first call)
        vec_stack_mix = jax.jit(lambda *a: moe.sparse_expert_mix(*a[:6]) + (0 if a[6] is None else a[6]))
        vec_staged_mix = jax.jit(lambda m, r, s, w1, w3, w2, acc: acc + moe.sparse_expert_mix(m, r, w1, w3, w2, s))
        vec_stack_lowered = vec_stack_mix.lower(moe_in, routing, resident_args[3], resident_args[4],
                                                resident_args[5], resident_args[2], shared)
        vec_staged_lowered = vec_staged_mix.lower(*staged_args)
        vec_stack_compiled, vec_staged_compiled = vec_stack_lowered.compile(), vec_staged_lowered.compile()
    finally:
        moe.rowwise_expert_ffn = original
    ref = np.asarray(stack_mix(*resident_args))
    vec = np.asarray(vec_stack_compiled(moe_in, routing, resident_args[3], resident_args[4], resident_args[5],
                                        resident_args[2], shared))
    log(f"vectorized rowwise vs unrolled resident mix: max |diff| {np.abs(ref - vec).max():.3g} "
        f"(scale {np.abs(ref).max():.3g})")

    def copy(n):
        def call():
            pool.copy(layer, offloaded[:n].tolist())
            pool.wait(layer)
            pool.release(layer)
        return call

    costs = {
        "trivial jit (2 device args)": (lambda: trivial(x, x), lambda: trivial.lower(x, x)),
        "attention_and_router, input (x,)": attention((x,)),
        "attention_and_router, input (h, gpu, cpu numpy)": attention((h, gpu_out, numpy_out)),
        "attention_and_router, input (h, gpu, cpu device)": attention((h, gpu_out, device_out)),
        "resident_mix (stack_mix)": (lambda: stack_mix(*resident_args), lambda: stack_mix.lower(*resident_args)),
        "resident_mix, vectorized rowwise": (
            lambda: vec_stack_compiled(moe_in, routing, resident_args[3], resident_args[4], resident_args[5],
                                       resident_args[2], shared), lambda: vec_stack_lowered),
        "staged_mix, slot map numpy": (lambda: staged_mix(moe_in, routing, slot_np, *staged_args[3:]), None),
        "staged_mix, slot map device": (lambda: staged_mix(*staged_args), lambda: staged_mix.lower(*staged_args)),
        "staged_mix, vectorized rowwise": (lambda: vec_staged_compiled(*staged_args), lambda: vec_staged_lowered),
        "sync to host (ready)": (lambda: np.asarray(sync), None),
        "stage_copy 1 expert + wait": (copy(1), None),
        "stage_copy 2 experts + wait": (copy(2), None),
        "head (last position)": (lambda: seg.head((h, gpu_out, numpy_out), True), None),
    }
    tables = engine.streamed.registrations.id_of(layer) if engine.streamed.fits(layer) else None
    if tables is not None:
        costs["streamed CPU mix (custom call)"] = (lambda: engine.streamed.mix(moe_in, routing, tables), None)
    out = {}
    for name, (fn, lower) in costs.items():
        try:
            jax.block_until_ready(fn())  # compile
            row = {"host_ms": host_ms(fn, reps),
                   "device_ms": median_of(lambda: jax.block_until_ready(fn()), reps // 4, warmup=0) * 1e3}
            if lower is not None:
                row["entry_ops"] = entry_ops(lower())
            out[name] = row
        except Exception as e:  # noqa: BLE001 -- a benchmark reports what failed and goes on
            out[name] = {"error": f"{type(e).__name__}: {e}"[:300]}
        log(f"dispatch: {name}: {out[name]}")
    return out


def profile_calls(engine, ids, tokens: int, kv_slots: int) -> tuple[str, dict]:
    prof = cProfile.Profile()
    prof.enable()
    engine.generate_with_stats(ids, tokens, kv_slots=kv_slots)
    prof.disable()
    text = io.StringIO()
    stats = pstats.Stats(prof, stream=text)
    stats.sort_stats("tottime").print_stats(25)
    calls = {}
    for (path, _, name), (_, ncalls, *_rest) in stats.stats.items():
        if "fiddler_jax" in path and name in DISPATCHERS:
            key = f"{os.path.basename(path)}:{name}"
            calls[key] = calls.get(key, 0) + ncalls / tokens  # the prefill and tokens - 1 decode passes
    return text.getvalue(), dict(sorted(calls.items()))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="qwen3_30b_a3b_random")
    ap.add_argument("--budget", default="16GiB")
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--layers", type=int, default=None, help="fewer layers than the preset (a quick check)")
    ap.add_argument("--variants", default="cpu_only,cpu_only/synced,fiddler_overlap,fiddler_overlap/synced,fiddler")
    ap.add_argument("--profile", default="fiddler_overlap/synced", help="variant run under cProfile ('' for none)")
    ap.add_argument("--dispatch-only", action="store_true", help="only the host cost per jitted piece")
    ap.add_argument("--json", default=os.path.join(os.environ.get("OUT", "."), "layer_step_anatomy.json"))
    args = ap.parse_args()

    from fiddler_jax.provenance import provenance

    context = -(-(args.prompt + args.tokens) // 64) * 64 + 64  # cache_length's bucket, room for the warm-up
    log(f"building {args.model} at {args.budget}")
    t = time.perf_counter()
    engine = build(args.model, args.budget, context, args.layers)
    log(f"built in {time.perf_counter() - t:.0f} s; offloaded experts {engine.placement.offloaded_count}")
    lat = engine.latency
    latency = {"cpu1_ms": lat.cpu(1) * 1e3, "cpu8_ms": lat.cpu(8) * 1e3, "gpu1_ms": lat.gpu(1) * 1e3,
               "copy_ms": lat.transfer_s * 1e3, "sync_ms": lat.sync_s * 1e3}
    log("latency model: " + ", ".join(f"{k} {v:.3f}" for k, v in latency.items()))
    dispatch = dispatch_costs(engine, context)
    cfg = engine.config
    rng = np.random.default_rng(0)
    ids = rng.integers(0, cfg.vocab_size, (1, args.prompt), dtype=np.int32)
    rows, profile = {}, None
    for variant in [v for v in args.variants.split(",") if v and not args.dispatch_only]:
        e = variant_engine(engine, variant)
        log(f"{variant}: warm-up")
        e.generate_with_stats(ids, 4, kv_slots=context)
        e.trace.clear()
        _, stats = e.generate_with_stats(ids, args.tokens, kv_slots=context)
        e.step_loop.drain()
        rate = stats.decode_tokens_per_s
        rows[variant] = {"tok_s": rate, **anatomy(e, e.trace.steps, args.tokens, 1.0 / rate, cfg.num_experts_per_tok)}
        log(f"{variant}: {rate:.2f} tok/s")
        if variant == args.profile:
            text, calls = profile_calls(e, ids, 8, context)
            profile = {"variant": variant, "top": text, "calls_per_pass": calls}
    cols = ["tok_s", "ms_per_token", "synced_steps", "streamed_steps", "experts_cpu", "experts_copied",
            "synced_wall_ms", "synced_predicted_ms", "unaccounted_ms_per_token"]
    result = {"args": vars(args), "latency_model": latency, "dispatch_ms": dispatch, "rows": rows, "profile": profile,
              "provenance": provenance()}
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump(result, f, indent=1, default=str)
    if profile:
        print(f"--- cProfile of {profile['variant']} (8 tokens), own time ---")
        print("\n".join(profile["top"].splitlines()[:45]))
        print("--- engine dispatch calls per forward pass ---")
        for k, v in profile["calls_per_pass"].items():
            print(f"  {k:40s} {v:8.1f}")
    print("--- host ms per call and ms to ready, device idle before (median); compiled entry ops ---")
    print(f"  {'piece':50s} {'host':>7s} {'ready':>7s} {'ops':>4s}")
    for k, v in dispatch.items():
        if "error" in v:
            print(f"  {k:50s} {v['error']}")
        else:
            print(f"  {k:50s} {v['host_ms']:7.3f} {v['device_ms']:7.3f} "
                  f"{v.get('entry_ops', ''):>4}")
    print("--- synced step spans (ms, mean) ---")
    for variant, r in rows.items():
        print(f"  {variant:26s} " + "  ".join(f"{k} {v:.3f}" for k, v in r["synced_ms"].items())
              + f"  streamed cpu {r['streamed_cpu_ms']:.3f}")
    print(" | ".join(["variant"] + cols))
    for variant, r in rows.items():
        print(" | ".join([variant] + [f"{r[c]:.2f}" for c in cols]))


if __name__ == "__main__":
    main()
