"""Calibration on this machine: the fitted curves' shape and provenance, agreement with a fresh measurement (a
factor-of-2 check, noise-tolerant), the ``fiddler-jax calibrate`` app's files, and the refusals."""
from __future__ import annotations

import os
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from fiddler_jax.errors import InvalidInputError
from fiddler_jax.runtime.calibrate import (
    calibrate, load_calibrated, machine_identity, measure_cpu, pinned_experts,
)
from fiddler_jax.runtime.latency import Geometry, LatencyModel, LatencyModelError, default_path

# Big enough that one expert call (~0.7 ms at n=1 here) dwarfs the kernel pool's wake-up (~0.1 ms on a 2-core VM):
# at 128 x 256 a call is ~0.1 ms and its time is bimodal (workers spinning or asleep), so a 2x check was a coin flip.
GEOMETRY = Geometry(hidden=1024, ffn=2048, dtype="bfloat16")
NS = (1, 8, 64)


@pytest.fixture(scope="module")
def calibrated():
    return calibrate(GEOMETRY.hidden, GEOMETRY.ffn, GEOMETRY.dtype, ns=NS, experts=2, budget_s=1.0, progress=False)


def test_curves_are_positive_non_decreasing_and_record_this_machine(calibrated):
    model, measurements = calibrated
    for lane in ("cpu", "gpu"):
        curve = getattr(model, lane)
        assert curve.knots == NS
        assert all(s > 0 for s in curve.seconds) and np.all(np.diff(curve.seconds) >= 0), (lane, curve)
        ns, secs = measurements.curves()[lane]
        assert all(ns.count(n) >= 3 for n in NS) and len(ns) == len(secs)
    assert model.transfer_s > 0 and model.sync_s > 0
    # the copy beside the CPU lane is its own measurement, not the copy alone standing in for it
    assert model.transfer_busy_s is not None and model.transfer_busy_s > 0 and len(measurements.transfer_busy) >= 3
    assert model.transfer_busy_s == np.median(measurements.transfer_busy)
    assert model.machine == machine_identity() and model.geometry == GEOMETRY


def test_cpu_load_runs_the_cpu_lane_until_the_block_ends_and_raises_its_error(monkeypatch):
    from fiddler_jax.runtime import calibrate as C
    from fiddler_jax.runtime.lanes import cpu as cpu_lane

    host = pinned_experts(Geometry(64, 96, "bfloat16"), 2)
    calls = []
    real = cpu_lane.cpu_expert_mix

    def counting(x, token, expert, weight, tables):
        calls.append(int(expert[0]))
        return real(x, token, expert, weight, tables)

    monkeypatch.setattr(cpu_lane, "cpu_expert_mix", counting)
    deadline = time.monotonic() + 30
    with C.cpu_load(Geometry(64, 96, "bfloat16"), host):
        while len(calls) < 4 and time.monotonic() < deadline:
            time.sleep(0.001)
    done = len(calls)
    assert done >= 4 and set(calls[:4]) == {0, 1}  # rotates over the pinned experts
    time.sleep(0.05)
    assert len(calls) == done  # the thread stopped with the block

    raised = threading.Event()

    def failing(*args):
        raised.set()
        raise RuntimeError("kernel refused")

    monkeypatch.setattr(cpu_lane, "cpu_expert_mix", failing)
    with pytest.raises(RuntimeError, match="kernel refused"):
        with C.cpu_load(Geometry(64, 96, "bfloat16"), host):
            assert raised.wait(30)


def test_cpu_prediction_agrees_with_a_fresh_measurement(calibrated):
    """The shared CI machine's speed drifts, so each token count gets a few re-measurements to land within 2x."""
    model, _ = calibrated
    host = pinned_experts(GEOMETRY, 2, seed=1)
    ratios: dict[int, list[float]] = {n: [] for n in NS}
    for _ in range(4):
        ns, secs = map(np.asarray, measure_cpu(GEOMETRY, NS, host, row_budget_s=0.2))
        for n in NS:
            ratios[n].append(float(np.median(secs[ns == n]) / model.cpu(n)))
        if all(any(0.5 <= r <= 2.0 for r in rs) for rs in ratios.values()):
            return
    pytest.fail(f"fresh CPU-lane medians / predictions never inside [0.5, 2] for some n: {ratios}")


def test_float32_calibrates_the_numpy_lane():
    model, _ = calibrate(64, 96, "float32", ns=(1, 4), experts=2, budget_s=0.2, progress=False)
    assert model.geometry == Geometry(64, 96, "float32") and min(model.cpu.seconds) > 0


def test_load_calibrated_finds_the_default_path_or_says_how_to_create_it(calibrated, tmp_path):
    model, _ = calibrated
    with pytest.raises(LatencyModelError, match="fiddler-jax calibrate"):
        load_calibrated(GEOMETRY, root=tmp_path)
    model.save(default_path(machine_identity(), GEOMETRY, root=tmp_path))
    assert load_calibrated(GEOMETRY, root=tmp_path) == model


@pytest.mark.parametrize("kwargs, message", [
    (dict(dtype="float16"), "dtype must be one of bfloat16, float32"),
    (dict(ns=(0, 4)), "ns must be a non-empty list of positive token counts"),
    (dict(ns=()), "ns must be a non-empty list"),
    (dict(experts=0), "experts must be a positive integer"),
    (dict(budget_s=-1.0), "budget_s must be a positive number"),
])
def test_bad_arguments_are_refused_before_measuring(kwargs, message):
    with pytest.raises(InvalidInputError, match=message):
        calibrate(64, 96, **{"progress": False, **kwargs})


def cli(*args, cwd, cache):
    env = dict(os.environ, JAX_PLATFORMS="cpu", XDG_CACHE_HOME=str(cache))
    return subprocess.run([sys.executable, "-m", "fiddler_jax.cli", "calibrate", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def test_cli_writes_a_loadable_json_and_a_plot(tmp_path):
    import jax

    from fiddler_jax.assets import default_model_path
    from fiddler_jax.models.config import ModelConfig

    run_dir = tmp_path / "run"
    r = cli("ns=[1,4]", "experts=2", "budget_s=0.5", f"hydra.run.dir={run_dir}", cwd=tmp_path, cache=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.rstrip().splitlines()[-1].startswith("sync"), r.stdout  # the table comes last
    config = ModelConfig.from_pretrained(default_model_path())
    geometry = Geometry(config.hidden_size, config.intermediate_size, "bfloat16")
    machine = machine_identity(jax.devices("cpu")[0])
    path = default_path(machine, geometry, root=tmp_path / "fiddler-jax" / "latency")
    model = LatencyModel.load(path, expect_machine=machine, expect_geometry=geometry)
    assert model.cpu.knots == (1, 4)
    assert (run_dir / "latency.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(LatencyModelError, match="measured for geometry"):
        LatencyModel.load(path, expect_geometry=Geometry(4096, 14336, "bfloat16"))


@pytest.mark.parametrize("args, message", [
    (["model.dtype=float16"], "dtype must be one of bfloat16, float32"),
    (["geometry.hidden=0", "geometry.ffn=64"], "hidden must be a positive integer"),
])
def test_cli_bad_input_gives_one_clear_line(tmp_path, args, message):
    r = cli(*args, f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path, cache=tmp_path)
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert f"error: {message}" in r.stderr and "Traceback" not in r.stderr, r.stderr
