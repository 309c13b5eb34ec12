"""``fiddler-jax bench``: one scenario through the engine (or a peer baseline), warm-up excluded, ``repeats``
timed runs reported as median and spread; ``result.json`` in Hydra's output folder holds the metrics, the
resolved config, the overrides, provenance (git SHA and dirty flag, versions, CPU model and flags, GPU) and the
latency model the planner used. Config: ``fiddler_jax/conf/bench.yaml`` and its groups (schemas in
``schemas.py``); the engine is built by :func:`fiddler_jax.experiments.build.build_engine`.

Scenarios: ``decode`` (time to first token, steady-state and end-to-end tokens/s), ``prefill`` (TTFT of a long
prompt), ``beam`` (tokens/s counting every beam, end-to-end latency), ``batch`` (``batch_size`` independent
prompts of different lengths together: tokens/s over all rows and of one request, TTFT of the batch). Prompts:
:mod:`.workload`. Prompt plus output must fit the model's positions: checked before any weight loads; a
scenario's default prompt that does not fit is shortened to fit, with a note (printed and in result.json's
``notes``), one set explicitly is refused.
"""
from __future__ import annotations

import json
import os
import time

import hydra
import numpy as np
from hydra.core.hydra_config import HydraConfig
from omegaconf import OmegaConf
from tqdm.auto import tqdm

from fiddler_jax.errors import InvalidInputError
from fiddler_jax.experiments import schemas  # noqa: F401  (registers bench_schema)
from fiddler_jax.experiments.build import build_engine, gpu_budget, release_engines
from fiddler_jax.experiments.common import CONF_DIR, clear_errors
from fiddler_jax.experiments.workload import batch_prompts, prompt_ids, prompt_text, summarize
from fiddler_jax.units import parse_bytes

SCENARIOS = ("decode", "prefill", "beam", "batch")
BASELINES = ("hf_accelerate",)


def run_once(engine, ids: np.ndarray, scenario, kv_slots: int | None = None) -> dict:
    """One timed run of the scenario; seconds and rates. ``kv_slots``: the KV length (a warm-up shorter than
    the scenario passes the scenario's, so it compiles the same shapes)."""
    new = scenario.output_tokens
    if scenario.name == "beam":
        tic = time.perf_counter()
        out = engine.generate(ids, new, num_beams=scenario.num_beams, length_penalty=scenario.length_penalty,
                              early_stopping=scenario.early_stopping, eos_token_id=[], kv_slots=kv_slots)
        latency = time.perf_counter() - tic
        made = out.shape[1] - ids.shape[1]
        return {"latency_s": latency, "tokens_per_s": scenario.num_beams * made / latency, "new_tokens": made}
    _, stats = engine.generate_with_stats(ids, new, eos_token_id=[], kv_slots=kv_slots)
    total = stats.prefill_s + stats.first_step_s + stats.decode_s
    if scenario.name == "batch":  # every request runs from the first step to the last
        rows = len(ids)
        metrics = {"tokens_per_s": rows * stats.new_tokens / total,
                   "per_request_tokens_per_s": stats.new_tokens / total, "ttft_s": stats.prefill_s,
                   "latency_s": total, "new_tokens": rows * stats.new_tokens}
        if stats.new_tokens > 2:
            metrics["decode_tokens_per_s"] = rows * stats.decode_tokens_per_s
        return metrics
    metrics = {"ttft_s": stats.prefill_s, "latency_s": total, "new_tokens": stats.new_tokens}
    if scenario.name == "decode":
        metrics["tokens_per_s"] = stats.new_tokens / total
        if stats.new_tokens > 2:
            metrics["decode_tokens_per_s"] = stats.decode_tokens_per_s
    return metrics


def routing_counts(engine) -> list[list[int]] | None:
    """Tokens routed to each (layer, expert) over the trace (planned layers only)."""
    if not engine.trace.steps:
        return None
    counts = np.zeros((engine.config.num_hidden_layers, engine.config.num_experts), np.int64)
    for step in engine.trace.steps:
        counts[step.layer] += step.counts
    return counts.tolist()


RATE_KEYS = ("host_read", "pinned_h2d")  # engine_lane_bandwidths' keys that are bytes/s (the rest: expert counts)


