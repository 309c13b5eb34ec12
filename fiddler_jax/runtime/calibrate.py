"""Measure this machine's lanes for one expert geometry and fit the latency model the planners decide with.

Each lane is timed through the engine's own code path, so predictions match execution:
  cpu(n)      ``lanes.cpu.cpu_expert_mix`` on n tokens all routed to one expert (the C++ grouped kernel for
              bfloat16, numpy for float32) over the pinned host views, rotating over ``experts`` experts so the
              weights come from DRAM
  gpu(n)      ``segments.stack_mix`` over a 1-row expert stack on the default device with n tokens routed
              (top-1) to it; a sample is ``experts`` calls dispatched back to back (one per stack, as the engine
              queues them) then ``block_until_ready``, divided by the number of calls: the time an expert
              occupies the GPU.
              Compilation is excluded (one warm-up call per n).
  transfer_s  one expert's three matrices from pinned host memory into GPU arrays as the engine's PCIe lane
              copies them (``lanes.pcie.StagingPool``: an eager copy), then block
  transfer_busy_s  the same copies while a thread runs the CPU lane's decode load beside them
              (``cpu_expert_mix`` on one token, rotating over the pinned experts, back to back): both lanes read
              host DRAM, and a concurrent plan's copies run beside the CPU lane's work
  sync_s      a tiny jitted op on the device plus ``np.asarray`` of its small result (the routing counts'
              round trip of a planned layer step)
Every (lane, n) row: one warm-up, then repetitions until ``min_reps`` and the row's share of ``budget_s`` are
both met (at most ``max_reps``; :func:`fiddler_jax.timing.sample`). ``PiecewiseLinear.fit`` takes the medians
and makes the curves non-decreasing.
Weights are random (:mod:`fiddler_jax.random_bits`: no model is loaded), the shapes are all that matter.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import statistics
import threading
from collections.abc import Callable, Sequence

import numpy as np

from fiddler_jax.errors import InvalidInputError
from fiddler_jax.models.quantization import (
    DEFAULT_INT4_GROUP, expert_matrix_bytes, parse_precision_tag, precision_tag,
)
from fiddler_jax.models.quantized_experts import check_model_precision
from fiddler_jax.provenance import cpu_model
from fiddler_jax.random_bits import random_bf16, random_bf16_on_device
from fiddler_jax.runtime.latency import Geometry, LatencyModel, Machine, PiecewiseLinear
from fiddler_jax.timing import sample

DTYPES = ("bfloat16", "float32")
DEFAULT_NS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
DEFAULT_BUDGET_S = 20.0
MIN_REPS, MAX_REPS, SYNC_REPS = 3, 50, 200


@dataclasses.dataclass(frozen=True)
class Measurements:
    """Raw timings in seconds: per lane the token count of every sample and its time; copies and syncs."""

    cpu: tuple[tuple[int, ...], tuple[float, ...]]
    gpu: tuple[tuple[int, ...], tuple[float, ...]]
    transfer: tuple[float, ...]
    transfer_busy: tuple[float, ...]
    sync: tuple[float, ...]

    def curves(self) -> dict[str, tuple[tuple[int, ...], tuple[float, ...]]]:
        """The n-dependent lanes, as ``latency.plot`` takes them."""
        return {"cpu": self.cpu, "gpu": self.gpu}

    def to_dict(self) -> dict:
        return {"cpu": {"n": list(self.cpu[0]), "s": list(self.cpu[1])},
                "gpu": {"n": list(self.gpu[0]), "s": list(self.gpu[1])},
                "transfer_s": list(self.transfer), "transfer_busy_s": list(self.transfer_busy),
                "sync_s": list(self.sync)}


def machine_identity(device=None) -> Machine:
    """This machine as a latency model records it: CPU model name with the CPUs this process may use (the CPU
    lane's speed depends on both), and the JAX device kind of ``device`` (default: the first device, the
    engine's "GPU")."""
    import jax

    device = jax.devices()[0] if device is None else device
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return Machine(cpu=f"{cpu_model()} ({cpus} CPUs)", gpu=str(device.device_kind))


def check_args(hidden, ffn, dtype, ns, experts, budget_s, expert_precision: str = "bf16",
               int4_group: int = DEFAULT_INT4_GROUP) -> tuple[Geometry, tuple[int, ...]]:
    """The geometry and sorted distinct token counts, or one InvalidInputError naming what is wrong."""
    if dtype not in DTYPES:
        raise InvalidInputError(f"dtype must be one of {', '.join(DTYPES)} (the engine's expert dtypes); got {dtype!r}")
    for name, value in (("hidden", hidden), ("ffn", ffn), ("experts", experts)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise InvalidInputError(f"{name} must be a positive integer; got {value!r}")
    ns = list(ns) if isinstance(ns, Sequence) and not isinstance(ns, str) else [ns]
    bad = [n for n in ns if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1]
    if not ns or bad:
        raise InvalidInputError(f"ns must be a non-empty list of positive token counts; got {ns!r}")
    if not (isinstance(budget_s, (int, float)) and np.isfinite(budget_s) and budget_s > 0):
        raise InvalidInputError(f"budget_s must be a positive number of seconds; got {budget_s!r}")
    check_model_precision(int(hidden), int(ffn), expert_precision, int4_group)
    return (Geometry(int(hidden), int(ffn), dtype, precision_tag(expert_precision, int4_group)),
            tuple(sorted({int(n) for n in ns})))


def host_weights(geometry: Geometry, experts: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Random host expert stacks {w1, w3: [E, ffn, hidden], w2: [E, hidden, ffn]} in the geometry's dtype.
    bfloat16 from random bits (``random_bits.random_bf16``: finite, |w| in [2^-7, 2^-6)), fast at GB size."""
    rng = np.random.default_rng(seed)
    h, f = geometry.hidden, geometry.ffn
    shapes = {"w1": (experts, f, h), "w3": (experts, f, h), "w2": (experts, h, f)}
    if geometry.dtype == "float32":
        return {k: rng.standard_normal(s, dtype=np.float32) * np.float32(0.02) for k, s in shapes.items()}
    return {k: random_bf16(rng, s) for k, s in shapes.items()}


def np_dtype(dtype: str) -> np.dtype:
    import ml_dtypes
    return np.dtype(ml_dtypes.bfloat16 if dtype == "bfloat16" else dtype)


def _inputs(geometry: Geometry, n: int, seed: int) -> np.ndarray:
    """Activations [n, hidden] in the geometry's dtype (the engine's ``moe_in``)."""
    x = np.random.default_rng(seed).standard_normal((n, geometry.hidden), dtype=np.float32)
    return x.astype(np_dtype(geometry.dtype))


def pinned_experts(geometry: Geometry, experts: int, seed: int = 0):
    """``experts`` random experts held as the engine holds offloaded ones (layer 0 of a ``HostExperts``)."""
    from fiddler_jax.runtime.host_experts import HostExperts

    stacks = host_weights(geometry, experts, seed)
    precision, group = parse_precision_tag(geometry.precision)
    return HostExperts.pin(lambda _, e: {k: v[e] for k, v in stacks.items()}, np.ones((1, experts), bool),
                           progress=False, precision=precision, group=group)


def one_expert_calls(geometry: Geometry, n: int, experts: int):
    """The arguments of ``cpu_expert_mix`` for n tokens all routed to one expert: activations [n, hidden],
    token rows (as ``np.nonzero`` gives them in the engine), weights, and per expert e < ``experts`` the expert
    column that routes every token to e."""
    return (_inputs(geometry, n, seed=n), np.arange(n, dtype=np.int64), np.ones(n, np.float32),
            [np.full(n, e, np.int32) for e in range(experts)])


def measure_cpu(geometry: Geometry, ns: Sequence[int], host, row_budget_s: float,
                progress: Callable[[str], None] | None = None) -> tuple[list[int], list[float]]:
    """``cpu_expert_mix`` with n tokens on one expert, the expert rotating over the pinned host experts."""
    from fiddler_jax.runtime.lanes.cpu import cpu_expert_mix

    experts = host.held.shape[1]
    tables = host.tables(0)
    cycle = iter(range(1 << 62))
    out_n, out_s = [], []
    for n in ns:
        x, token, weight, expert_of = one_expert_calls(geometry, n, experts)
        times = sample(lambda: cpu_expert_mix(x, token, expert_of[next(cycle) % experts], weight, tables),
                       row_budget_s, MIN_REPS, MAX_REPS)
        out_n += [n] * len(times)
        out_s += times
        _report(progress, "cpu", n, times)
    return out_n, out_s


def device_weights(geometry: Geometry, experts: int, seed: int = 0):
    """``experts`` random 1-row stacks (w1, w3, w2) made on the default device (no host copies)."""
    import jax
    import jax.numpy as jnp

    h, f = geometry.hidden, geometry.ffn

    @jax.jit
    def make(key):
        def one(k, shape):
            if geometry.dtype == "float32":
                return jax.random.normal(k, shape, jnp.float32) * 0.02
            return random_bf16_on_device(k, shape)

        k1, k3, k2 = jax.random.split(key, 3)
        return one(k1, (1, f, h)), one(k3, (1, f, h)), one(k2, (1, h, f))

    return [make(k) for k in jax.random.split(jax.random.key(seed), experts)]


def measure_gpu(geometry: Geometry, ns: Sequence[int], experts: int, row_budget_s: float,
                progress: Callable[[str], None] | None = None) -> tuple[list[int], list[float]]:
    """``stack_mix`` on a 1-row stack: ``experts`` calls back to back, block, divide (module docstring)."""
    import jax
    import jax.numpy as jnp

    from fiddler_jax.models.moe import Routing
    from fiddler_jax.runtime.segments import stack_mix

    stacks = device_weights(geometry, experts)
    slot_of = jnp.zeros(1, jnp.int32)
    out_n, out_s = [], []
    for n in ns:
        x = jnp.asarray(_inputs(geometry, n, seed=n))
        routing = Routing(jnp.ones((n, 1), jnp.float32), jnp.zeros((n, 1), jnp.int32))

        def run():
            outs = [stack_mix(x, routing, slot_of, *w) for w in stacks]
            jax.block_until_ready(outs)

        times = [t / experts for t in sample(run, row_budget_s, MIN_REPS, MAX_REPS)]
        out_n += [n] * len(times)
        out_s += times
        _report(progress, "gpu", n, times)
    return out_n, out_s


def measure_transfer(geometry: Geometry, host, row_budget_s: float,
                     progress: Callable[[str], None] | None = None, *, beside_cpu: bool = False) -> list[float]:
    """One expert from pinned host memory into GPU arrays exactly as the engine's PCIe lane copies it
    (``lanes.pcie.StagingPool.copy``, one slot), then block and free it. ``beside_cpu``: while another thread runs
    the CPU lane's one-token calls back to back over the same pinned experts (:func:`cpu_load`)."""
    import jax

    from fiddler_jax.runtime.lanes.pcie import StagingPool

    experts = host.held.shape[1]
    pool = StagingPool(host, jax.devices()[0], 1, 0.0)
    cycle = iter(range(1 << 62))

    def copy():
        e = next(cycle) % experts
        pool.copy(0, e)
        pool.wait(0)
        pool.release(0)

    with cpu_load(geometry, host) if beside_cpu else contextlib.nullcontext():
        times = sample(copy, row_budget_s, MIN_REPS, MAX_REPS)
    _report(progress, "transfer+cpu" if beside_cpu else "transfer", None, times)
    return times


@contextlib.contextmanager
def cpu_load(geometry: Geometry, host):
    """A thread running ``cpu_expert_mix`` on one token, rotating over ``host``'s experts, back to back until the
    block ends (the CPU lane's decode load: it streams expert weights from host DRAM). An error in the thread
    is raised when the block ends."""
    from fiddler_jax.runtime.lanes.cpu import cpu_expert_mix

    experts = host.held.shape[1]
    tables = host.tables(0)
    x, token, weight, expert_of = one_expert_calls(geometry, 1, experts)
    stop, failed = threading.Event(), []

    def run():
        calls = 0
        try:
            while not stop.is_set():
                cpu_expert_mix(x, token, expert_of[calls % experts], weight, tables)
                calls += 1
        except BaseException as e:  # noqa: BLE001 - re-raised in the caller's thread
            failed.append(e)

    thread = threading.Thread(target=run, name="calibrate-cpu-load", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
    if failed:
        raise failed[0]


def measure_sync(row_budget_s: float, progress: Callable[[str], None] | None = None) -> list[float]:
    """A tiny jitted op (the routing counts) and ``np.asarray`` of its result: a planned step's host round trip."""
    import jax
    import jax.numpy as jnp

    counts = jax.jit(lambda e: jnp.bincount(e.reshape(-1), length=8))
    experts = jnp.array([[1, 5]], jnp.int32)
    times = sample(lambda: np.asarray(counts(experts)), row_budget_s, min_reps=20, max_reps=SYNC_REPS)
    _report(progress, "sync", None, times)
    return times


def _report(progress, lane: str, n: int | None, times: list[float]) -> None:
    if progress is not None:
        where = f"n={n:<4d}" if n is not None else "      "
        progress(f"  {lane:8s} {where} {statistics.median(times) * 1e3:9.4f} ms  (median of {len(times)})")


def calibrate(hidden: int, ffn: int, dtype: str = "bfloat16", ns: Sequence[int] = DEFAULT_NS, experts: int = 4,
              budget_s: float = DEFAULT_BUDGET_S, progress: bool | Callable[[str], None] = True,
              expert_precision: str = "bf16",
              int4_group: int = DEFAULT_INT4_GROUP) -> tuple[LatencyModel, Measurements]:
    """Measure the lanes on this machine for one expert of (hidden, ffn, dtype) and fit the latency model.
    ``expert_precision`` / ``int4_group``: how the offloaded experts are held (the CPU lane reads, and the PCIe
    lane copies, that format). The GPU's curve is measured on bf16 weights at every precision: a copied expert
    runs from the bf16 staging stack, while resident quantised experts (which the planner never moves) run
    their own dequantising product, not modelled here.

    ``ns`` are the token counts timed (the curves' knots), ``experts`` the number of distinct random experts the
    timed calls rotate over, ``budget_s`` the timing seconds shared out over all rows (each row still gets at
    least a few repetitions; setup and compilation come on top). Returns the model, with this machine and the
    geometry as provenance, and the raw measurements."""
    geometry, ns = check_args(hidden, ffn, dtype, ns, experts, budget_s, expert_precision, int4_group)
    import jax

    say = progress if callable(progress) else (lambda line: print(line, flush=True)) if progress else None
    row_budget = budget_s / (2 * len(ns) + 3)
    machine = machine_identity()
    if say:
        nbytes = sum(expert_matrix_bytes(*shape, expert_precision, int4_group, np_dtype(geometry.dtype).itemsize)
                     for shape in ((ffn, hidden), (ffn, hidden), (hidden, ffn)))
        say(f"calibrating {geometry} (one expert = {nbytes / 1e6:.1f} MB) on {machine.cpu} + {machine.gpu} "
            f"({jax.devices()[0].platform}); {experts} experts rotated, ~{budget_s:g} s of timing")
    host = pinned_experts(geometry, experts)
    cpu = measure_cpu(geometry, ns, host, row_budget, say)
    gpu = measure_gpu(geometry, ns, experts, row_budget, say)
    transfer = measure_transfer(geometry, host, row_budget, say)
    transfer_busy = measure_transfer(geometry, host, row_budget, say, beside_cpu=True)
    sync = measure_sync(row_budget, say)
    model = LatencyModel(cpu=PiecewiseLinear.fit(*cpu), gpu=PiecewiseLinear.fit(*gpu),
                         transfer_s=statistics.median(transfer), transfer_busy_s=statistics.median(transfer_busy),
                         sync_s=statistics.median(sync), machine=machine, geometry=geometry)
    measurements = Measurements(cpu=(tuple(cpu[0]), tuple(cpu[1])), gpu=(tuple(gpu[0]), tuple(gpu[1])),
                                transfer=tuple(transfer), transfer_busy=tuple(transfer_busy), sync=tuple(sync))
    return model, measurements


def table(model: LatencyModel, measurements: Measurements) -> str:
    """Per lane and n: the measured median, the fitted value and the sample count; then copy and sync."""
    lines = [f"latency model for {model.geometry} on {model.machine.cpu} + {model.machine.gpu}",
             f"{'lane':9s}{'n':>6s}{'measured ms':>14s}{'fit ms':>11s}{'reps':>6s}"]
    for lane, (ns, secs) in measurements.curves().items():
        ns_arr, s_arr = np.asarray(ns), np.asarray(secs)
        for n in np.unique(ns_arr):
            rows = s_arr[ns_arr == n]
            lines.append(f"{lane:9s}{int(n):6d}{np.median(rows) * 1e3:14.4f}{getattr(model, lane)(n) * 1e3:11.4f}"
                         f"{rows.size:6d}")
    lines.append(f"{'transfer':9s}{'':6s}{model.transfer_s * 1e3:14.4f}{'':11s}{len(measurements.transfer):6d}"
                 "   (one expert host -> GPU)")
    lines.append(f"{'copy+cpu':9s}{'':6s}{model.copy_beside_cpu_s * 1e3:14.4f}{'':11s}"
                 f"{len(measurements.transfer_busy):6d}   (the same copy beside the CPU lane's work)")
    lines.append(f"{'sync':9s}{'':6s}{model.sync_s * 1e3:14.4f}{'':11s}{len(measurements.sync):6d}"
                 "   (layer-step host round trip)")
    return "\n".join(lines)


def geometry_of(config, dtype, expert_precision: str = "bf16", int4_group: int = DEFAULT_INT4_GROUP) -> Geometry:
    """The expert geometry of a ``ModelConfig`` run in ``dtype`` (a name or a numpy/jax dtype) with its offloaded
    experts held at ``expert_precision``."""
    from fiddler_jax.models.checkpoint import resolve_dtype

    return Geometry(hidden=config.hidden_size, ffn=config.moe_intermediate_size, dtype=resolve_dtype(dtype).name,
                    precision=precision_tag(expert_precision, int4_group))


def load_calibrated(geometry: Geometry, root: str | os.PathLike | None = None) -> LatencyModel:
    """This machine's saved calibration for ``geometry`` (``latency.default_path``), or a LatencyModelError that
    says how to create it."""
    from fiddler_jax.runtime.latency import LatencyModelError, default_path

    machine = machine_identity()
    path = default_path(machine, geometry, root)
    if not os.path.isfile(path):
        raise LatencyModelError(
            f"no latency model calibrated on this machine ({machine.cpu} + {machine.gpu}) for {geometry}: expected "
            f"{path}. Create it (about a minute) with `fiddler-jax calibrate model.path=<the model folder> "
            f"model.dtype={geometry.dtype}`, or pass latency=None (the H100 machine's design numbers) or latency=<a JSON file>")
    return LatencyModel.load(path, expect_machine=machine, expect_geometry=geometry)
