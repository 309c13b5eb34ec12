"""The latency model the planners decide with: how long one expert takes on each lane, fitted from measurements.

Five numbers per machine and model geometry, measured on the machine the engine runs on:
  cpu(n)           one expert FFN with n tokens on the CPU lane (our kernel)          piecewise linear in n
  gpu(n)           one expert FFN with n tokens on the GPU                            piecewise linear in n
  transfer_s       copying one expert's weights host -> GPU (pinned, one staging slot)  constant
  transfer_busy_s  the same copy while the CPU lane reads other experts: the two lanes  constant
                   share host DRAM, so a copy beside CPU work is slower than one alone
  sync_s           the host round trip of one layer step (routing counts to the host)   constant

Fit (``PiecewiseLinear.fit``): repeated timings per token count n -> the median per n (robust to a noisy shared
machine) -> isotonic regression (pool adjacent violators) so the curve never decreases, since an expert never
gets faster with more tokens. The distinct n are the knots. Evaluation interpolates linearly between knots,
extrapolates beyond the last knot with the last segment's slope and holds the first knot's value below it.

File format (``LatencyModel.save``/``load``): one JSON object, ``format`` = 2, with the two curves as knot lists,
the three constants (``transfer_busy_s`` null where it was not measured: the copy alone stands in for it)
and the provenance -- machine (CPU model, GPU name), geometry (hidden, ffn, dtype) and creation time. A file
measured on another machine or for another geometry is refused: decisions made with it would be wrong.
Measuring (the lanes) lives elsewhere; this module is pure Python + numpy.
"""
from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import os
from collections.abc import Mapping, Sequence

import numpy as np

from fiddler_jax.errors import InvalidInputError

FORMAT_VERSION = 2  # 1: no transfer_busy_s
RECALIBRATE = "recalibrate on this machine: `fiddler-jax calibrate`"


class LatencyModelError(InvalidInputError):
    """A latency-model file that is missing, unreadable, or measured for another machine or model geometry."""


@dataclasses.dataclass(frozen=True)
class PiecewiseLinear:
    """Seconds as a function of token count: straight segments between ``knots`` (ascending token counts)."""

    knots: tuple[float, ...]
    seconds: tuple[float, ...]

    def __post_init__(self):
        knots = np.asarray(self.knots, dtype=np.float64)
        seconds = np.asarray(self.seconds, dtype=np.float64)
        if knots.ndim != 1 or knots.shape != seconds.shape or knots.size == 0:
            raise InvalidInputError(f"PiecewiseLinear needs equally many knots and seconds (at least one); got "
                                    f"{knots.size} knots and {seconds.size} seconds")
        if not (np.all(np.isfinite(knots)) and np.all(np.isfinite(seconds)) and np.all(seconds >= 0)):
            raise InvalidInputError(f"PiecewiseLinear needs finite knots and non-negative finite seconds; got "
                                    f"knots={knots.tolist()} seconds={seconds.tolist()}")
        if np.any(np.diff(knots) <= 0):
            raise InvalidInputError(f"PiecewiseLinear knots must be strictly ascending; got {knots.tolist()}")
        object.__setattr__(self, "knots", tuple(knots.tolist()))
        object.__setattr__(self, "seconds", tuple(seconds.tolist()))
        slope = (seconds[-1] - seconds[-2]) / (knots[-1] - knots[-2]) if knots.size > 1 else 0.0
        object.__setattr__(self, "_arrays", (knots, seconds, float(slope)))  # planners call this per layer step

    def __call__(self, n):
        """Seconds for n tokens: a float for a scalar n, an array of the same shape for an array of counts."""
        knots, seconds, slope = self._arrays
        n_arr = np.asarray(n, dtype=np.float64)
        out = np.interp(n_arr, knots, seconds)  # holds the end values outside [first, last]
        out = np.where(n_arr > knots[-1], seconds[-1] + slope * (n_arr - knots[-1]), out)
        return float(out) if out.ndim == 0 else out

    @classmethod
    def fit(cls, ns: Sequence[float], seconds: Sequence[float]) -> PiecewiseLinear:
        """Fit raw repeated measurements: median per distinct n, then the closest non-decreasing curve."""
        ns_arr = np.asarray(ns, dtype=np.float64).ravel()
        s_arr = np.asarray(seconds, dtype=np.float64).ravel()
        if ns_arr.size == 0 or ns_arr.shape != s_arr.shape:
            raise InvalidInputError(f"fit needs one time per token count and at least one measurement; got "
                                    f"{ns_arr.size} counts and {s_arr.size} times")
        if not (np.all(np.isfinite(s_arr)) and np.all(s_arr >= 0) and np.all(ns_arr >= 0)):
            raise InvalidInputError("fit needs non-negative token counts and finite, non-negative times; "
                                    "drop failed measurements before fitting")
        knots = np.unique(ns_arr)
        medians = np.array([np.median(s_arr[ns_arr == k]) for k in knots])
        return cls(tuple(knots.tolist()), tuple(non_decreasing(medians).tolist()))

    def to_dict(self) -> dict:
        return {"knots": list(self.knots), "seconds": list(self.seconds)}

    @classmethod
    def from_dict(cls, d: Mapping) -> PiecewiseLinear:
        return cls(tuple(d["knots"]), tuple(d["seconds"]))