def decode_limit(engine, bandwidth: dict | None = None) -> dict | None:
    """The two-lane decode limit for the routing seen in the trace's decode steps.

    A decode token needs, per layer, its top-k experts; those not resident (placement, not a planner's cache) must
    be read by the CPU lane or copied over PCIe. With both lanes reading offloaded weights all the time and every
    other cost free, one token takes ``offloaded bytes / (host read + pinned H2D bandwidth)``: the rate no planner
    can beat on this placement. The same with the two rates measured while both lanes run (they share the host's
    DRAM) is ``two_lanes_together_decode_tokens_per_s``. ``bandwidth``: the lanes' ceilings measured in this process
    (:func:`ceilings.engine_lane_bandwidths`, bytes/s); the latency model's version (``cpu(1)`` and
    ``copy_beside_cpu_s``, the copy while the CPU lane runs, calibrated on another day) is kept beside it. The CPU
    lane's achieved read rate (expert bytes it ran over its busy seconds, decode steps only) says how close the
    kernel came to its ceiling. None when the trace holds no single-token step."""
    from fiddler_jax.experiments.ceilings import decode_limits
    from fiddler_jax.runtime.placement import expert_bytes
    from fiddler_jax.runtime.planning import Lane

    k = engine.config.num_experts_per_tok
    steps = [s for s in engine.trace.steps if int(s.counts.sum()) == k]
    if not steps:
        return None
    resident = engine.placement.resident
    offloaded = sum(int(((s.counts > 0) & ~resident[s.layer]).sum()) for s in steps)
    tokens = len(steps) / engine.config.num_hidden_layers
    per_token = offloaded / tokens
    expert = engine.host.expert_nbytes or expert_bytes(engine.config, np.dtype(engine.model.dtype).itemsize)
    cpu_experts = sum(int(((s.counts > 0) & (s.lanes == Lane.CPU)).sum()) for s in steps if "cpu" in s.spans)
    cpu_busy = sum(s.busy_s("cpu") for s in steps if "cpu" in s.spans)
    lanes_per_s = 1.0 / engine.latency.cpu(1) + 1.0 / engine.latency.copy_beside_cpu_s
    out = {"offloaded_experts_per_token": per_token, "expert_bytes": expert,
           "cpu_lane_read_GBps": cpu_experts * expert / cpu_busy / 1e9 if cpu_busy else None,
           "latency_model_two_lane_decode_tokens_per_s": lanes_per_s / per_token if per_token else None}
    if bandwidth:
        measured = decode_limits(bandwidth, per_token, expert)
        out["cpu_lane_only_decode_tokens_per_s"] = measured["cpu_lane_only_decode_tokens_per_s"]
        out["ceilings_GBps"] = {k: v / 1e9 for k, v in bandwidth.items() if k.startswith(RATE_KEYS)}
        out["ceilings_experts"] = {k: v for k, v in bandwidth.items() if not k.startswith(RATE_KEYS)}
    if bandwidth and "pinned_h2d" in bandwidth:
        for key in ("two_lane_decode_tokens_per_s", "two_lanes_together_decode_tokens_per_s"):
            out[key] = measured[key]
        out["source"] = ("host read and pinned H2D measured in this process on the engine's offloaded experts, and "
                         "the routing of the last timed run")
    else:  # no copies measured (an engine without staging slots): the latency model's limit
        out.update({"two_lane_decode_tokens_per_s": out["latency_model_two_lane_decode_tokens_per_s"],
                    "source": "latency model (cpu(1) and copy_beside_cpu_s) and the routing of the last timed run"})
    return out


def model_positions(cfg) -> int:
    """``max_position_embeddings`` of the configured model (its config.json or random geometry), read without
    loading any weight."""
    from fiddler_jax.experiments.model_group import model_config

    return model_config(cfg.model).max_position_embeddings


