"""The hybrid engine: Fiddler's layer-step loop over GPU-resident and host-resident experts.

Weights: everything but the experts, and the experts that placement makes resident, live on the "GPU" (the
first JAX device, whatever its platform); every other expert lives once, in pinned host memory
(:mod:`host_experts`), where the CPU lane reads it in place and the PCIe lane copies it from. For each layer of
each forward step:
  1. a jitted segment runs attention, the post-attention norm and the router, and counts the tokens sent to
     each expert -- and the tokens the next layer's router would send to each of its experts from this hidden
     state (the prediction prefetching acts on);
  2. the resident experts' mix is queued at once (it needs the routing, not a plan, so its dispatch overlaps
     the segment's run on the GPU instead of following the sync); the counts and the routing come to the host
     (the one sync of the step: one transfer, packed by :mod:`routing_sync`) and the planner (pure Python,
     outside jit) gives each active expert a lane: GPU (resident, cached, or prefetched during the previous
     step), CPU or TRANSFER;
  3. the lanes run. CPU: a worker thread fetches the activations and runs the C++ kernel (bfloat16; float32
     parity runs use numpy) over the pinned views — the kernel releases the GIL. PCIe: TRANSFER experts are
     copied (:mod:`staging`: an eager copy on XLA's host-to-device stream, beside compute) into fresh GPU
     arrays, at most ``staging_slots`` alive at once; a step that leaves the PCIe lane idle starts copying the
     next layer's predicted experts instead (``prefetch``, ``planners.plan_prefetch``). GPU: resident, cached
     and copied experts run through ``moe.sparse_expert_mix`` with a slot
     map, so plans never change shapes and never recompile. With a concurrent plan (``fiddler_overlap``,
     ``cpu_only``, ...) the three lanes run at once: the main thread queues the GPU work without waiting, then
     runs the CPU lane itself (or, when the plan copies, leaves it to the worker thread and times the copies).
     With a sequential plan (``fiddler``, the paper's execution) each lane waits for the one before: GPU, PCIe,
     CPU. Plans of small steps are remembered per (layer, counts), so decode rarely runs the planner's search;
  4. the contributions are summed on the GPU with the residual.
A layer whose experts are all resident runs as one jitted call with no host round trip. A layer step whose plan
no routing can change (:mod:`streamed_steps`: one-token decode under ``fiddler_overlap`` or ``cpu_only`` on the
H100 machine -- every offloaded expert goes to the CPU) skips steps 2-3's sync and planner: the resident mix and
the CPU lane (a custom call the device's stream runs by itself, ``kernels.streamed_lane``) are queued like any
device work, so the host queues whole tokens ahead; ``streamed_cpu_lane = False`` syncs every step (ablation). Every step is
recorded in ``engine.trace`` (counts, plan, lane spans from queueing to completion;
``engine.trace.save("trace.json")`` writes a Perfetto timeline).

With ``cache_slots`` (or ``planner="lru"``) copied experts stay in a per-layer dynamic cache with LRU eviction.
"""
from __future__ import annotations

import concurrent.futures
import copy
import functools
import inspect
import math
import os
import weakref

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from fiddler_jax.errors import InvalidInputError
from fiddler_jax.models.checkpoint import load_split, resolve_dtype
from fiddler_jax.models.config import MixtralConfig
from fiddler_jax.models.moe import Routing, route, sparse_expert_mix
from fiddler_jax.runtime import planners as P
from fiddler_jax.runtime import routing_sync
from fiddler_jax.runtime.generate import (
    GenerationStats, cache_length, check_sampling, check_token_ids, decode_loop,
)
from fiddler_jax.runtime.latency import LatencyModel
from fiddler_jax.runtime.calibrate import geometry_of, load_calibrated
from fiddler_jax.runtime.host_experts import HostExperts, copy_into_slot, size_pinned_pool
from fiddler_jax.runtime.pinned_activations import PinnedActivations
from fiddler_jax.runtime.staging import StagingPool
from fiddler_jax.runtime.streamed_steps import all_cpu_for_any_routing
from fiddler_jax.runtime.beam_search import beam_search, check_beam_args, check_kv_reserve
from fiddler_jax.runtime.placement import Placement, kv_cache_bytes, place
from fiddler_jax.runtime.profiling import RoutingProfile
from fiddler_jax.runtime.trace import StepRecord, Trace


class _Split:
    """A module split once into its graph and a flat list of its arrays. The hot path passes ``leaves`` (a list,
    flattened by JAX's C++ pytree code) to functions jitted once per ``key``, instead of an NNX ``State`` (whose
    Python flattening sorts and hashes every key) and a static graphdef (hashed again by every call): on the tiny
    model that halved the host time of a layer step."""

    def __init__(self, module):
        graphdef, state = nnx.split(module)
        self.leaves, treedef = jax.tree.flatten(state)
        self.key = (graphdef, treedef)

    @staticmethod
    def merge(key, leaves):
        graphdef, treedef = key
        return nnx.merge(graphdef, jax.tree.unflatten(treedef, leaves))


def _residual(pending):
    """The layer input from a pending residual: ``(x,)``, or ``(h, gpu_out, cpu_out)`` of a hybrid MoE step, whose
    sum is taken at the start of the next jitted step (one dispatch fewer per layer than a separate add)."""
    if len(pending) == 1:
        return pending[0]
    h, gpu_out, cpu_out = pending
    return h + (gpu_out + cpu_out).astype(h.dtype).reshape(h.shape)