def non_decreasing(values: np.ndarray) -> np.ndarray:
    """Least-squares non-decreasing fit of a sequence (pool adjacent violators, equal weights)."""
    blocks: list[list[float]] = []  # [mean, size] of pooled runs
    for v in np.asarray(values, dtype=np.float64):
        blocks.append([float(v), 1.0])
        while len(blocks) > 1 and blocks[-2][0] > blocks[-1][0]:
            (m2, w2), (m1, w1) = blocks.pop(), blocks.pop()
            blocks.append([(m1 * w1 + m2 * w2) / (w1 + w2), w1 + w2])
    return np.concatenate([np.full(int(w), m) for m, w in blocks])


@dataclasses.dataclass(frozen=True)
class Machine:
    """Where a latency model was measured: CPU model string and GPU name (as the lanes report them)."""

    cpu: str
    gpu: str


@dataclasses.dataclass(frozen=True)
class Geometry:
    """The expert shape a latency model was measured for: its size, the model's dtype and how the offloaded experts
    are held (``precision``: "bf16" unquantised, "int8", or "int4g<group>"; ``quantization.precision_tag``)."""

    hidden: int
    ffn: int
    dtype: str
    precision: str = "bf16"


MIXTRAL_8X7B_BF16 = Geometry(hidden=4096, ffn=14336, dtype="bfloat16")
DESIGN_MACHINE = Machine(cpu="Intel(R) Xeon(R) Processor, 16 cores (design numbers, not measured here)",
                         gpu="NVIDIA H100 80GB HBM3 (design numbers, not measured here)")


