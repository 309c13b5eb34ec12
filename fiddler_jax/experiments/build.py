"""The engine a command's config describes, built in one place for ``generate``, ``bench`` and ``bench-jobs``.

The ``model``, ``placement``, ``planner`` and ``kernel`` groups (:mod:`.schemas`) say which weights, which experts
on the GPU, which planner and how the lanes run (:class:`~fiddler_jax.runtime.options.EngineOptions`); the engine's
size (GPU budget, latency model, KV reserve) comes from ``generate``'s ``engine:`` block or from the benchmark's
``hardware`` group, ``latency``, ``max_batch``/``max_context`` and scenario (:func:`engine_size`).

The engine last built in this process is kept by the part of the config that fixes its weights, placement and GPU
buffers: a sweep over planners or kernels reuses it (``Engine.with_planner``) instead of building Mixtral again.
"""
from __future__ import annotations

import dataclasses
import json
import math

from omegaconf import OmegaConf

from fiddler_jax.errors import InvalidInputError
from fiddler_jax.experiments.model_group import checkpoint_path, model_config
from fiddler_jax.experiments.schemas import planner_kwargs, planner_sync_s

_LAST_ENGINE: dict = {}
_MEASURED_SYNC: dict = {}  # (engine key, kernel group) -> planner.sync_s=measure's seconds


def gpu_budget(hardware) -> str | int:
    """``hardware.gpu_budget``, or for ``auto`` 95% of what XLA may allocate on the GPU (no limit on a CPU)."""
    if hardware.gpu_budget is not None:
        return hardware.gpu_budget
    import jax

    stats = jax.devices()[0].memory_stats() or {}
    limit = stats.get("bytes_limit")
    return int(limit * 0.95) if limit else "1024TiB"


def set_kernel(path: str, spin_us: int = 50, streamed_spin_us: int | None = None,
               threads: int | None = None) -> None:
    """Apply the ``kernel`` group's process-wide settings: the CPU kernel's path (``xla`` keeps the kernel on
    ``auto``: that lane runs XLA's dot instead), the kernel pool's spin, its spin after a streamed-lane call
    (None: the same as ``spin_us``) and its thread count (None: the default, FIDDLER_KERNEL_THREADS or one per
    physical core)."""
    from fiddler_jax import kernels

    kernels.set_kernel_path("auto" if path == "xla" else path)  # an unsupported path is a clear KernelError
    if threads is None:
        kernels.reset_num_threads()  # a job before this one may have set kernel.threads
    elif threads < 1:
        raise InvalidInputError(f"kernel.threads must be >= 1 (or null for the default), got {threads}")
    else:
        kernels.set_num_threads(threads, pin=None)
    for name, value in (("spin_us", spin_us), ("streamed_spin_us", streamed_spin_us)):
        if value is not None and value < 0:
            raise InvalidInputError(f"kernel.{name} must be >= 0, got {value}")
    kernels.set_pool(spin_us=spin_us, streamed_spin_us=-1 if streamed_spin_us is None else streamed_spin_us)


def engine_options(kernel):
    """The ``kernel`` group as the engine's :class:`EngineOptions`."""
    from fiddler_jax.runtime.options import EngineOptions

    return EngineOptions(cpu_backend="xla" if kernel.path == "xla" else "kernel",
                         pinned_activations=bool(kernel.pinned_activations),
                         streamed_cpu_lane=bool(kernel.streamed_lane),
                         streamed_overlap=bool(kernel.streamed_overlap),
                         token_program=bool(kernel.get("token_program", True)))


def kv_rows(cfg) -> int:
    """The benchmark's KV reserve in sequences: ``max_batch``, or the scenario's beam width or batch size."""
    s = cfg.scenario
    batch = s.get("batch_size", 1) if s.name == "batch" else 1
    rows = cfg.max_batch or max(s.num_beams, batch)
    if rows < s.num_beams:
        raise InvalidInputError(f"max_batch={rows} is below scenario.num_beams={s.num_beams}; the "
                                "KV reserve must hold every beam")
    if rows < batch:
        raise InvalidInputError(f"max_batch={rows} is below scenario.batch_size={batch}; the KV reserve must hold "
                                "every prompt of the batch")
    return rows


