"""``fiddler-jax bench``: one scenario through the engine (or a peer baseline), warm-up excluded, ``repeats``
timed runs reported as median and spread; ``result.json`` in Hydra's output folder holds the metrics, the
resolved config, the overrides, provenance (git SHA and dirty flag, versions, CPU model and flags, GPU) and the
latency model the planner used. Config: ``conf/bench.yaml`` and its groups (schemas in ``schemas.py``).

Scenarios: ``decode`` (time to first token, steady-state and end-to-end tokens/s), ``prefill`` (TTFT of a long
prompt), ``beam`` (tokens/s counting every beam, end-to-end latency). Prompts are cut from a text file
(``prompts_file``; default: the held-out files of the tiny model's corpus, i.e. this Python's standard
library), repeated if short; a model without a tokenizer gets seeded random token ids.
"""
from __future__ import annotations

import json
import os
import statistics
import time

import hydra
import numpy as np
from hydra.core.hydra_config import HydraConfig
from omegaconf import OmegaConf
from tqdm.auto import tqdm

from fiddler_jax.errors import InvalidInputError
from fiddler_jax.units import parse_bytes
from fiddler_jax.experiments import schemas  # noqa: F401  (registers bench_schema)
from fiddler_jax.experiments.common import CONF_DIR, clear_errors, planner_kwargs, resolve_model_path

SCENARIOS = ("decode", "prefill", "beam")
BASELINES = ("hf_accelerate",)


def prompt_text(prompts_file: str | None) -> str:
    """The text prompts are cut from: ``prompts_file``, or the tiny model's held-out corpus files."""
    if prompts_file is not None:
        path = os.path.expanduser(prompts_file)
        if not os.path.isfile(path):
            raise InvalidInputError(f"prompts_file {path} does not exist")
        with open(path, encoding="utf-8", errors="replace") as f:
            text = f.read()
        if not text.strip():
            raise InvalidInputError(f"prompts_file {path} is empty; give a text file with prompts")
        return text
    from fiddler_jax.training.corpus import find_corpus

    corpus = find_corpus()
    return "\n".join(corpus.read(rel) for rel in corpus.heldout[:8])


def prompt_ids(tokenizer, text: str, length: int, vocab_size: int, seed: int) -> np.ndarray:
    """[1, length] token ids: the start of ``text`` (repeated when short), or seeded random ids."""
    if tokenizer is None:
        return np.random.default_rng(seed).integers(0, vocab_size, size=(1, length))
    ids = np.asarray(tokenizer(text[: 16 * length + 1024])["input_ids"])
    if ids.size == 0:
        raise InvalidInputError("the prompt text tokenizes to nothing")
    return np.resize(ids, length)[None]


def gpu_budget(hardware) -> str | int:
    """``hardware.gpu_budget``, or for ``auto`` 95% of what XLA may allocate on the GPU (no limit on a CPU)."""
    if hardware.gpu_budget is not None:
        return hardware.gpu_budget
    import jax

    stats = jax.devices()[0].memory_stats() or {}
    limit = stats.get("bytes_limit")
    return int(limit * 0.95) if limit else "1024TiB"


def random_model_config(geometry=None, name: str = "mixtral_8x7b_random"):
    """The ``MixtralConfig`` of a random model's geometry (default: ``conf/model/mixtral_8x7b_random.yaml``)."""
    from fiddler_jax.models.config import MixtralConfig

    if geometry is None:
        geometry = OmegaConf.load(os.path.join(CONF_DIR, "model", "mixtral_8x7b_random.yaml")).geometry
    return MixtralConfig.from_hf_dict({"model_type": "mixtral", **OmegaConf.to_container(geometry)},
                                      source=f"model={name}")


# The engine last built in this process, by the part of the config that fixes its weights, placement and GPU
# buffers: a sweep over planners or kernels reuses it (``Engine.with_planner``) instead of building Mixtral again.
_LAST_ENGINE: dict = {}