@dataclasses.dataclass(frozen=True)
class LatencyModel:
    """Per-lane costs of one expert, with the machine and geometry they were measured on."""

    cpu: PiecewiseLinear
    gpu: PiecewiseLinear
    transfer_s: float
    sync_s: float
    machine: Machine
    geometry: Geometry
    created: str = dataclasses.field(
        default_factory=lambda: datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))
    transfer_busy_s: float | None = None  # None: the copy alone, whatever transfer_s is (no contention measured)

    def __post_init__(self):
        for name in ("transfer_s", "transfer_busy_s", "sync_s"):
            value = getattr(self, name)
            if name == "transfer_busy_s" and value is None:
                continue
            if not (isinstance(value, (int, float)) and np.isfinite(value) and value >= 0):
                raise InvalidInputError(f"LatencyModel.{name} must be a non-negative number of seconds; got {value!r}")
            object.__setattr__(self, name, float(value))

    @property
    def copy_beside_cpu_s(self) -> float:
        """One copy's seconds while the CPU lane works: ``transfer_busy_s``, or ``transfer_s`` where that is None."""
        return self.transfer_s if self.transfer_busy_s is None else self.transfer_busy_s

    def copy_s(self, cpu_busy):
        """One copy's seconds in a concurrent plan: ``copy_beside_cpu_s`` where the CPU lane has work beside it,
        else ``transfer_s`` (a bool, or a bool array for many plans at once)."""
        return np.where(cpu_busy, self.copy_beside_cpu_s, self.transfer_s) if np.ndim(cpu_busy) else (
            self.copy_beside_cpu_s if cpu_busy else self.transfer_s)

    @classmethod
    def from_design_numbers(cls) -> LatencyModel:
        """The H100 machine's design numbers (measured there on 2026-11-22) for one Mixtral-8x7B bf16 expert, for tests and planning
        before calibration. CPU: 3.5 ms at n=1 (a good kernel at the streaming bar), 8 ms at n=64, 59 ms at
        n=512; GPU: 0.15 ms up to n=128, 0.29 ms at n=512; copy 6.4 ms (the same beside CPU work: not measured
        then); layer-step sync 0.3 ms. Used for a smaller model it makes the decisions Mixtral would get on that
        machine (nothing is rescaled)."""
        ms = 1e-3
        return cls(cpu=PiecewiseLinear((1, 64, 512), (3.5 * ms, 8.0 * ms, 59.0 * ms)),
                   gpu=PiecewiseLinear((1, 128, 512), (0.15 * ms, 0.15 * ms, 0.29 * ms)),
                   transfer_s=6.4 * ms, sync_s=0.3 * ms, machine=DESIGN_MACHINE, geometry=MIXTRAL_8X7B_BF16,
                   created="2026-11-22T00:00:00+00:00")

    def to_dict(self) -> dict:
        return {"format": FORMAT_VERSION, "cpu": self.cpu.to_dict(), "gpu": self.gpu.to_dict(),
                "transfer_s": self.transfer_s, "transfer_busy_s": self.transfer_busy_s, "sync_s": self.sync_s,
                "machine": dataclasses.asdict(self.machine),
                "geometry": dataclasses.asdict(self.geometry), "created": self.created}

    @classmethod
    def from_dict(cls, d: Mapping) -> LatencyModel:
        found = d.get("format") if isinstance(d, Mapping) else None
        if found != FORMAT_VERSION:
            older = " (made before copies beside CPU work were measured)" if found == 1 else ""
            raise LatencyModelError(f"latency-model format {found!r} is not {FORMAT_VERSION}{older}; {RECALIBRATE}")
        return cls(cpu=PiecewiseLinear.from_dict(d["cpu"]), gpu=PiecewiseLinear.from_dict(d["gpu"]),
                   transfer_s=d["transfer_s"], transfer_busy_s=d["transfer_busy_s"], sync_s=d["sync_s"],
                   machine=Machine(**d["machine"]),
                   geometry=Geometry(**d["geometry"]), created=str(d["created"]))

    def save(self, path: str | os.PathLike) -> None:
        """Write the model as JSON (atomically: a reader never sees half a file)."""
        path = os.fspath(path)
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        tmp = f"{path}.tmp{os.getpid()}"
        with open(tmp, "w") as f:
            json.dump(self.to_dict(), f, indent=1)
            f.write("\n")
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str | os.PathLike, expect_machine: Machine | None = None,
             expect_geometry: Geometry | None = None) -> LatencyModel:
        """Read a saved model; refuse it if it was measured for another machine or geometry than expected."""
        path = os.fspath(path)
        try:
            with open(path) as f:
                data = json.load(f)
            if isinstance(data, Mapping) and "counts" in data and "model_fingerprint" in data:
                raise LatencyModelError(f"{path} is a routing profile (from `fiddler-jax profile`), not a latency "
                                        "model: pass it as profile=, and as latency= 'auto' or a file from "
                                        "`fiddler-jax calibrate`")
            if not isinstance(data, Mapping) or "cpu" not in data:
                raise LatencyModelError(f"{path} is not a latency model (a JSON object with the lanes' curves); "
                                        "pass latency=auto or a file from `fiddler-jax calibrate`")
            try:
                model = cls.from_dict(data)
            except LatencyModelError as e:  # another format
                raise LatencyModelError(f"{path}: {e}") from None
        except LatencyModelError:
            raise
        except FileNotFoundError:
            raise LatencyModelError(f"no latency model at {path}; {RECALIBRATE}") from None
        except (OSError, ValueError, KeyError, TypeError) as e:  # JSONDecodeError and InvalidInputError are ValueError
            raise LatencyModelError(f"latency model {path} is unreadable or corrupt ({type(e).__name__}: {e}); "
                                    f"delete it and {RECALIBRATE}") from None
        for what, found, expected in (("machine", model.machine, expect_machine),
                                      ("geometry", model.geometry, expect_geometry)):
            if expected is not None and found != expected:
                raise LatencyModelError(f"latency model {path} was measured for {what} {found}, but this run has "
                                        f"{what} {expected}; {RECALIBRATE}")
        return model