def fit_scenario(cfg, explicit: list[str] | tuple = ()) -> str | None:
    """Make the scenario fit the model's positions, before any weight is loaded. A prompt plus output longer than
    ``max_position_embeddings`` is refused when ``scenario.input_tokens`` was set (an override among
    ``explicit``); a scenario's default prompt is shortened to fit (``scenario=prefill``'s 2048 tokens plus one
    on the bundled tiny model's 2048 positions), in ``cfg``, and the note saying so is returned (None when
    nothing changed)."""
    s, name = cfg.scenario, cfg.model.name
    limit, need = model_positions(cfg), s.input_tokens + s.input_spread + s.output_tokens
    if need <= limit:
        return None
    set_input = any(o.lstrip("+~").split("=", 1)[0] == "scenario.input_tokens" for o in explicit)
    spread = f" + scenario.input_spread={s.input_spread}" if s.input_spread else ""
    if s.output_tokens + s.input_spread >= limit:
        raise InvalidInputError(f"scenario.output_tokens={s.output_tokens}{spread} leaves no room for a prompt in "
                                f"model={name}'s max_position_embeddings ({limit}): lower it below {limit}")
    if set_input:
        raise InvalidInputError(f"scenario.input_tokens={s.input_tokens}{spread} + scenario.output_tokens="
                                f"{s.output_tokens} = {need} positions, more than model={name}'s "
                                f"max_position_embeddings ({limit}): lower scenario.input_tokens to at most "
                                f"{limit - s.output_tokens - s.input_spread}, or use a model with a longer context")
    fitted = limit - s.output_tokens - s.input_spread
    note = (f"scenario {s.name}: input_tokens {s.input_tokens} (the scenario's default){spread} + output_tokens "
            f"{s.output_tokens} exceed model={name}'s {limit} positions: running {fitted} input tokens (set "
            "scenario.input_tokens to choose)")
    s.input_tokens = fitted
    return note


def run_bench(cfg, out_dir: str, job_overrides: list[str] | None = None) -> dict:
    """Run the configured scenario; returns the result dict (also written to ``out_dir/result.json``).
    ``job_overrides``: the overrides to record (default: Hydra's, when run as a Hydra job)."""
    from fiddler_jax.provenance import provenance

    s = cfg.scenario
    if s.name not in SCENARIOS:
        raise InvalidInputError(f"unknown scenario {s.name!r}; valid: {', '.join(SCENARIOS)}")
    if min(s.input_tokens, s.output_tokens, s.num_beams, s.batch_size, cfg.repeats) < 1 or cfg.warmup < 0 \
            or s.input_spread < 0:
        raise InvalidInputError("scenario.input_tokens, output_tokens, num_beams, batch_size and repeats must be "
                                "≥ 1, warmup and scenario.input_spread ≥ 0")
    recorded = overrides() if job_overrides is None else list(job_overrides)
    note = fit_scenario(cfg, recorded)
    if note:
        print(f"note: {note}", flush=True)
    if cfg.baseline is not None:
        if cfg.baseline not in BASELINES:
            raise InvalidInputError(f"unknown baseline {cfg.baseline!r}; valid: null, {', '.join(BASELINES)}")
        from fiddler_jax.experiments.baselines import run_hf_accelerate

        release_engines()
        metrics, extra = run_hf_accelerate(cfg)
    else:
        from fiddler_jax.experiments.ceilings import engine_lane_bandwidths
        from fiddler_jax.runtime.generate import cache_length

        engine, tokenizer = build_engine(cfg)
        if engine.streamed.eligible:  # trace=true: the streamed steps' GPU spans, from events on the stream
            from fiddler_jax.kernels import streamed_lane

            streamed_lane.set_timing(bool(cfg.trace))
        if s.name == "batch":
            ids = batch_prompts(tokenizer, prompt_text(cfg.prompts_file), s.input_tokens, s.input_spread,
                                s.batch_size, engine.config.vocab_size, cfg.seed)
        else:
            ids = prompt_ids(tokenizer, prompt_text(cfg.prompts_file), s.input_tokens, engine.config.vocab_size,
                             cfg.seed)
        warm = s if cfg.warmup_tokens is None else OmegaConf.merge(
            s, {"output_tokens": max(1, min(cfg.warmup_tokens, s.output_tokens))})
        kv = cache_length(s.input_tokens + s.input_spread, s.output_tokens, engine.config)
        for _ in tqdm(range(cfg.warmup), desc="warm-up", leave=False):
            run_once(engine, ids, warm, kv)
        runs = []
        for _ in tqdm(range(cfg.repeats), desc=f"{s.name} x{cfg.repeats}", leave=False):
            engine.trace.clear()
            runs.append(run_once(engine, ids, s, kv))
        metrics = summarize(runs)
        if cfg.trace and engine.trace.steps:
            engine.trace.save(os.path.join(out_dir, "trace.json"))
        extra = {"engine": {"memory_plan": str(engine.placement.memory),
                            "resident_experts": engine.placement.resident_count,
                            "pinned_host_bytes": engine.host.nbytes, "trace_summary": engine.trace_summary(),
                            "routing_counts": routing_counts(engine)},
                 "limits": decode_limit(engine, engine_lane_bandwidths(engine)) if s.name == "decode" else None,
                 "latency_model": engine.latency.to_dict()}
    if cfg.baseline is None:
        from fiddler_jax.runtime.gpu_memory import usage

        gpu_memory = usage()
    else:
        gpu_memory = extra.pop("gpu_memory", {})
    budget = gpu_budget(cfg.hardware)
    gpu_memory["budget_bytes"] = parse_bytes(budget)
    peak = gpu_memory.get("peak_bytes_in_use")
    gpu_memory["within_budget"] = None if peak is None else peak <= gpu_memory["budget_bytes"]
    result = {"metrics": metrics, "peak_gpu_bytes": peak, "gpu_memory": gpu_memory,
              "config": OmegaConf.to_container(cfg, resolve=True), "overrides": recorded, **extra,
              **provenance()}
    if note:
        result["notes"] = [note]
    with open(os.path.join(out_dir, "result.json"), "w") as f:
        json.dump(result, f, indent=1, default=str)
    if cfg.hardware.gpu_budget is not None and cfg.baseline is None:  # a baseline's overrun is recorded only
        from fiddler_jax.runtime.gpu_memory import check_within

        check_within(budget, peak)  # a run above its budget is a failed run (result.json says by how much)
    return result