@functools.cache
def _layer_steps(key, router_key):
    """The jitted layer steps of one layer structure (all of Mixtral's layers share one, so one compile each);
    ``router_key``: the (post-attention norm, gate) structure of the layer the step looks ahead to."""

    @functools.partial(jax.jit, donate_argnums=2)
    def fused_layer(leaves, pending, kv, start):
        """A layer whose experts are all on the GPU: attention + MoE in one call."""
        x = _residual(pending)
        positions = start + jnp.arange(x.shape[1], dtype=jnp.int32)
        x, kv, _ = _Split.merge(key, leaves)(x, kv, positions, start)
        return x, kv

    @functools.partial(jax.jit, donate_argnums=2)
    def attention_and_router(leaves, pending, kv, start, lookahead):
        """Step 1: residual after attention, the normed MoE input [N, hidden], the routing, and the step's sync
        vector (:mod:`routing_sync`: per-expert counts, the routing, the counts the next layer's router --
        ``lookahead``: its norm and gate leaves, None when the engine does not prefetch -- would give this hidden
        state, and for small steps the MoE input)."""
        layer = _Split.merge(key, leaves)
        x = _residual(pending)
        positions = start + jnp.arange(x.shape[1], dtype=jnp.int32)
        h, kv = layer.attention_block(x, kv, positions, start)
        moe_in = layer.post_attention_layernorm(h).reshape(-1, h.shape[-1])
        moe = layer.block_sparse_moe
        routing = route(moe.gate(moe_in), moe.top_k)
        counts = jnp.bincount(routing.experts.reshape(-1), length=moe.num_experts)
        predicted = None
        if lookahead is not None:
            next_norm, next_gate = (_Split.merge(k, part) for k, part in zip(router_key, lookahead))
            guess = route(next_gate(next_norm(h).reshape(-1, h.shape[-1])), moe.top_k)
            predicted = jnp.bincount(guess.experts.reshape(-1), length=moe.num_experts)
        return h, moe_in, routing, routing_sync.pack(counts, routing.experts, routing.weights, predicted, moe_in), kv

    return fused_layer, attention_and_router


@functools.cache
def _model_ends(embed_key, norm_key, head_key):
    """The jitted embedding and final norm + LM head (``head_key`` None: tied to the embedding)."""

    @jax.jit
    def embed(leaves, tokens):
        return _Split.merge(embed_key, leaves)(tokens)

    @functools.partial(jax.jit, static_argnames="last_only")
    def head(embed_leaves, norm_leaves, head_leaves, pending, last_only=False):
        """Logits [B, T, V] float32, or [B, V] of the last position only (``last_only``: generation's steps, which
        then neither compute nor hold the prompt's other logits)."""
        x = _residual(pending)
        if last_only:
            x = x[:, -1]
        x = _Split.merge(norm_key, norm_leaves)(x)
        if head_key is None:
            return _Split.merge(embed_key, embed_leaves).attend(x)
        return _Split.merge(head_key, head_leaves)(x, out_dtype=jnp.float32)

    return embed, head


def streamed_cpu_mix(moe_in, experts, weights, *, tables: int):
    """``kernels.streamed_lane.streamed_cpu_mix`` (imported when first used, like the rest of the kernel)."""
    from fiddler_jax.kernels.streamed_lane import streamed_cpu_mix as call

    return call(moe_in, experts, weights, tables=tables)


@jax.jit
def _stack_mix(moe_in, routing, slot_of, w1, w3, w2):
    return sparse_expert_mix(moe_in, routing, w1, w3, w2, slot_of)


@functools.partial(jax.jit, static_argnames="num_experts")
def _expert_mix(moe_in, routing, expert, w1, w3, w2, *, num_experts):
    """One copied expert's share of the MoE output (its weights are a PCIe-lane copy, one array each)."""
    slot_of = jnp.where(jnp.arange(num_experts) == expert, 0, -1).astype(jnp.int32)
    return sparse_expert_mix(moe_in, routing, w1[None], w3[None], w2[None], slot_of)


def _buffers_mix(moe_in, routing, slot_of: np.ndarray, buffers: dict):
    """``_stack_mix`` over a layer's dynamic-cache buffers (a dict of stacked weights) with a host slot map."""
    return _stack_mix(moe_in, routing, jnp.asarray(slot_of), buffers["w1"], buffers["w3"], buffers["w2"])


def _accepts(policy_name: str, param: str) -> bool:
    policy = P.POLICIES.get(policy_name)
    return policy is not None and param in inspect.signature(policy).parameters


def _check_cpu_backend(cpu_backend: str) -> None:
    if cpu_backend not in CPU_BACKENDS:
        raise InvalidInputError(f"unknown cpu_backend {cpu_backend!r}; valid: {', '.join(CPU_BACKENDS)}")


def _bind_planner(planner: str, planner_params: dict | None, staging_slots: int, cache_slots: int):
    """The planner callable for a name and its parameters (``lru`` is ``transfer`` with a cache)."""
    planner_params = dict(planner_params or {})
    policy = "transfer" if planner == "lru" else planner
    if _accepts(policy, "staging_slots"):
        planner_params.setdefault("staging_slots", staging_slots)
    if cache_slots:
        planner_params["cache_slots"] = cache_slots
    bound = P.get_planner(planner, **planner_params)
    if staging_slots < 1 and policy in ("fiddler", "fiddler_overlap", "transfer"):
        raise InvalidInputError(f"planner {planner!r} copies experts and needs staging_slots ≥ 1")
    return bound


