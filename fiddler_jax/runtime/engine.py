"""The hybrid engine's facade: build an engine over a checkpoint (place -> load -> pin), and run it.

Placement decides which experts live on the GPU within the budget (:mod:`placement`); the model is loaded with
only those experts on the device, and every other expert is pinned once in host memory (:mod:`host_experts`),
where the CPU lane reads it in place and the PCIe lane copies it from. The shared pieces are
:class:`~fiddler_jax.runtime.resources.EngineResources`; the lanes (:mod:`lanes`), the executor of a plan
(:mod:`executor`) and the forward pass (:mod:`step_loop`) are built over them for one planner, latency model and
set of :class:`~fiddler_jax.runtime.options.EngineOptions`. ``logits``, ``generate`` and
``generate_with_stats`` have the plain model's contract; every layer step is recorded in ``engine.trace``.

Everything a call needs is checked before the work starts: the planner against the placement (``gpu_only`` with
offloaded experts), a routing profile against the model's shape, the host memory the offloaded experts need,
and every call's rows and cache length against the KV reserve placed inside the GPU budget. An engine may be
shared between threads: its calls run one at a time (a lock shared by every engine over the same resources).
"""
from __future__ import annotations

import functools
import inspect
import os

import numpy as np

from fiddler_jax.errors import InvalidInputError
from fiddler_jax.models.checkpoint import load_split, resolve_dtype
from fiddler_jax.models.config import ModelConfig
from fiddler_jax.models.quantization import DEFAULT_INT4_GROUP
from fiddler_jax.models.quantized_experts import check_model_precision, resident_stack_store
from fiddler_jax.runtime.beam_search import beam_search, check_beam_args, check_kv_reserve
from fiddler_jax.runtime.calibrate import geometry_of
from fiddler_jax.runtime.compiled_programs import release_if_near_mapping_limit
from fiddler_jax.runtime.executor import Executor
from fiddler_jax.runtime.generate import (
    GenerationStats, cache_length, check_beam_limits, check_sampling, check_token_ids, decode_loop, eos_token_ids,
    fill_token, prompt_batch,
)
from fiddler_jax.runtime.host_experts import HostExperts, check_host_memory, size_pinned_pool
from fiddler_jax.runtime.lanes.cpu import CpuLane
from fiddler_jax.runtime.lanes.gpu import GpuLane
from fiddler_jax.runtime.lanes.pcie import PcieLane
from fiddler_jax.runtime.lanes.streamed import StreamedLane
from fiddler_jax.runtime.latency import LatencyModel
from fiddler_jax.runtime.latency_source import resolve_latency
from fiddler_jax.runtime.options import EngineOptions
from fiddler_jax.runtime.placement import Placement, kv_cache_bytes, place
from fiddler_jax.runtime.planning import (
    DEFAULT_STAGING_SLOTS, BoundPlanner, PlanMemo, PlannerError, get_planner, plan_fiddler, plan_fiddler_overlap,
    plan_gpu_only, plan_transfer,
)
from fiddler_jax.runtime.planning.registry import policy_of
from fiddler_jax.runtime.planning.streamed_steps import all_cpu_by_bound
from fiddler_jax.runtime.profiling import RoutingProfile
from fiddler_jax.units import format_bytes
from fiddler_jax.runtime.resources import EngineResources
from fiddler_jax.runtime.step_loop import StepLoop
from fiddler_jax.runtime.trace import Trace

COPYING_POLICIES = (plan_fiddler, plan_fiddler_overlap, plan_transfer)


def bind_planner(planner: str, planner_params: dict | None, staging_slots: int, cache_slots: int) -> BoundPlanner:
    """The planner for a name and its parameters (``lru`` is ``transfer`` with a cache); a policy that copies
    gets the ``staging_slots`` placement reserves unless its parameters name them."""
    params = dict(planner_params or {})
    policy = policy_of(planner)
    if "staging_slots" in inspect.signature(policy).parameters:
        params.setdefault("staging_slots", staging_slots)
    if cache_slots:
        params["cache_slots"] = cache_slots
    bound = get_planner(planner, **params)
    if staging_slots < 1 and policy in COPYING_POLICIES:
        raise InvalidInputError(f"planner {planner!r} copies experts and needs staging_slots ≥ 1")
    return bound