def overrides() -> list[str]:
    try:
        return list(HydraConfig.get().overrides.task)
    except ValueError:  # not under Hydra (a direct call)
        return []


def table(result: dict) -> str:
    cfg = result["config"]
    who = (f"baseline {cfg['baseline']}" if cfg["baseline"] else
           f"planner {cfg['planner']['name']}, placement {cfg['placement']['policy']}, kernel {cfg['kernel']['path']}")
    head = (f"{cfg['scenario']['name']} {cfg['model']['name']} ({cfg['model']['dtype']}), {who}, budget "
            f"{cfg['hardware']['gpu_budget'] or 'auto'}")
    lines = [head, f"{'metric':22s}{'median':>12s}{'min':>12s}{'max':>12s}"]
    for key, m in result["metrics"].items():
        lines.append(f"{key:22s}{m['median']:12.4g}{m['min']:12.4g}{m['max']:12.4g}")
    return "\n".join(lines)


@hydra.main(config_path=CONF_DIR, config_name="bench", version_base="1.3")
@clear_errors
def main(cfg) -> None:
    out_dir = HydraConfig.get().runtime.output_dir
    if cfg.hardware.gpu_budget is not None and cfg.baseline is None:
        from fiddler_jax.runtime.gpu_memory import cap_xla_allocator

        cap_xla_allocator(cfg.hardware.gpu_budget)  # XLA may allocate no more than the budget
    elif cfg.baseline is not None:
        os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # leave the GPU to torch
    try:
        result = run_bench(cfg, out_dir)
    except Exception as exc:  # the run's folder says why it has no result (a sweep's report names it)
        record_failure(out_dir, exc)
        raise
    print(f"wrote {os.path.join(out_dir, 'result.json')}")
    print(table(result))


def record_failure(folder: str, exc: BaseException) -> str:
    """Write ``folder/error.txt``: the error's one line for a user error (FiddlerError), else the traceback --
    what a sweep's report shows for a run without a result, on whatever machine or launcher ran it. Returns the
    one line."""
    import traceback

    from fiddler_jax.errors import FiddlerError

    line = f"{type(exc).__name__}: {exc}".splitlines()[0]
    try:
        with open(os.path.join(folder, "error.txt"), "w") as f:
            f.write(traceback.format_exc() if not isinstance(exc, FiddlerError) else f"{line}\n")
    except OSError:
        pass  # the folder itself is the problem; the error is raised anyway
    return line


if __name__ == "__main__":
    main()
