"""Where a decode token's time goes, layer step by layer step, for several planners on one engine (a script).

    python benchmarks/layer_step_anatomy.py [--model qwen3_30b_a3b_random] [--budget 16GiB] [--prompt 128]
        [--tokens 32] [--layers N] [--variants cpu_only,cpu_only/synced,fiddler_overlap,fiddler_overlap/synced,fiddler]
        [--profile fiddler_overlap/synced] [--json PATH]

The model is a random-weight preset of ``fiddler_jax/conf/model/`` (its exact geometry, weights made in memory),
the latency model this machine's calibration (``latency=auto``). A variant is ``planner`` or ``planner/synced``
(the streamed lane off: every MoE step syncs and plans). For each variant, after a warm-up that compiles every
shape, one greedy decode of ``--tokens`` tokens with the trace on, and per decode token:
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
DISPATCHERS = ("attention_and_router", "fused_layer", "resident_mix", "mix", "_dispatch", "copy_and_mix", "run",
               "submit", "unpack", "to_device", "fetch", "head", "embed")


def log(msg: str) -> None:
    print(f"[anatomy {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def build(model: str, budget: str, context: int, layers: int | None = None):
    from omegaconf import OmegaConf

    from fiddler_jax.experiments.build import random_model_config
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
    if mode not in ("", "synced"):
        raise SystemExit(f"error: variant {variant!r}: the mode after / must be 'synced'")
    return engine.with_planner(planner, options=EngineOptions(streamed_cpu_lane=mode != "synced"))


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
    cfg = engine.config
    rng = np.random.default_rng(0)
    ids = rng.integers(0, cfg.vocab_size, (1, args.prompt), dtype=np.int32)
    rows, profile = {}, None
    for variant in [v for v in args.variants.split(",") if v]:
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
    result = {"args": vars(args), "latency_model": latency, "rows": rows, "profile": profile,
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
    print("--- synced step spans (ms, mean) ---")
    for variant, r in rows.items():
        print(f"  {variant:26s} " + "  ".join(f"{k} {v:.3f}" for k, v in r["synced_ms"].items())
              + f"  streamed cpu {r['streamed_cpu_ms']:.3f}")
    print(" | ".join(["variant"] + cols))
    for variant, r in rows.items():
        print(" | ".join([variant] + [f"{r[c]:.2f}" for c in cols]))


if __name__ == "__main__":
    main()
