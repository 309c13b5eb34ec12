"""Decode tokens/s of this tree's engine against another commit's engine, interleaved in one process, over the
same weights, placement and pinned host experts.

    python benchmarks/engine_ab.py --before DIR [--budget 24GiB] [--planners fiddler_overlap,fiddler]
                                   [--layers 8 --resident 0] [--reps 3] [--new-tokens 64] [--json OUT.json]

``DIR`` holds the other commit's package (``git archive REV fiddler_jax | tar -x -C DIR``). It is imported as
``fiddler_jax_before`` (its imports rewritten in a temporary copy), except its kernels and models, which are this
tree's: one compiled library, one thread pool and one model, so the comparison is of the runtime around them. The model is
Mixtral-8x7B's geometry with seeded random weights (``fiddler_jax/conf/model/mixtral_8x7b_random.yaml``), built
once by this tree; the other engine is constructed over this tree's model, placement and host experts. Each
repetition runs both engines, in alternating order; the table gives the median steady-state decode tokens/s of
each and after / before.
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import os
import re
import shutil
import statistics
import sys
import tempfile
import time

import numpy as np


def import_before(tree: str):
    """The other commit's package under the name fiddler_jax_before (kernels and models: this tree's)."""
    src = os.path.join(tree, "fiddler_jax")
    if not os.path.isdir(src):
        raise SystemExit(f"error: {src} is not a folder; extract the other commit's fiddler_jax there")
    root = tempfile.mkdtemp(prefix="fj_before_")
    dst = os.path.join(root, "fiddler_jax_before")
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("assets", "*.so", "__pycache__"))
    for folder, _, files in os.walk(dst):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(folder, name)
                with open(path) as f:
                    text = f.read()
                text = re.sub(r"\bfiddler_jax\b", "fiddler_jax_before", text)
                for shared in ("kernels", "models"):
                    text = text.replace(f"fiddler_jax_before.{shared}", f"fiddler_jax.{shared}")
                with open(path, "w") as f:
                    f.write(text)
    sys.path.insert(0, root)
    return (importlib.import_module("fiddler_jax_before.runtime.engine"),
            importlib.import_module("fiddler_jax_before.runtime.planners"))


def decode_rate(engine, ids, new_tokens: int, kv_slots: int) -> float:
    _, stats = engine.generate_with_stats(ids, new_tokens, eos_token_id=[], kv_slots=kv_slots)
    return stats.decode_tokens_per_s


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--before", required=True)
    ap.add_argument("--budget", default="24GiB")
    ap.add_argument("--latency", default=os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                                      "fiddler_jax", "runtime", "latency_h100.json"),
                    help="latency model file both engines plan with (default: the H100 machine's, as the tables)")
    ap.add_argument("--planners", default="fiddler_overlap,fiddler")
    ap.add_argument("--layers", type=int, default=None, help="num_hidden_layers (default: the geometry's 32)")
    ap.add_argument("--resident", type=int, default=None, help="resident experts (default: fill the budget)")
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--json", default=None)
    ap.add_argument("--smoke", action="store_true", help="a small geometry, for a check on a CPU-only machine")
    args = ap.parse_args(argv)

    from fiddler_jax.experiments.model_group import random_model_config
    from fiddler_jax.provenance import provenance
    from fiddler_jax.runtime.engine import Engine
    from fiddler_jax.runtime.generate import cache_length
    from fiddler_jax.runtime.gpu_memory import cap_xla_allocator

    cap_xla_allocator(args.budget)
    old_engine_module, old_planners = import_before(args.before)
    config = random_model_config()
    if args.smoke:
        config = dataclasses.replace(config, hidden_size=128, intermediate_size=256, num_attention_heads=4,
                                     num_key_value_heads=2, vocab_size=512, num_hidden_layers=2)
    if args.layers is not None:
        config = dataclasses.replace(config, num_hidden_layers=args.layers)
    planners = args.planners.split(",")
    tic = time.perf_counter()
    built = Engine.from_random(config, gpu_budget=args.budget, planner=planners[0], resident_experts=args.resident,
                               latency=args.latency,
                               max_context=cache_length(args.prompt_tokens, args.new_tokens, config))
    build_s = time.perf_counter() - tic
    print(f"built in {build_s:.0f} s: {built.placement.memory}", flush=True)
    ids = np.random.default_rng(0).integers(0, config.vocab_size, size=(1, args.prompt_tokens))
    kv = cache_length(args.prompt_tokens, args.new_tokens, config)
    rows = []
    for name in planners:
        after = built.with_planner(name)
        bound = old_engine_module._bind_planner(name, {}, built.staging_slots, 0)
        before = old_engine_module.Engine(built.model, built.host, built.placement, bound, built.latency,
                                          built.staging_slots, 0, "kernel")
        engines = {"before": before, "after": after}
        tokens = {k: e.generate(ids, 8, eos_token_id=[], kv_slots=kv) for k, e in engines.items()}  # compiles too
        same_tokens = bool(np.array_equal(tokens["before"], tokens["after"]))
        print(f"{name}: both engines give the same greedy tokens: {same_tokens}", flush=True)
        rates = {"before": [], "after": []}
        for rep in range(args.reps):
            order = ("before", "after") if rep % 2 == 0 else ("after", "before")
            for which in order:
                rates[which].append(decode_rate(engines[which], ids, args.new_tokens, kv))
                print(f"{name} rep {rep} {which}: {rates[which][-1]:.2f} tok/s", flush=True)
        med = {k: statistics.median(v) for k, v in rates.items()}
        rows.append({"planner": name, "same_greedy_tokens": same_tokens, "before_tok_s": rates["before"], "after_tok_s": rates["after"],
                     "before_median": med["before"], "after_median": med["after"],
                     "after_over_before": med["after"] / med["before"]})
        del before, after, engines
    result = {"args": vars(args), "build_s": build_s, "memory_plan": str(built.placement.memory),
              "resident_experts": built.placement.resident_count, "rows": rows, **provenance()}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1, default=str)
    layers = config.num_hidden_layers
    print(f"\ndecode tok/s, {layers} layers, budget {args.budget}, {built.placement.resident_count} resident experts, "
          f"{args.new_tokens} new tokens, median of {args.reps} interleaved runs")
    print(f"{'planner':18s}{'before':>10s}{'after':>10s}{'after/before':>14s}{'same tokens':>13s}")
    for r in rows:
        print(f"{r['planner']:18s}{r['before_median']:10.2f}{r['after_median']:10.2f}{r['after_over_before']:14.3f}"
              f"{str(r['same_greedy_tokens']):>13s}")
    return result


if __name__ == "__main__":
    main()