def default_path(machine: Machine, geometry: Geometry, root: str | os.PathLike | None = None) -> str:
    """Where a calibration for this machine and geometry is kept: ``root`` (default ``$XDG_CACHE_HOME`` or
    ``~/.cache``, then ``fiddler-jax/latency``) / ``latency_v<format>_<hidden>x<ffn>_<dtype>[_<precision>]_<machine
    hash>.json`` (the precision named when it is not bf16; the format named so that a release reading another
    format never finds this file, nor this one its)."""
    if root is None:
        cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        root = os.path.join(cache, "fiddler-jax", "latency")
    machine_hash = hashlib.sha1(f"{machine.cpu}\n{machine.gpu}".encode()).hexdigest()[:10]
    precision = "" if geometry.precision == "bf16" else f"_{geometry.precision}"
    name = (f"latency_v{FORMAT_VERSION}_{geometry.hidden}x{geometry.ffn}_{geometry.dtype}{precision}_"
            f"{machine_hash}.json")
    return os.path.join(os.fspath(root), name)


def plot(measurements: Mapping[str, tuple[Sequence[float], Sequence[float]]], path: str | os.PathLike,
         model: LatencyModel | None = None) -> None:
    """Draw raw measurements (lane name -> (token counts, seconds), e.g. "cpu", "gpu") against the fitted curves
    -- the model's curve for that lane when ``model`` has one, else a fresh ``PiecewiseLinear.fit`` -- and
    save a PNG. ``model``'s transfer and sync times appear as horizontal reference lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(measurements), figsize=(5 * len(measurements), 4), squeeze=False)
    for ax, (lane, (ns, seconds)) in zip(axes[0], measurements.items()):
        curve = getattr(model, lane, None) if model is not None else None
        curve = curve if isinstance(curve, PiecewiseLinear) else PiecewiseLinear.fit(ns, seconds)
        ax.scatter(ns, np.asarray(seconds) * 1e3, s=10, alpha=0.5, label="measured")
        grid = np.geomspace(max(min(ns), 1), max(ns) * 1.5, 200)
        ax.plot(grid, curve(grid) * 1e3, color="C1", label="fit")
        if model is not None:
            ax.axhline(model.transfer_s * 1e3, color="C2", ls="--", label="copy one expert")
            ax.axhline(model.copy_beside_cpu_s * 1e3, color="C2", ls="-.", label="copy beside CPU work")
            ax.axhline(model.sync_s * 1e3, color="C3", ls=":", label="layer-step sync")
        ax.set(xscale="log", xlabel="tokens per expert", ylabel="ms", title=f"{lane} lane: one expert")
        ax.legend()
    fig.tight_layout()
    fig.savefig(os.fspath(path), dpi=100)
    plt.close(fig)