def _engine_key(cfg, context: int, pk: dict) -> str:
    parts = {"model": cfg.model, "placement": cfg.placement, "budget": gpu_budget(cfg.hardware),
             "rows": kv_rows(cfg), "context": context, "latency": cfg.latency,
             "slots": (pk["staging_slots"], pk["cache_slots"])}
    return json.dumps(OmegaConf.to_container(OmegaConf.create(parts), resolve=True), sort_keys=True, default=str)


def kv_rows(cfg) -> int:
    """The KV reserve in sequences: ``max_batch``, or the scenario's beam width."""
    rows = cfg.max_batch or cfg.scenario.num_beams
    if rows < cfg.scenario.num_beams:
        raise InvalidInputError(f"max_batch={rows} is below scenario.num_beams={cfg.scenario.num_beams}; the "
                                "KV reserve must hold every beam")
    return rows


def build_engine(cfg):
    """The engine the config describes (our planners, placement, kernel, budget), and the tokenizer or None."""
    from fiddler_jax.runtime.engine import Engine
    from fiddler_jax.runtime.generate import CACHE_BUCKET

    m, pl = cfg.model, cfg.placement
    need = cfg.scenario.input_tokens + cfg.scenario.output_tokens
    context = cfg.max_context or -(-need // CACHE_BUCKET) * CACHE_BUCKET  # the cache length generate will use
    cpu_backend = "xla" if cfg.kernel.path == "xla" else "kernel"
    pk = planner_kwargs(cfg.planner)
    key = _engine_key(cfg, context, pk)
    if key in _LAST_ENGINE:
        engine, tokenizer = _LAST_ENGINE[key]
        return engine.with_planner(cpu_backend=cpu_backend, **pk), tokenizer
    release_engines()
    kwargs = dict(gpu_budget=gpu_budget(cfg.hardware), placement=pl.policy, resident_experts=pl.resident_experts,
                  dtype=m.dtype, profile=pl.profile, latency=cfg.latency, max_batch=kv_rows(cfg),
                  max_context=context, seed=pl.seed, cpu_backend=cpu_backend, **pk)
    if m.random:
        if not m.geometry:
            raise InvalidInputError("model.random needs model.geometry (config.json keys of the random model)")
        config = random_model_config(m.geometry, m.name)
        built = Engine.from_random(config, weight_seed=m.weight_seed, router_bias=m.router_bias, **kwargs), None
    else:
        if m.path is None and m.name != "tiny":
            raise InvalidInputError(f"model={m.name} needs its checkpoint folder: add model.path=<HF Mixtral folder> "
                                    "(or use model=mixtral_8x7b_random on a machine without it)")
        path = resolve_model_path(m.path)
        import fiddler_jax as fj

        built = Engine.from_pretrained(path, **kwargs), fj.load_tokenizer(path)
    _LAST_ENGINE[key] = built
    return built


def release_engines() -> None:
    """Drop the engine kept for reuse (its GPU buffers and pinned experts are freed)."""
    import gc

    _LAST_ENGINE.clear()
    gc.collect()


def set_kernel(path: str, spin_us: int = 50) -> None:
    from fiddler_jax import kernels

    kernels.set_kernel_path("auto" if path == "xla" else path)  # an unsupported path is a clear KernelError
    if spin_us < 0:
        raise InvalidInputError(f"kernel.spin_us must be >= 0, got {spin_us}")
    kernels.set_pool(spin_us=spin_us)


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
    metrics = {"ttft_s": stats.prefill_s, "latency_s": total, "new_tokens": stats.new_tokens}
    if scenario.name == "decode":
        metrics["tokens_per_s"] = stats.new_tokens / total
        if stats.new_tokens > 2:
            metrics["decode_tokens_per_s"] = stats.decode_tokens_per_s
    return metrics


def summarize(runs: list[dict]) -> dict:
    """Median and spread (min, max) of every metric over the timed runs."""
    out = {}
    for key in runs[0]:
        values = [r[key] for r in runs]
        out[key] = {"median": statistics.median(values), "min": min(values), "max": max(values), "runs": values}
    return out


def routing_counts(engine) -> list[list[int]] | None:
    """Tokens routed to each (layer, expert) over the trace (planned layers only)."""
    if not engine.trace.steps:
        return None
    counts = np.zeros((engine.config.num_hidden_layers, engine.config.num_local_experts), np.int64)
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
    ``transfer_s``, calibrated on another day) is kept beside it. The CPU lane's achieved read rate (expert bytes
    it ran over its busy seconds, decode steps only) says how close the kernel came to its ceiling. None when the
    trace holds no single-token step."""
    from fiddler_jax.experiments.ceilings import decode_limits
    from fiddler_jax.runtime.placement import expert_bytes
    from fiddler_jax.runtime.planners import Lane

    k = engine.config.num_experts_per_tok
    steps = [s for s in engine.trace.steps if int(s.counts.sum()) == k]
    if not steps:
        return None
    resident = engine.placement.resident
    offloaded = sum(int(((s.counts > 0) & ~resident[s.layer]).sum()) for s in steps)
    tokens = len(steps) / engine.config.num_hidden_layers
    per_token = offloaded / tokens
    expert = expert_bytes(engine.config, np.dtype(engine.model.dtype).itemsize)
    cpu_experts = sum(int(((s.counts > 0) & (s.lanes == Lane.CPU)).sum()) for s in steps if "cpu" in s.spans)
    cpu_busy = sum(s.busy_s("cpu") for s in steps if "cpu" in s.spans)
    lanes_per_s = 1.0 / engine.latency.cpu(1) + 1.0 / engine.latency.transfer_s
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
                    "source": "latency model (cpu(1) and transfer_s) and the routing of the last timed run"})
    return out


def run_bench(cfg, out_dir: str, job_overrides: list[str] | None = None) -> dict:
    """Run the configured scenario; returns the result dict (also written to ``out_dir/result.json``).
    ``job_overrides``: the overrides to record (default: Hydra's, when run as a Hydra job)."""
    from fiddler_jax.provenance import provenance

    s = cfg.scenario
    if s.name not in SCENARIOS:
        raise InvalidInputError(f"unknown scenario {s.name!r}; valid: {', '.join(SCENARIOS)}")
    if min(s.input_tokens, s.output_tokens, s.num_beams, cfg.repeats) < 1 or cfg.warmup < 0:
        raise InvalidInputError("scenario.input_tokens, output_tokens, num_beams and repeats must be ≥ 1, "
                                "warmup ≥ 0")
    if cfg.baseline is not None:
        if cfg.baseline not in BASELINES:
            raise InvalidInputError(f"unknown baseline {cfg.baseline!r}; valid: null, {', '.join(BASELINES)}")
        from fiddler_jax.experiments.baselines import run_hf_accelerate

        release_engines()
        metrics, extra = run_hf_accelerate(cfg)
    else:
        from fiddler_jax.experiments.ceilings import engine_lane_bandwidths
        from fiddler_jax.runtime.generate import cache_length

        set_kernel(cfg.kernel.path, cfg.kernel.spin_us)
        engine, tokenizer = build_engine(cfg)
        engine.set_pinned_activations(cfg.kernel.pinned_activations)
        engine.streamed_cpu_lane = cfg.kernel.streamed_lane
        ids = prompt_ids(tokenizer, prompt_text(cfg.prompts_file), s.input_tokens, engine.config.vocab_size,
                         cfg.seed)
        warm = s if cfg.warmup_tokens is None else OmegaConf.merge(
            s, {"output_tokens": max(1, min(cfg.warmup_tokens, s.output_tokens))})
        kv = cache_length(s.input_tokens, s.output_tokens, engine.config)
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
    recorded = overrides() if job_overrides is None else list(job_overrides)
    result = {"metrics": metrics, "peak_gpu_bytes": peak, "gpu_memory": gpu_memory,
              "config": OmegaConf.to_container(cfg, resolve=True), "overrides": recorded, **extra,
              **provenance()}
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
    result = run_bench(cfg, out_dir)
    print(f"wrote {os.path.join(out_dir, 'result.json')}")
    print(table(result))


if __name__ == "__main__":
    main()