def check_planner_fits(planner: BoundPlanner, resident: np.ndarray) -> None:
    """``gpu_only`` needs every expert resident: refuse it when placement offloads any (before loading)."""
    if planner.policy is plan_gpu_only and not resident.all():
        raise PlannerError(f"planner gpu_only: {int((~resident).sum())} of {resident.size} experts are not on the "
                           f"GPU at this budget; raise gpu_budget until every expert is resident, or choose a hybrid "
                           f"planner (planner=fiddler_overlap)")


def abstract_model(cfg: ModelConfig):
    """The model's structure without weights (what a routing profile's fingerprint is taken over)."""
    from flax import nnx

    from fiddler_jax.models.causal_lm import MoeForCausalLM

    return nnx.eval_shape(lambda: MoeForCausalLM(cfg, rngs=nnx.Rngs(0)))


class Engine:
    """Mixtral with experts split between the GPU and the host, planned per layer step (module docstring)."""

    def __init__(self, resources: EngineResources, planner: BoundPlanner, latency: LatencyModel,
                 options: EngineOptions | None = None):
        options = options or EngineOptions()
        if planner.cache_slots != resources.cache_slots:
            raise InvalidInputError(f"planner {planner.name!r} needs {planner.cache_slots} cache slots, but the "
                                    f"engine's resources hold {resources.cache_slots}")
        self.resources, self.planner, self.latency, self.options = resources, planner, latency, options
        self.trace = Trace()
        r, cfg = resources, resources.config
        resident = r.placement.resident
        gpu = GpuLane(r.model, resident, r.device)
        cpu = CpuLane(r.host, r.device, options.cpu_backend, options.pinned_activations, self.trace.now)
        pcie = PcieLane(r.staging, cfg.num_experts)
        if r.cache is not None:
            r.cache.reset()  # the cache's slots hold what an earlier engine over these resources copied
        self.executor = Executor(gpu, cpu, pcie, r.cache, latency, planner.prefetch, options.cpu_lane_thread,
                                 self.trace.now)
        self.memo = PlanMemo(planner, resident, latency)
        eligible = (options.cpu_backend == "kernel" and r.cache is None and r.device.platform in ("cpu", "gpu"))
        self.streamed = StreamedLane(r.streamed, resident, cfg.num_experts_per_tok, self.memo,
                                     options.streamed_cpu_lane, eligible,
                                     functools.partial(all_cpu_by_bound, planner, latency,
                                                       top_k=cfg.num_experts_per_tok),
                                     overlap=options.streamed_overlap)
        self.step_loop = StepLoop(cfg, r.segments, resident, r.device, self.executor, self.streamed, self._plan,
                                  self.trace, token_program=options.token_program)

    def _plan(self, counts, layer: int, staged_s=None):
        cache = self.resources.cache
        if cache is not None:
            return cache.plan(self.planner, counts, self.resources.placement.resident[layer], self.latency, layer)
        return self.memo(counts, layer, staged_s)

    # -- building ----------------------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, *, gpu_budget: int | str = "24GiB",
                        planner: str = "fiddler_overlap", placement: str = "popularity",
                        resident_experts: int | None = None, staging_slots: int = DEFAULT_STAGING_SLOTS,
                        cache_slots: int = 0, dtype="bfloat16", profile: str | os.PathLike | None = None,
                        latency: str | os.PathLike | None = None, max_batch: int = 1, max_context: int | None = None,
                        max_step_tokens: int | None = None, seed: int = 0, progress: bool = True,
                        options: EngineOptions | None = None, expert_precision: str = "bf16",
                        int4_group: int = DEFAULT_INT4_GROUP, **planner_params) -> Engine:
        """Place, load and pin a checkpoint folder. ``latency``: "auto" (this machine, calibrated once and
        cached), a latency JSON file, or None (the H100 machine's design numbers, with a warning;
        :mod:`latency_source`). ``profile``: a routing profile from ``fiddler-jax profile``. ``options``: how the
        lanes run (:class:`EngineOptions`). ``max_step_tokens``: the most tokens (rows × positions) one forward
        step holds, which sizes the activation workspace (default ``max_batch × max_context``); a longer prompt
        batch runs as several steps of consecutive positions, with the same result. ``expert_precision``: "bf16"
        (the checkpoint's weights), "int8" or "int4" (groups of ``int4_group`` inputs): the routed experts are
        quantised at load (:mod:`fiddler_jax.models.quantization`), the offloaded ones held quantised in pinned
        memory (both lanes read those fewer bytes) and the resident ones kept quantised on the GPU (placement counts
        their stored bytes, so more fit the budget) and computed with as the same dequantised weights, so the
        engine computes what ``fj.load_pretrained(path, expert_precision=...)`` computes."""
        cfg = ModelConfig.from_pretrained(path)

        def load(resident, store):
            return load_split(path, dtype, resident=resident, progress=progress, store=store)

        return cls._build(cfg, load, gpu_budget=gpu_budget, planner=planner, placement=placement,
                          resident_experts=resident_experts, staging_slots=staging_slots, cache_slots=cache_slots,
                          dtype=dtype, profile=profile, latency=latency, max_batch=max_batch,
                          max_context=max_context, max_step_tokens=max_step_tokens, seed=seed, progress=progress,
                          options=options, expert_precision=expert_precision, int4_group=int4_group,
                          planner_params=planner_params)

    @classmethod
    def from_random(cls, config: ModelConfig, *, weight_seed: int = 0, router_bias: float = 0.0,
                    **kwargs) -> Engine:
        """The engine over a seeded random model of ``config``'s geometry made in memory
        (:mod:`fiddler_jax.models.random_weights`; nothing is written to disk). Keyword arguments as
        :meth:`from_pretrained`."""
        from fiddler_jax.models.random_weights import random_split_model

        dtype = kwargs.get("dtype", "bfloat16")
        planner_params = {k: kwargs.pop(k) for k in list(kwargs) if k not in inspect.signature(cls._build).parameters}
        return cls._build(config, lambda resident, store: random_split_model(
                              config, dtype, resident=resident, seed=weight_seed, router_bias=router_bias, store=store),
                          planner_params=planner_params, **kwargs)

    @classmethod
    def _build(cls, cfg: ModelConfig, load, *, gpu_budget="24GiB", planner="fiddler_overlap",
               placement="popularity", resident_experts=None, staging_slots=DEFAULT_STAGING_SLOTS, cache_slots=0,
               dtype="bfloat16", profile=None, latency=None, max_batch=1, max_context=None, max_step_tokens=None,
               seed=0, progress=True, options=None, expert_precision="bf16", int4_group=DEFAULT_INT4_GROUP,
               planner_params=None) -> Engine:
        """Planner, options, placement, the pinned pool's size, and the latency model (all before anything is
        loaded); then ``load(resident, store) -> (model, offloaded-expert source)``, ``store`` quantising each
        resident stack as it lands on the device (None at bf16), and the pinning of the offloaded experts
        (quantised on the way)."""
        options = options or EngineOptions()
        if not isinstance(options, EngineOptions):
            raise InvalidInputError(f"options must be an EngineOptions; got {type(options).__name__}")
        bound, placed = cls._placed(cfg, gpu_budget=gpu_budget, planner=planner, placement=placement,
                                    resident_experts=resident_experts, staging_slots=staging_slots,
                                    cache_slots=cache_slots, dtype=dtype, profile=profile, max_batch=max_batch,
                                    max_context=max_context, max_step_tokens=max_step_tokens, seed=seed,
                                    expert_precision=expert_precision, int4_group=int4_group,
                                    planner_params=planner_params)
        offloaded_bytes = int((~placed.resident).sum()) * placed.memory.expert  # host and GPU hold one format
        check_host_memory(offloaded_bytes)
        size_pinned_pool(offloaded_bytes)  # before JAX starts, if it has not
        geometry = geometry_of(cfg, dtype, expert_precision, int4_group)
        lat = resolve_latency(latency, geometry, progress=progress)  # "auto" may calibrate: JAX starts
        release_if_near_mapping_limit()  # the build compiles; a process that built many engines makes room first
        model, source = load(placed.resident, resident_stack_store(expert_precision, int4_group))
        host = HostExperts.pin(source, ~placed.resident, progress=progress, precision=expert_precision,
                               group=int4_group)
        resources = EngineResources.build(model, host, placed, staging_slots=staging_slots,
                                          cache_slots=bound.cache_slots, transfer_s=lat.transfer_s)
        return cls(resources, bound, lat, options)

    @classmethod
    def _placed(cls, cfg: ModelConfig, *, gpu_budget, planner, placement, resident_experts, staging_slots,
                cache_slots, dtype, profile, max_batch, max_context, max_step_tokens, seed, expert_precision,
                int4_group, planner_params) -> tuple[BoundPlanner, Placement]:
        """The planner bound to its parameters and the placement (a profile of another model refused), checked
        against each other, and the expert precision against the model's geometry: everything :meth:`_build`
        decides before it loads anything."""
        check_model_precision(cfg.hidden_size, cfg.moe_intermediate_size, expert_precision, int4_group)
        bound = bind_planner(planner, planner_params, staging_slots, cache_slots)
        counts = None
        if profile is not None:  # refuses a profile of another model, before anything is loaded
            counts = RoutingProfile.load(profile, abstract_model(cfg)).counts
        placed = place(cfg, gpu_budget, itemsize=resolve_dtype(dtype).itemsize, policy=placement, profile=counts,
                       resident_experts=resident_experts, max_batch=max_batch, max_context=max_context,
                       max_step_tokens=max_step_tokens, staging_slots=staging_slots, cache_slots=bound.cache_slots,
                       seed=seed, expert_precision=expert_precision, int4_group=int4_group)
        check_planner_fits(bound, placed.resident)
        return bound, placed

    @classmethod
    def check(cls, cfg: ModelConfig, **kwargs) -> Placement:
        """What building an engine of ``cfg`` with these keyword arguments (as :meth:`from_pretrained`'s) would
        refuse before it loads anything -- the planner's parameters, the placement under the budget, the planner
        against the placement -- raised without loading weights or starting a device; returns the placement.
        ``latency``, ``progress`` and ``options`` are not looked at."""
        build = inspect.signature(cls._build).parameters
        planner_params = {k: kwargs.pop(k) for k in list(kwargs) if k not in build}
        placed = inspect.signature(cls._placed).parameters
        defaults = {k: p.default for k, p in build.items() if p.kind == p.KEYWORD_ONLY and k in placed}
        return cls._placed(cfg, **{**defaults, **{k: v for k, v in kwargs.items() if k in defaults},
                                   "planner_params": planner_params})[1]

    def with_planner(self, planner: str, *, options: EngineOptions | None = None, staging_slots: int | None = None,
                     cache_slots: int = 0, latency: LatencyModel | None = None, **planner_params) -> Engine:
        """Another engine over the same resources (weights, placement, pinned experts, GPU buffers) with another
        planner, options and latency model (None: this engine's): what a sweep over planners wants, since
        building Mixtral-8x7B's engine takes minutes and a second copy would not fit. Run one at a time. The
        planner must fit the buffers placed: at most this engine's staging slots and the same dynamic-cache
        slots."""
        staging_slots = self.staging_slots if staging_slots is None else staging_slots
        bound = bind_planner(planner, planner_params, staging_slots, cache_slots)
        if staging_slots > self.staging_slots or bound.cache_slots != self.cache_slots:
            raise InvalidInputError(
                f"planner {planner!r} needs {staging_slots} staging and {bound.cache_slots} cache slots, but this "
                f"engine placed {self.staging_slots} and {self.cache_slots}; build a new engine")
        check_planner_fits(bound, self.placement.resident)
        return Engine(self.resources, bound, latency or self.latency, options or self.options)

    # -- what it is built on -----------------------------------------------------------------------------------
    @property
    def model(self):
        return self.resources.model

    @property
    def config(self) -> ModelConfig:
        return self.resources.config

    @property
    def placement(self) -> Placement:
        return self.resources.placement

    @property
    def host(self) -> HostExperts:
        return self.resources.host

    @property
    def staging_slots(self) -> int:
        return self.resources.staging_slots

    @property
    def cache_slots(self) -> int:
        return self.resources.cache_slots

    def jitted_functions(self) -> dict:
        """The step loop's jitted functions by name, each once (``f._cache_size()`` counts its compiles: tests and
        the device check assert that changing plans never compile again)."""
        return self.resources.segments.jitted()

    # -- running -----------------------------------------------------------------------------------------------
    def forward(self, tokens, cache, start: int, *, last_only: bool = False):
        """Logits [B, T, V] float32 of ``tokens`` at absolute positions start.. ([B, V] of the last position with
        ``last_only``), and the updated KV cache (:mod:`step_loop`). More than ``max_step_tokens`` tokens (the
        workspace placement sized) run as consecutive steps of at most that many, each over all rows and the
        next positions: the cache makes the result the same."""
        rows, width = tokens.shape
        columns = max(1, self.placement.memory.step_tokens // rows) if self.placement.memory.step_tokens else width
        with self.resources.lock:
            if width <= columns:
                return self.step_loop.forward(tokens, cache, start, last_only=last_only)
            import jax.numpy as jnp

            pieces = []
            for a in range(0, width, columns):
                out, cache = self.step_loop.forward(tokens[:, a:a + columns], cache, start + a, last_only=last_only)
                pieces.append(out)
            return (pieces[-1] if last_only else jnp.concatenate(pieces, axis=1)), cache

    def logits(self, input_ids) -> np.ndarray:
        """Float32 logits [B, T, vocab] of a full forward pass (same contract as ``fiddler_jax.logits``)."""
        import jax.numpy as jnp

        ids = check_token_ids(self.model, input_ids)
        self._check_kv_reserve(*ids.shape, "logits")
        with self.resources.lock:
            out, _ = self.forward(jnp.asarray(ids), self.model.init_cache(*ids.shape), 0)
            out = np.asarray(out, np.float32)
            self.step_loop.drain()
        return out

    def generate(self, input_ids, max_new_tokens: int, do_sample: bool = False, seed: int = 0, *,
                 temperature: float = 1.0, top_p: float = 1.0, eos_token_id=None, num_beams: int = 1,
                 length_penalty: float = 1.0, early_stopping=False, kv_slots: int | None = None,
                 attention_mask=None) -> np.ndarray:
        """Greedy, sampled or beam-search continuation [B, T + n] (same contract as ``fiddler_jax.generate``,
        prompts of different lengths included). Beam search needs num_beams × cache length within the KV reserve
        placed for ``max_batch`` rows."""
        check_beam_args(num_beams, length_penalty, early_stopping, do_sample)
        if num_beams == 1:
            return self.generate_with_stats(input_ids, max_new_tokens, do_sample, seed, temperature=temperature,
                                            top_p=top_p, eos_token_id=eos_token_id, kv_slots=kv_slots,
                                            attention_mask=attention_mask)[0]
        ids, pad, max_new_tokens, limits = prompt_batch(self.model, input_ids, attention_mask, max_new_tokens)
        check_beam_limits(limits)
        if max_new_tokens == 0:
            return ids

        slots = self._kv_slots(ids.shape[1], max_new_tokens, kv_slots)
        check_kv_reserve(kv_cache_bytes(self.config, self.model.dtype.itemsize, num_beams, slots),
                         self.placement.memory.kv_cache, num_beams, slots)
        with self.resources.lock:
            out = beam_search(self._forward_last, lambda rows, n: self.model.init_cache(rows, slots), ids,
                              max_new_tokens, num_beams, eos_token_ids=self._eos(eos_token_id),
                              length_penalty=length_penalty, early_stopping=early_stopping,
                              pad_token_id=self.config.pad_token_id, prompt_pad=pad)
            self.step_loop.drain()
        return out

    def generate_with_stats(self, input_ids, max_new_tokens: int, do_sample: bool = False, seed: int = 0, *,
                            temperature: float = 1.0, top_p: float = 1.0, eos_token_id=None,
                            kv_slots: int | None = None, attention_mask=None):
        """Greedy or sampled continuation and its :class:`GenerationStats` (time to first token apart from the
        steady-state decode rate), like ``fiddler_jax.generate_with_stats``. ``kv_slots``: the KV-cache length
        (default: prompt + new tokens rounded up); runs of different lengths given the same value share every
        compiled shape (a short warm-up then compiles what a long run needs)."""
        ids, pad, most, limits = prompt_batch(self.model, input_ids, attention_mask, max_new_tokens)
        check_sampling(do_sample, temperature, top_p)
        if most == 0:
            return ids, GenerationStats(prompt_tokens=ids.shape[1], row_new_tokens=[0] * len(ids))
        slots = self._kv_slots(ids.shape[1], most, kv_slots)
        self._check_kv_reserve(ids.shape[0], slots, "generate")
        with self.resources.lock:
            out = decode_loop(self._forward_last, self.model.init_cache(ids.shape[0], slots, pad), ids,
                              most, self._eos(eos_token_id), do_sample=do_sample, seed=seed,
                              temperature=temperature, top_p=top_p, limits=limits, fill=fill_token(self.config))
            self.step_loop.drain()
        return out

    def trace_summary(self) -> dict:
        """``engine.trace.summary()``: GPU-hit rate, experts and busy time per lane, idle time."""
        return self.trace.summary()

    def _kv_slots(self, prompt_len: int, max_new_tokens: int, kv_slots: int | None) -> int:
        need = cache_length(prompt_len, max_new_tokens, self.config)
        if kv_slots is None:
            return need
        if not need <= kv_slots <= self.config.max_position_embeddings:
            raise InvalidInputError(f"kv_slots={kv_slots} must hold the prompt and the new tokens ({need}) and stay "
                                    f"within max_position_embeddings ({self.config.max_position_embeddings})")
        return int(kv_slots)

    def _check_kv_reserve(self, rows: int, slots: int, call: str) -> None:
        """Refuse a call whose KV cache (``rows`` sequences × ``slots`` positions) exceeds the reserve placement
        made inside the GPU budget (``max_batch`` × ``max_context`` positions)."""
        need = kv_cache_bytes(self.config, self.model.dtype.itemsize, rows, slots)
        reserved = self.placement.memory.kv_cache
        if need > reserved:
            room = reserved // kv_cache_bytes(self.config, self.model.dtype.itemsize, 1, 1)
            raise InvalidInputError(
                f"{call}: {rows} sequence(s) × {slots} cache positions need {format_bytes(need)} of KV cache, more "
                f"than the {format_bytes(reserved)} ({room} positions: max_batch × max_context) this engine "
                f"reserved inside its GPU budget; build the engine with a larger max_batch or max_context "
                f"(Engine.from_pretrained(..., max_batch=..., max_context=...)), or pass fewer rows or a shorter "
                f"prompt + max_new_tokens")

    def _forward_last(self, tokens, cache, start):
        return self.forward(tokens, cache, start, last_only=True)

    def _eos(self, eos_token_id) -> tuple[int, ...]:
        return eos_token_ids(self.config, eos_token_id)