def engine_size(cfg) -> dict:
    """``gpu_budget``, ``latency``, ``max_batch`` and ``max_context`` of the engine: from ``generate``'s
    ``engine:`` block (no budget: room for every expert; KV rows for every beam), or from the benchmark's config
    (``hardware``, ``latency``, :func:`kv_rows`, and ``max_context`` or the cache length ``generate`` will use
    for the scenario's prompt and output)."""
    if "engine" in cfg:
        e = cfg.engine
        rows = max(e.max_batch, cfg.num_beams, cfg.batch_size if cfg.get("prompts_file") else 1)
        return dict(gpu_budget=e.gpu_budget or "1TiB", latency=e.latency, max_batch=rows,
                    max_context=e.get("max_context"), max_step_tokens=e.get("max_step_tokens"))
    from fiddler_jax.runtime.generate import CACHE_BUCKET

    need = cfg.scenario.input_tokens + cfg.scenario.get("input_spread", 0) + cfg.scenario.output_tokens
    context = cfg.max_context or -(-need // CACHE_BUCKET) * CACHE_BUCKET  # the cache length generate will use
    return dict(gpu_budget=gpu_budget(cfg.hardware), latency=cfg.latency, max_batch=kv_rows(cfg),
                max_context=context, max_step_tokens=cfg.get("max_step_tokens"))


def _engine_key(cfg, size: dict, planner: dict) -> str:
    parts = {"model": OmegaConf.to_container(cfg.model, resolve=True),
             "placement": OmegaConf.to_container(cfg.placement, resolve=True), "budget": size["gpu_budget"],
             "rows": size["max_batch"], "context": size["max_context"], "latency": size["latency"],
             "step_tokens": size["max_step_tokens"],
             "slots": (planner["staging_slots"], planner["cache_slots"])}
    return json.dumps(parts, sort_keys=True, default=str)


def build_engine(cfg):
    """The engine the config describes (module docstring) and the model's tokenizer (None for random weights or a
    folder without tokenizer files). Reuses the engine last built in this process when its weights, placement and
    GPU buffers agree. ``planner.sync_s`` set: the engine plans with the latency model's ``sync_s`` replaced
    (:func:`_with_sync`)."""
    from fiddler_jax.runtime.engine import Engine

    set_kernel(cfg.kernel.path, cfg.kernel.spin_us, cfg.kernel.get("streamed_spin_us"), cfg.kernel.get("threads"))
    options = engine_options(cfg.kernel)
    size = engine_size(cfg)
    pk = planner_kwargs(cfg.planner)
    key = _engine_key(cfg, size, pk)
    sync_s = planner_sync_s(cfg.planner)
    if key in _LAST_ENGINE:
        engine, tokenizer = _LAST_ENGINE[key]
    else:
        release_engines()
        m = cfg.model
        config = model_config(m)
        kwargs = engine_kwargs(cfg, config, size, pk, options=options)
        if m.random:
            engine, tokenizer = Engine.from_random(config, weight_seed=m.weight_seed, router_bias=m.router_bias,
                                                   **kwargs), None
        else:
            import fiddler_jax as fj

            path = checkpoint_path(m)
            engine, tokenizer = Engine.from_pretrained(path, **kwargs), fj.load_tokenizer(path)
        _LAST_ENGINE[key] = engine, tokenizer
    engine = engine.with_planner(options=options, **pk)  # the kept engine stays as built
    if sync_s is not None:
        kernel = json.dumps(OmegaConf.to_container(cfg.kernel, resolve=True), sort_keys=True, default=str)
        engine = engine.with_planner(options=options, latency=_with_sync(engine, sync_s, (key, kernel)), **pk)
    return engine, tokenizer


def _with_sync(engine, sync_s, measured: tuple):
    """The engine's latency model with its ``sync_s`` replaced by ``planner.sync_s``: a number of seconds, or
    ``"measure"`` (:func:`~fiddler_jax.runtime.sync_penalty.measure_sync_penalty` on this engine, measured once per
    ``measured``: the built engine's key and the ``kernel`` group, whose options, threads and spins it depends on)."""
    if sync_s == "measure":
        from fiddler_jax.runtime.sync_penalty import measure_sync_penalty

        if measured not in _MEASURED_SYNC:
            _MEASURED_SYNC[measured] = measure_sync_penalty(engine)
            print(f"[sync] a synced layer step costs {_MEASURED_SYNC[measured] * 1e3:.3f} ms over a streamed one "
                  f"(the latency model's round trip: {engine.latency.sync_s * 1e3:.3f} ms)", flush=True)
        sync_s = _MEASURED_SYNC[measured]
    return dataclasses.replace(engine.latency, sync_s=sync_s)


def engine_kwargs(cfg, config, size: dict, pk: dict, **extra) -> dict:
    """The keyword arguments of ``Engine.from_pretrained`` / ``from_random`` for the config: its size
    (:func:`engine_size`), placement, dtype, profile, seed, the resident experts (:func:`resident_count`) and the
    planner's (:func:`planner_kwargs`)."""
    pl = cfg.placement
    return dict(size, placement=pl.policy, dtype=cfg.model.dtype, profile=pl.profile, seed=pl.seed,
                resident_experts=resident_count(config, pl), expert_precision=cfg.model.expert_precision,
                int4_group=cfg.model.int4_group, **pk, **extra)


def check_engine(cfg) -> None:
    """The checks :func:`build_engine` makes before it loads anything (``Engine.check`` with the build's keyword
    arguments), without loading weights or using a device: the planner binds with its parameters (``cpu_only``
    has no ``max_transfers``; ``planner.sync_s`` is a number, measure or null), the engine's size resolves (the
    KV reserve holds every beam) and the placement fits the GPU budget (KV cache, workspace and slots under it).
    Raises the error the build would. A budget of ``auto`` is checked on the device only (it asks JAX), as is a
    routing profile (reading it traces the model): there only the planner is bound."""
    from fiddler_jax.runtime.engine import Engine, bind_planner

    pk = planner_kwargs(cfg.planner)
    planner_sync_s(cfg.planner)
    if cfg.hardware.gpu_budget is None:
        params = {k: v for k, v in pk.items() if k not in ("planner", "staging_slots", "cache_slots")}
        bind_planner(pk["planner"], params, pk["staging_slots"], pk["cache_slots"])
        kv_rows(cfg)
        return
    config = model_config(cfg.model)
    Engine.check(config, **{**engine_kwargs(cfg, config, engine_size(cfg), pk), "profile": None})


def resident_count(config, placement) -> int | None:
    """``placement.resident_experts``, or ``placement.resident_fraction`` of the model's MoE experts (rounded),
    or None (the budget decides); both set is an error."""
    fraction, count = placement.resident_fraction, placement.resident_experts
    if fraction is None:
        return count
    if count is not None:
        raise InvalidInputError(f"placement.resident_experts={count} and placement.resident_fraction={fraction} "
                                "both fix the resident experts; set one of them")
    if not 0.0 <= float(fraction) <= 1.0:
        raise InvalidInputError(f"placement.resident_fraction must be in [0, 1]; got {fraction}")
    return int(math.floor(float(fraction) * len(config.moe_layers) * config.num_experts + 0.5))  # half up


def release_engines() -> None:
    """Drop the engine kept for reuse (its GPU buffers and pinned experts are freed)."""
    import gc

    _LAST_ENGINE.clear()
    _MEASURED_SYNC.clear()
    gc.collect()