def cpu_expert_mix(moe_in: np.ndarray, token: np.ndarray, expert: np.ndarray, weight: np.ndarray,
                   tables: tuple[list, list, list], prepared=None, out: np.ndarray | None = None) -> np.ndarray:
    """The CPU lane: float32 [N, hidden] = Σ weight · FFN_expert(moe_in[token]) over the given assignments, with
    ``tables`` = (w1s, w3s, w2s) per-expert host arrays (None where an expert is not on the host). bfloat16
    weights run through the C++ kernel (all experts of the call at once, over all cores, reading the weights
    where they are; ``prepared``: the same tables as ``kernels.ExpertTables`` made once, which skips the per-call
    checks); float32 weights (parity runs) through numpy in float32. ``out``: where to write the result (every
    row is written; a pinned buffer of :mod:`pinned_activations`), else a new array."""
    kernel = prepared is not None or (len(token) > 0 and tables[0][int(expert[0])].dtype != np.float32)
    if out is None:
        out = np.zeros(moe_in.shape, np.float32)
    elif not (kernel and len(token)):  # the kernel writes every row; numpy accumulates into zeros
        out[...] = 0.0
    if len(token) == 0:
        return out
    w1s, w3s, w2s = tables
    if not kernel:
        for e in np.unique(expert):
            rows = expert == e
            x = moe_in[token[rows]]
            gate, up = x @ w1s[e].T, x @ w3s[e].T
            y = (gate / (1 + np.exp(-gate)) * up) @ w2s[e].T
            np.add.at(out, token[rows], y * weight[rows, None])
        return out
    from fiddler_jax.kernels import grouped_expert_ffn_numpy

    if prepared is not None:
        w1s, w3s, w2s = prepared, None, None
    return grouped_expert_ffn_numpy(np.ascontiguousarray(moe_in), token.astype(np.int32), expert.astype(np.int32),
                                    weight.astype(np.float32), w1s, w3s, w2s, out=out)


CPU_BACKENDS = ("kernel", "xla")
PINNED_MIN_BYTES = 1 << 20  # CPU-lane activations from this size take the pinned path (pinned_activations)
PLAN_MEMO_TOKENS = 64  # plans of steps with at most this many routed tokens are remembered (Engine._plan)
PLAN_MEMO_SIZE = 1 << 14


@jax.jit
def _xla_expert_ffn(x, w1, w3, w2):
    f32 = jnp.float32
    gate = jnp.dot(x, w1.T, preferred_element_type=f32)
    up = jnp.dot(x, w3.T, preferred_element_type=f32)
    return jnp.dot((jax.nn.silu(gate) * up).astype(x.dtype), w2.T, preferred_element_type=f32)


def xla_expert_mix(moe_in: np.ndarray, token: np.ndarray, expert: np.ndarray, weight: np.ndarray,
                   tables: tuple[list, list, list]) -> np.ndarray:
    """The CPU lane through XLA's own CPU dot (``kernel=xla``, the ablation baseline): each expert's FFN is a
    jitted computation on the JAX CPU device over the same pinned weights (``device_put`` of an aligned host
    view aliases it, no copy)."""
    cpu = jax.devices("cpu")[0]
    out = np.zeros(moe_in.shape, np.float32)
    for e in np.unique(expert):
        rows = expert == e
        x = jax.device_put(np.ascontiguousarray(moe_in[token[rows]]), cpu)
        y = np.asarray(_xla_expert_ffn(x, *(jax.device_put(t[e], cpu) for t in tables)))
        np.add.at(out, token[rows], y * weight[rows, None])
    return out


