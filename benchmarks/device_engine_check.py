"""Device check of the hybrid engine: on the GPU machine, a random checkpoint with Mixtral-8x7B's expert geometry
(hidden 4096, ffn 14336, 8 experts top-2, GQA 32/8, vocab 32000; fewer layers) written once to ``--dir``, this
machine's latency model calibrated for it, then for each planner an ``Engine.from_pretrained`` with only
``--resident`` experts on the GPU: its logits against the all-resident model, the greedy continuation, compile
counts over a ``--tokens`` run (a plan must never compile again), decode tokens/s and the trace summary (lane
busy times and overlap).

    python benchmarks/device_engine_check.py [--layers 4] [--resident 8] [--tokens 100]

Writes $OUT/engine_check.json (+ a Perfetto trace per planner) and prints a table last. On a CPU-only machine
``--hidden 256 --ffn 512 --vocab 512`` makes a quick run.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import time

import fiddler_jax as fj  # first: raises the pinned host memory cap before JAX starts

import jax
import numpy as np
from flax import nnx

from fiddler_jax.runtime import engine as E
from fiddler_jax.runtime.calibrate import calibrate, table


def compiles(engine) -> dict[str, int]:
    return {k: f._cache_size() for k, f in engine.jitted_functions().items()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--resident", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=100)
    ap.add_argument("--prompt", type=int, default=16)
    ap.add_argument("--planners", default="fiddler,fiddler_overlap,cpu_only,transfer,lru")
    ap.add_argument("--calibrate-s", type=float, default=12.0)
    ap.add_argument("--dir", default="/tmp/fj-engine-check")
    ap.add_argument("--hidden", type=int, default=4096)  # smaller values: a quick run on the CPU
    ap.add_argument("--ffn", type=int, default=14336)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--dtype", default="bfloat16")
    args = ap.parse_args()
    out_dir = os.environ.get("OUT", ".")
    geometry = dict(model_type="mixtral", vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.ffn,
                    num_hidden_layers=args.layers, num_attention_heads=32, num_key_value_heads=8,
                    num_local_experts=8, num_experts_per_tok=2, max_position_embeddings=4096, sliding_window=None,
                    tie_word_embeddings=False)
    result = {"args": vars(args), "geometry": geometry, "device": str(jax.devices()[0]), "jax": jax.__version__}
    t = time.perf_counter()
    if not os.path.exists(os.path.join(args.dir, "config.json")):
        config = fj.ModelConfig.from_hf_dict(geometry, source="device check")
        model = fj.MoeForCausalLM(config, dtype=jax.numpy.bfloat16, rngs=nnx.Rngs(0))
        fj.save_pretrained(model, args.dir)
        del model
        gc.collect()
    print(f"checkpoint ready in {time.perf_counter() - t:.1f} s", flush=True)

    lat, measurements = calibrate(args.hidden, args.ffn, args.dtype, budget_s=args.calibrate_s, progress=False)
    latency_path = os.path.join(out_dir, "latency.json")
    lat.save(latency_path)
    print(table(lat, measurements), flush=True)
    result["latency"] = json.load(open(latency_path))

    rng = np.random.default_rng(0)
    ids = rng.integers(0, args.vocab, size=(1, args.prompt))
    reference = fj.load_pretrained(args.dir, dtype=args.dtype, progress=False)
    ref_logits = fj.logits(reference, ids)
    fj.generate(reference, ids, args.tokens, eos_token_id=[])
    t = time.perf_counter()
    ref_tokens = fj.generate(reference, ids, args.tokens, eos_token_id=[])
    result["all_resident_tokens_per_s"] = args.tokens / (time.perf_counter() - t)
    del reference
    gc.collect()

    rows = []
    for name in args.planners.split(","):
        cache_slots = 2 if name == "lru" else 0
        t = time.perf_counter()
        engine = E.Engine.from_pretrained(args.dir, gpu_budget="70GiB", planner=name, resident_experts=args.resident,
                                          cache_slots=cache_slots, dtype=args.dtype, latency=latency_path,
                                          max_context=512, progress=False)
        load_s = time.perf_counter() - t
        logits = engine.logits(ids)
        per_pos = np.linalg.norm(logits - ref_logits, axis=-1) / np.linalg.norm(ref_logits, axis=-1)
        engine.generate(ids, args.tokens, eos_token_id=[])  # compiles every shape of this run
        before = compiles(engine)
        engine.trace.clear()
        t = time.perf_counter()
        tokens = engine.generate(ids, args.tokens, eos_token_id=[])
        decode_s = time.perf_counter() - t
        after = compiles(engine)
        same = int(np.argmin(np.append(tokens[0, args.prompt:] == ref_tokens[0, args.prompt:], False)))
        summary = engine.trace_summary()
        engine.trace.save(os.path.join(out_dir, f"trace_{name}.json"))
        spans = {lane: [float(np.median([s.busy_s(lane) for s in engine.trace.steps if lane in s.spans] or [0]))
                        * 1e3] for lane in ("plan", "pcie", "cpu", "gpu")}
        row = {"planner": name, "load_s": load_s, "pinned_GB": engine.host.nbytes / 1e9,
               "logits_rel_err_median": float(np.median(per_pos)), "logits_rel_err_max": float(per_pos.max()),
               "greedy_tokens_equal": same, "tokens_per_s": args.tokens / decode_s,
               "compiles_before": before, "compiles_after": after, "compile_count_flat": before == after,
               "summary": summary, "median_span_ms": spans}
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k not in ("compiles_before", "compiles_after")}),
              flush=True)
        del engine
        gc.collect()
    result["planners"] = rows
    with open(os.path.join(out_dir, "engine_check.json"), "w") as f:
        json.dump(result, f, indent=1, default=str)

    print(f"\n{args.layers} layers of Mixtral-8x7B experts, {args.resident}/{8 * args.layers} resident, {args.dtype}, "
          f"prompt {args.prompt}, {args.tokens} new tokens; all-resident {result['all_resident_tokens_per_s']:.1f} tok/s")
    head = (f"{'planner':16s}{'tok/s':>7s}{'rel err med/max':>17s}{'greedy =':>9s}{'flat':>6s}{'hit':>6s}"
            f"{'cpu ms':>8s}{'pcie ms':>8s}{'gpu ms':>8s}{'cpu+pcie':>9s}{'wall s':>8s}")
    print(head)
    for r in rows:
        s = r["summary"]
        print(f"{r['planner']:16s}{r['tokens_per_s']:7.1f}{r['logits_rel_err_median']:9.1e}/"
              f"{r['logits_rel_err_max']:7.1e}{r['greedy_tokens_equal']:5d}/{args.tokens:<3d}"
              f"{str(r['compile_count_flat']):>6s}{s.get('gpu_hit_rate', 0):6.2f}"
              f"{r['median_span_ms']['cpu'][0]:8.2f}{r['median_span_ms']['pcie'][0]:8.2f}"
              f"{r['median_span_ms']['gpu'][0]:8.2f}{s.get('overlap_s', {}).get('cpu+pcie', 0):9.3f}"
              f"{s.get('wall_s', 0):8.2f}")


if __name__ == "__main__":
    main()