class Engine:
    """Mixtral with experts split between the GPU and the host, planned per layer step (module docstring)."""

    def __init__(self, model, host: HostExperts, placement: Placement, planner, latency: LatencyModel,
                 staging_slots: int, cache_slots: int = 0, cpu_backend: str = "kernel"):
        self.model = model
        self.config: MixtralConfig = model.config
        self.placement = placement
        self.planner = planner
        self.latency = latency
        self.host = host
        self._trace = Trace()
        self._device = jax.devices()[0]
        self._embed_part, self._norm_part = _Split(model.embed_tokens), _Split(model.norm)
        self._head_part = None if model.lm_head is None else _Split(model.lm_head)
        self._embed, self._head = _model_ends(self._embed_part.key, self._norm_part.key,
                                              None if self._head_part is None else self._head_part.key)
        self._layers = [_Split(layer) for layer in model.layers]
        routers = [(_Split(l.post_attention_layernorm), _Split(l.block_sparse_moe.gate)) for l in model.layers]
        # each layer step looks ahead to the next layer's router (the last layer to its own: never prefetched)
        self._lookahead = [tuple(p.leaves for p in routers[min(n + 1, len(routers) - 1)]) for n in range(len(routers))]
        self._steps = [_layer_steps(part.key, tuple(p.key for p in routers[n]))  # (fused, attention_and_router)
                       for n, part in enumerate(self._layers)]
        self._zeros_cache = {}
        self._plans = {}  # (layer, counts bytes) -> Plan (see _plan)
        self._stacks = [(moe.w1[...], moe.w3[...], moe.w2[...]) for moe in (l.block_sparse_moe for l in model.layers)]
        self._slot_of = []
        for resident in placement.resident:
            slot_of = np.full(len(resident), -1, np.int32)
            slot_of[resident] = np.arange(int(resident.sum()), dtype=np.int32)
            self._slot_of.append(jnp.asarray(slot_of))
        cfg, dtype = self.config, model.dtype
        self.staging_slots = staging_slots
        # The PCIe lane's live copies (shared with engines made by ``with_planner``): at most ``staging_slots``.
        self._pool = StagingPool(host, self._device, staging_slots, latency.transfer_s)
        # The dynamic cache: ``cache_slots`` expert buffers per layer; which expert sits in which slot is the
        # planner's CacheState (planner.caches[layer]).
        self.cache_slots = cache_slots
        shapes = {"w1": (cache_slots, cfg.intermediate_size, cfg.hidden_size),
                  "w3": (cache_slots, cfg.intermediate_size, cfg.hidden_size),
                  "w2": (cache_slots, cfg.hidden_size, cfg.intermediate_size)}
        self._cache = [{k: jnp.zeros(s, dtype) for k, s in shapes.items()}
                       for _ in range(cfg.num_hidden_layers)] if cache_slots else []
        self._cpu_lane = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="fiddler-cpu-lane")
        self.cpu_backend = cpu_backend
        self.cpu_lane_thread = os.environ.get("FIDDLER_CPU_LANE", "inline") == "thread"
        # Queue the resident experts' mix before the step's sync (measurement knob: False queues it after the
        # plan, as before session 7; scripts/probe_decode_step.py compares the two).
        self.early_resident_mix = True
        self.set_pinned_activations(True)
        # Steps whose plan no routing can change run with no host sync (streamed_steps; the CPU lane as a custom
        # call the stream runs, kernels.streamed_lane). False: every step syncs and plans (an ablation).
        self.streamed_cpu_lane = True
        self._streamed_ids: dict[int, int] = {}  # layer -> registered tables id (shared with with_planner)
        self._streamable: dict[tuple[int, int], bool] = {}  # (layer, tokens) -> the step takes the streamed lane

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, *, gpu_budget: int | str = "24GiB",
                        planner: str = "fiddler_overlap", placement: str = "popularity",
                        resident_experts: int | None = None, staging_slots: int = P.DEFAULT_STAGING_SLOTS,
                        cache_slots: int = 0, dtype="bfloat16", profile: str | os.PathLike | None = None,
                        latency: str | os.PathLike | None = None, max_batch: int = 1, max_context: int | None = None,
                        seed: int = 0, cpu_backend: str = "kernel", progress: bool = True,
                        **planner_params) -> Engine:
        """Place, load and plan a checkpoint folder. ``latency``: None = the design-note numbers of the H100
        machine; "auto" = this machine's calibration for this geometry (``fiddler-jax calibrate``); or a latency
        JSON file. ``profile``: a routing profile from ``fiddler-jax profile``. ``cpu_backend``: "kernel" (our
        C++ kernel) or "xla" (XLA's own CPU dot: the ablation baseline)."""
        cfg = MixtralConfig.from_pretrained(path)

        def load(resident):
            model, reader = load_split(path, dtype, resident=resident, progress=progress)
            if profile is not None:
                RoutingProfile.load(profile, model)  # refuses a profile of another model
            return model, reader

        return cls._build(cfg, load, gpu_budget=gpu_budget, planner=planner, placement=placement,
                          resident_experts=resident_experts, staging_slots=staging_slots, cache_slots=cache_slots,
                          dtype=dtype, profile=profile, latency=latency, max_batch=max_batch,
                          max_context=max_context, seed=seed, cpu_backend=cpu_backend, progress=progress,
                          planner_params=planner_params)

    @classmethod
    def from_random(cls, config: MixtralConfig, *, weight_seed: int = 0, router_bias: float = 0.0,
                    **kwargs) -> Engine:
        """The engine over a seeded random model of ``config``'s geometry made in memory
        (:mod:`fiddler_jax.models.random_weights`; nothing is written to disk). Keyword arguments as
        :meth:`from_pretrained`."""
        from fiddler_jax.models.random_weights import random_split_model

        dtype = kwargs.get("dtype", "bfloat16")
        planner_params = {k: kwargs.pop(k) for k in list(kwargs) if k not in inspect.signature(cls._build).parameters}
        return cls._build(config, lambda resident: random_split_model(config, dtype, resident=resident,
                                                                      seed=weight_seed, router_bias=router_bias),
                          planner_params=planner_params, **kwargs)

    @classmethod
    def _build(cls, cfg: MixtralConfig, load, *, gpu_budget="24GiB", planner="fiddler_overlap",
               placement="popularity", resident_experts=None, staging_slots=P.DEFAULT_STAGING_SLOTS, cache_slots=0,
               dtype="bfloat16", profile=None, latency=None, max_batch=1, max_context=None, seed=0,
               cpu_backend="kernel", progress=True, planner_params=None) -> Engine:
        """Planner, latency model, placement; then ``load(resident) -> (model, offloaded-expert source)`` and
        the pinning of the offloaded experts."""
        _check_cpu_backend(cpu_backend)  # before anything is loaded
        bound = _bind_planner(planner, planner_params, staging_slots, cache_slots)
        cache_slots = getattr(bound, "cache_slots", 0)
        if latency is None:
            lat = LatencyModel.from_design_numbers()
        elif isinstance(latency, str) and latency == "auto":
            lat = load_calibrated(geometry_of(cfg, dtype))  # missing: an error naming the calibrate command
        else:
            lat = LatencyModel.load(latency)
        counts = RoutingProfile.load(profile).counts if profile is not None else None
        itemsize = resolve_dtype(dtype).itemsize
        plan = place(cfg, gpu_budget, itemsize=itemsize, policy=placement, profile=counts,
                     resident_experts=resident_experts, max_batch=max_batch, max_context=max_context,
                     staging_slots=staging_slots, cache_slots=cache_slots, seed=seed)
        size_pinned_pool(int((~plan.resident).sum()) * plan.memory.expert)  # before JAX starts, if it has not
        model, source = load(plan.resident)
        host = HostExperts.pin(source, ~plan.resident, progress=progress)
        return cls(model, host, plan, bound, lat, staging_slots, cache_slots, cpu_backend)

    def with_planner(self, planner: str, *, cpu_backend: str | None = None, staging_slots: int | None = None,
                     cache_slots: int = 0, **planner_params) -> Engine:
        """Another engine over the same weights, placement, pinned experts and GPU buffers, with another planner
        (and CPU backend): what a sweep over planners wants, since building Mixtral-8x7B's engine takes minutes
        and a second copy would not fit. The two share buffers, so run one at a time. The planner must fit the
        buffers placed: at most this engine's staging slots and the same dynamic-cache slots."""
        cpu_backend = cpu_backend or self.cpu_backend
        _check_cpu_backend(cpu_backend)
        staging_slots = self.staging_slots if staging_slots is None else staging_slots
        bound = _bind_planner(planner, planner_params, staging_slots, cache_slots)
        if staging_slots > self.staging_slots or getattr(bound, "cache_slots", 0) != self.cache_slots:
            raise InvalidInputError(
                f"planner {planner!r} needs {staging_slots} staging and {getattr(bound, 'cache_slots', 0)} cache "
                f"slots, but this engine placed {self.staging_slots} and {self.cache_slots}; build a new engine")
        other = copy.copy(self)
        other.planner, other.cpu_backend, other._trace, other._plans = bound, cpu_backend, Trace(), {}
        other._streamable = {}
        return other

    def set_pinned_activations(self, on: bool) -> None:
        """Whether the CPU lane's large activations cross PCIe through pinned memory -- the input by one DMA into
        pinned memory, the output from pinned buffers the kernel writes into (:mod:`pinned_activations`; on a
        GPU from ``PINNED_MIN_BYTES``, i.e. prefill; on a CPU-only JAX never: there is no PCIe copy to save) --
        or as numpy through pageable memory (``on=False``, the path before session 7: an ablation)."""
        gpu = self._device.platform == "gpu"
        self.pinned = PinnedActivations(self._device, PINNED_MIN_BYTES if on and gpu else None)

    @property
    def planner_prefetch(self) -> int:
        """Next-layer experts copied ahead per layer step (the planner's ``prefetch``; 0: none)."""
        return getattr(self.planner, "prefetch", 0)

    # -- the step loop ---------------------------------------------------------------------------------------
    def _resident_mix(self, layer: int, moe_in, routing: Routing) -> jax.Array:
        """The resident experts' share of the layer's MoE output (queued, not waited for)."""
        if self.placement.resident[layer].any():
            return _stack_mix(moe_in, routing, self._slot_of[layer], *self._stacks[layer])
        return self._zeros(moe_in.shape)

    def _hybrid_moe(self, layer: int, moe_in, routing: Routing, sync, predicts: bool,
                    resident: tuple[float, jax.Array] | None = None) -> tuple[jax.Array, np.ndarray]:
        """Steps 2-3 of the module docstring for one layer: plan, then run the GPU, PCIe and CPU lanes, and start
        copying the next layer's predicted experts when this step leaves the PCIe lane idle. ``sync``: the step's
        packed routing (:mod:`routing_sync`; with the next layer's predicted counts when ``predicts``);
        ``resident``: (queued at, the resident mix) when the caller queued it before the sync, else None. Returns
        the GPU lanes' sum (on the device) and the CPU lane's (float32: numpy, which the next jitted step takes as
        an argument and moves in the jit's own C++ path; or, for large outputs, a device array copied from a
        pinned buffer, :mod:`pinned_activations`)."""
        clock = self._trace.now
        t_plan = clock()
        # The step's one sync, one transfer: the routing, the predicted counts, and for small steps (decode,
        # beams) the activations too, which the CPU lane then need not fetch on its own.
        step = routing_sync.unpack(np.asarray(sync), num_experts=self.config.num_local_experts,
                                   top_k=self.config.num_experts_per_tok, moe_in_shape=moe_in.shape,
                                   moe_in_dtype=moe_in.dtype, predicted=predicts)
        counts, experts, weights, predicted = step.counts, step.experts, step.weights, step.predicted
        host_in = moe_in if step.moe_in is None else step.moe_in
        cache_before = self._cache_state(layer)
        E = len(counts)
        staged = self._pool.staged(layer, E)
        plan = self._plan(counts, layer, self._pool.left_s(layer, E) if staged.any() else None)
        lanes = plan.lanes
        spans = {"plan": (t_plan, clock())}
        on_cpu = lanes[experts] == P.Lane.CPU
        job = cpu_job = None
        if on_cpu.any():
            token, slot = np.nonzero(on_cpu)
            job = functools.partial(self._run_cpu_lane, layer, host_in, token, experts[token, slot],
                                    weights[token, slot])
            # A concurrent plan with copies hands the CPU lane to its worker thread, so the main thread can time
            # the copies; without copies every GPU call below is queued without waiting, so the main thread
            # runs the CPU lane itself after queuing them (no thread hand-off on the decode path) -- unless
            # ``cpu_lane_thread`` (FIDDLER_CPU_LANE=thread): then the kernel starts before the GPU calls are
            # queued, at the cost of two thread hand-offs.
            if plan.concurrent and (len(plan.transfer_order) or self.cache_slots or self.cpu_lane_thread):
                cpu_job = self._cpu_lane.submit(job)
        t_gpu, gpu_out = resident if resident is not None else (clock(), self._resident_mix(layer, moe_in, routing))
        for e in np.flatnonzero(plan.staged):  # prefetched copies: the mix waits for them on the device
            gpu_out = gpu_out + _expert_mix(moe_in, routing, np.int32(e), **self._pool.arrays(layer, int(e)),
                                            num_experts=E)
        order = plan.transfer_order
        if self.cache_slots:
            gpu_out, order = self._cache_lane(layer, moe_in, routing, plan, cache_before, gpu_out, spans)
        if len(order):
            if not plan.concurrent:
                gpu_out.block_until_ready()  # sequential: the GPU lane ends before the PCIe lane starts
            spans.setdefault("pcie", (clock(),) * 2)
            gpu_out = self._copy_lane(layer, moe_in, routing, order, gpu_out)
        elif self.planner_prefetch and layer + 1 < len(self._layers) and not self.placement.layer_all_resident(
                layer + 1):
            for e in P.plan_prefetch(predicted, self.placement.resident[layer + 1], self._pool.staged(layer + 1, E),
                                     self.latency, free_slots=self._pool.free(), prefetch=self.planner_prefetch,
                                     step_s=plan.predicted_s, pcie_backlog_s=self._pool.backlog_s()):
                self._pool.copy(layer + 1, int(e), ahead=True)
        if "pcie" in spans:  # wait for the copies alone (the mixes after them are the GPU lane's)
            self._pool.wait(layer)
            if self.cache_slots:
                jax.block_until_ready(self._cache[layer])
            spans["pcie"] = (spans["pcie"][0], clock())
        cpu_out = self._zeros(moe_in.shape, host=not self._pinned_path(layer, moe_in.shape))
        if job is not None and cpu_job is None and plan.concurrent:
            cpu_out, spans["cpu"] = job()  # inline: the GPU span below then ends when the main thread looks
        gpu_out.block_until_ready()
        spans["gpu"] = (t_gpu, clock())
        self._pool.release(layer)  # the GPU work reading this layer's copies is done
        if job is not None and "cpu" not in spans:
            cpu_out, spans["cpu"] = cpu_job.result() if cpu_job is not None else job()
        self._trace.add(StepRecord(layer, counts, lanes, plan.predicted_s, spans, staged, plan.staged))
        return gpu_out, cpu_out

    def _copy_lane(self, layer: int, moe_in, routing, order: np.ndarray, gpu_out):
        """The step's copies, in order, each mixed once it lands: when every slot is held, the next copy waits
        until the GPU has finished with the oldest copy of this step (double buffering with two slots)."""
        E = len(self.placement.resident[layer])
        mine: list[tuple[int, jax.Array]] = []  # (expert, GPU sum after its mix)
        for e in order.tolist():
            if self._pool.free() < 1:
                if not mine:
                    raise P.PlannerError(f"layer {layer}: the plan copies experts but prefetched copies hold all "
                                         f"{self.staging_slots} staging slots; this is an engine bug")
                oldest, done = mine.pop(0)
                done.block_until_ready()
                self._pool.release(layer, oldest)
            self._pool.copy(layer, e)
            gpu_out = gpu_out + _expert_mix(moe_in, routing, np.int32(e), **self._pool.arrays(layer, e),
                                            num_experts=E)
            mine.append((e, gpu_out))
        return gpu_out

    def _plan(self, counts: np.ndarray, layer: int, staged_s: np.ndarray | None = None) -> P.Plan:
        """The planner's plan, remembered per (layer, counts, staged copies' landing times in quarter
        milliseconds) for small steps: a planner without a dynamic cache is a pure function of them (the
        residency and latency model are fixed), and decode sees few distinct keys, so most steps skip the search
        (0.2 ms on the H100 machine's host)."""
        staged = {}
        if staged_s is not None:  # only planners that prefetch are given it
            staged = {"staged_s": np.where(np.isfinite(staged_s), np.ceil(staged_s * 4e3) / 4e3, np.inf)}
        if self.cache_slots or counts.sum() > PLAN_MEMO_TOKENS:
            return self.planner(counts, self.placement.resident[layer], self.latency, layer=layer, **staged)
        key = (layer, counts.tobytes(), staged["staged_s"].tobytes() if staged else None)
        plan = self._plans.get(key)
        if plan is None:
            if len(self._plans) >= PLAN_MEMO_SIZE:
                self._plans.clear()
            plan = self._plans[key] = self.planner(counts, self.placement.resident[layer], self.latency,
                                                    layer=layer, **staged)
        return plan

    def _pinned_path(self, layer: int, shape) -> bool:
        """Whether this layer step's CPU output goes through a pinned buffer: the kernel writes it (bfloat16
        experts, ``kernel`` backend) and it is large enough (``pinned.wants``)."""
        return (self.cpu_backend == "kernel" and self.pinned.wants(shape)
                and self.host.kernel_tables(layer) is not None)

    def _run_cpu_lane(self, layer: int, moe_in, token, expert, weight):
        """The CPU lane of one layer step (runs in the lane's worker thread): activations to the host (unless the
        step's sync brought them; large ones through pinned memory), the kernel over the pinned expert views.
        Returns the float32 output (numpy, or for large outputs a device array already on its way from a pinned
        buffer) and the lane's (start, end)."""
        start = self._trace.now()
        x = self.pinned.fetch(moe_in)
        if self.cpu_backend == "xla":
            out = xla_expert_mix(x, token, expert, weight, self.host.tables(layer))
        elif self._pinned_path(layer, moe_in.shape):
            buffer = self.pinned.take(moe_in.shape)
            cpu_expert_mix(x, token, expert, weight, self.host.tables(layer), self.host.kernel_tables(layer),
                           out=buffer.view)
            out = self.pinned.to_device(buffer)
        else:
            out = cpu_expert_mix(x, token, expert, weight, self.host.tables(layer), self.host.kernel_tables(layer))
        return out, (start, self._trace.now())

    def _cache_state(self, layer: int) -> P.CacheState | None:
        return self.planner.caches.get(layer, P.CacheState.empty(self.cache_slots)) if self.cache_slots else None

    def _cache_lane(self, layer, moe_in, routing, plan, before: P.CacheState, gpu_out, spans):
        """Dynamic-cache hits run from the layer's cache buffers; copies the new CacheState keeps are written
        into their cache slot (after the hits were dispatched, so an evicted slot is read before it is
        overwritten) and run from there. Returns the GPU sum and the copies left for the staging slots."""
        hits = np.full(len(plan.lanes), -1, np.int32)
        for slot, e in enumerate(before.experts):
            if e >= 0 and plan.cached[e]:
                hits[e] = slot
        if (hits >= 0).any():
            gpu_out = gpu_out + _buffers_mix(moe_in, routing, hits, self._cache[layer])
        after = self.planner.caches[layer]
        into_cache = [(after.experts.index(e), e) for e in plan.transfer_order.tolist() if e in after.experts]
        if into_cache:
            t_copy = self._trace.now()
            placed = np.full(len(plan.lanes), -1, np.int32)
            for slot, e in into_cache:
                self._cache[layer] = copy_into_slot(self._cache[layer], slot, self.host.arrays(layer, e))
                placed[e] = slot
            gpu_out = gpu_out + _buffers_mix(moe_in, routing, placed, self._cache[layer])
            spans["pcie"] = (t_copy, t_copy)  # the end is set when the copies have landed
        cached = {e for _, e in into_cache}
        return gpu_out, np.asarray([e for e in plan.transfer_order.tolist() if e not in cached], np.int32)

    def forward(self, tokens, cache, start: int, *, last_only: bool = False):
        """Logits [B, T, V] float32 of ``tokens`` at absolute positions start.. ([B, V] of the last position with
        ``last_only``), and the updated KV cache."""
        start = jnp.int32(start)
        self._pool.clear()  # copies left by a forward pass that raised
        self._collect_streamed()  # a streamed step's error surfaces here at the latest, its record joins the trace
        pending = (self._embed(self._embed_part.leaves, self._on_device(tokens)),)
        lookahead = self._lookahead if self.planner_prefetch else [None] * len(self._layers)
        rows = math.prod(np.shape(tokens))
        new_cache = []
        for layer, (part, (fused_layer, attention_and_router), kv) in enumerate(zip(self._layers, self._steps,
                                                                                     cache)):
            if self.placement.layer_all_resident(layer):
                x, kv = fused_layer(part.leaves, pending, kv, start)
                pending = (x,)
            elif (streamed := self._streamed_id(layer, rows)) is not None:
                # no sync: the stream runs attention, the resident mix and the CPU lane in order (streamed_steps)
                h, moe_in, routing, _, kv = attention_and_router(part.leaves, pending, kv, start, lookahead[layer])
                pending = (h, self._resident_mix(layer, moe_in, routing),
                           streamed_cpu_mix(moe_in, routing.experts, routing.weights, tables=streamed))
            else:
                h, moe_in, routing, sync, kv = attention_and_router(part.leaves, pending, kv, start, lookahead[layer])
                resident = (self._trace.now(), self._resident_mix(layer, moe_in, routing)) \
                    if self.early_resident_mix else None
                pending = (h,) + self._hybrid_moe(layer, moe_in, routing, sync, lookahead[layer] is not None,
                                                  resident)
            new_cache.append(kv)
        head_leaves = None if self._head_part is None else self._head_part.leaves
        logits = self._head(self._embed_part.leaves, self._norm_part.leaves, head_leaves, pending,
                            last_only=last_only)
        self.pinned.settle()  # the CPU lane's output copies have landed; hold no GPU memory for them between passes
        return logits, tuple(new_cache)

    def _streamed_id(self, layer: int, rows: int) -> int | None:
        """The registered tables id when this layer step of ``rows`` tokens takes the streamed CPU lane: the
        C++ kernel on bfloat16 host experts, no dynamic cache, and a plan no routing can change
        (``streamed_steps.all_cpu_for_any_routing``, asked once per (layer, rows)); else None."""
        key = (layer, rows)
        ok = self._streamable.get(key)
        if ok is None:
            resident = self.placement.resident[layer]
            ok = self._streamable[key] = (
                self.cpu_backend == "kernel" and not self.cache_slots and self._device.platform in ("cpu", "gpu")
                and self.host.kernel_tables(layer) is not None
                and all_cpu_for_any_routing(lambda counts: self._plan(counts, layer), resident, rows,
                                            self.config.num_experts_per_tok))
        if not (ok and self.streamed_cpu_lane):
            return None
        if layer not in self._streamed_ids:
            from fiddler_jax.kernels import streamed_lane

            if not self._streamed_ids:  # registrations live as long as the host experts (shared by with_planner)
                weakref.finalize(self.host, streamed_lane.unregister_layers, self._streamed_ids.values())
            self._streamed_ids[layer] = streamed_lane.register_layer(self.host.kernel_tables(layer), self._device)
        return self._streamed_ids[layer]

    def _collect_streamed(self) -> None:
        """Raise the first error of a streamed CPU-lane call, and add a trace record for each streamed call that
        has run (its counts, the plan's lanes and the CPU lane's span as the host function saw it)."""
        if not self._streamed_ids:
            return
        from fiddler_jax.kernels import streamed_lane

        streamed_lane.raise_pending_error()
        layer_of = {tid: layer for layer, tid in self._streamed_ids.items()}
        E, t0 = self.config.num_local_experts, self._trace.t0
        while True:
            records, _ = streamed_lane.drain_records(256)
            for r in records:
                layer = layer_of.get(r["tables"])
                if layer is None:
                    continue
                counts = r["counts"][:E].astype(np.int32)
                plan = self._plan(counts, layer)
                self._trace.add(StepRecord(layer, counts, plan.lanes, plan.predicted_s,
                                           {"cpu": (r["start"] - t0, r["end"] - t0)}))
            if len(records) < 256:
                return

    @property
    def trace(self) -> Trace:
        """The per-layer-step records (:mod:`trace`), with the streamed steps run so far."""
        self._collect_streamed()
        return self._trace

    def jitted_functions(self) -> dict:
        """The step loop's jitted functions by name, each once (``f._cache_size()`` counts its compiles: tests and
        the device check assert that changing plans never compile again)."""
        from fiddler_jax.runtime.host_experts import _copy_jit

        found = {"embed": self._embed, "head": self._head, "stack_mix": _stack_mix, "expert_mix": _expert_mix,
                 "copy_into_slot": _copy_jit}
        for n, steps in enumerate(dict.fromkeys(self._steps)):  # distinct layer structures, in layer order
            suffix = "" if n == 0 else f"_{n}"
            found["fused_layer" + suffix], found["attention_and_router" + suffix] = steps
        return found

    def _zeros(self, shape, *, host: bool = False):
        """Float32 zeros made once per (place, shape): arrays are immutable (the numpy one is made read-only), so
        a lane with no share reuses them instead of making a fill every step. On the device they are committed
        (see ``_on_device``); on the host they are the CPU lane's empty output, which is always numpy so the next
        step's jit sees one argument type."""
        key = (host, shape)
        if key not in self._zeros_cache:
            if host:
                zeros = np.zeros(shape, np.float32)
                zeros.flags.writeable = False
            else:
                zeros = jnp.zeros(shape, jnp.float32, device=self._device)
            self._zeros_cache[key] = zeros
        return self._zeros_cache[key]

    # -- public API ------------------------------------------------------------------------------------------
    def logits(self, input_ids) -> np.ndarray:
        """Float32 logits [B, T, vocab] of a full forward pass (same contract as ``fiddler_jax.logits``)."""
        ids = check_token_ids(self.model, input_ids)
        out, _ = self.forward(jnp.asarray(ids), self.model.init_cache(*ids.shape), 0)
        return np.asarray(out, np.float32)

    def generate(self, input_ids, max_new_tokens: int, do_sample: bool = False, seed: int = 0, *,
                 temperature: float = 1.0, top_p: float = 1.0, eos_token_id=None, num_beams: int = 1,
                 length_penalty: float = 1.0, early_stopping=False, kv_slots: int | None = None) -> np.ndarray:
        """Greedy, sampled or beam-search continuation [B, T + n] (same contract as ``fiddler_jax.generate``).
        Beam search needs num_beams × cache length within the KV reserve placed for ``max_batch`` rows."""
        ids = check_token_ids(self.model, input_ids, max_new_tokens)
        check_beam_args(num_beams, length_penalty, early_stopping, do_sample)
        if num_beams == 1:
            return self.generate_with_stats(ids, max_new_tokens, do_sample, seed, temperature=temperature,
                                            top_p=top_p, eos_token_id=eos_token_id, kv_slots=kv_slots)[0]
        if max_new_tokens == 0:
            return ids

        slots = self._kv_slots(ids.shape[1], max_new_tokens, kv_slots)
        check_kv_reserve(kv_cache_bytes(self.config, self.model.dtype.itemsize, num_beams, slots),
                         self.placement.memory.kv_cache, num_beams, slots)
        return beam_search(self._forward_last, lambda rows, n: self.model.init_cache(rows, slots), ids,
                           max_new_tokens, num_beams, eos_token_ids=self._eos(eos_token_id),
                           length_penalty=length_penalty, early_stopping=early_stopping,
                           pad_token_id=self.config.pad_token_id)

    def generate_with_stats(self, input_ids, max_new_tokens: int, do_sample: bool = False, seed: int = 0, *,
                            temperature: float = 1.0, top_p: float = 1.0, eos_token_id=None,
                            kv_slots: int | None = None):
        """Greedy or sampled continuation and its :class:`GenerationStats` (time to first token apart from the
        steady-state decode rate), like ``fiddler_jax.generate_with_stats``. ``kv_slots``: the KV-cache length
        (default: prompt + new tokens rounded up); runs of different lengths given the same value share every
        compiled shape (a short warm-up then compiles what a long run needs)."""
        ids = check_token_ids(self.model, input_ids, max_new_tokens)
        check_sampling(do_sample, temperature, top_p)
        if max_new_tokens == 0:
            return ids, GenerationStats(prompt_tokens=ids.shape[1])
        cache = self.model.init_cache(ids.shape[0], self._kv_slots(ids.shape[1], max_new_tokens, kv_slots))
        return decode_loop(self._forward_last, cache, ids, max_new_tokens, self._eos(eos_token_id),
                           do_sample=do_sample, seed=seed, temperature=temperature, top_p=top_p)

    def _on_device(self, value) -> jax.Array:
        """``value`` committed to the engine's device: the jitted steps then always see committed inputs (an
        uncommitted input made JAX compile them a second time, for the other commitment)."""
        return jax.device_put(value, self._device)

    def _kv_slots(self, prompt_len: int, max_new_tokens: int, kv_slots: int | None) -> int:
        need = cache_length(prompt_len, max_new_tokens, self.config)
        if kv_slots is None:
            return need
        if not need <= kv_slots <= self.config.max_position_embeddings:
            raise InvalidInputError(f"kv_slots={kv_slots} must hold the prompt and the new tokens ({need}) and stay "
                                    f"within max_position_embeddings ({self.config.max_position_embeddings})")
        return int(kv_slots)

    def _forward_last(self, tokens, cache, start):
        return self.forward(tokens, cache, start, last_only=True)

    def _eos(self, eos_token_id) -> tuple[int, ...]:
        return self.config.eos_token_ids if eos_token_id is None else tuple(np.atleast_1d(eos_token_id).tolist())

    def trace_summary(self) -> dict:
        """``engine.trace.summary()``: GPU-hit rate, experts and busy time per lane, idle time."""
        return self.trace.summary()
