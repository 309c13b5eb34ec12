"""The latency model: piecewise-linear evaluation and fit, the JSON file and its refusals, the design-number preset."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from fiddler_jax.errors import InvalidInputError
from fiddler_jax.runtime.latency import (
    Geometry, LatencyModel, LatencyModelError, Machine, PiecewiseLinear, default_path, non_decreasing, plot,
)

MS = 1e-3


def test_evaluation_interpolates_holds_below_and_extrapolates_with_last_slope():
    f = PiecewiseLinear((1, 3, 5), (1.0, 2.0, 6.0))
    assert f(2) == pytest.approx(1.5)
    assert f(4) == pytest.approx(4.0)
    assert f(0) == 1.0 and f(-10) == 1.0  # first knot's value below it
    assert f(7) == pytest.approx(10.0)  # last segment's slope is 2
    assert isinstance(f(2), float)
    out = f(np.array([[0, 1], [4, 7]]))
    assert out.shape == (2, 2)
    np.testing.assert_allclose(out, [[1.0, 1.0], [4.0, 10.0]])


def test_single_knot_is_constant():
    f = PiecewiseLinear((8,), (0.5,))
    np.testing.assert_allclose(f(np.array([0, 8, 1000])), 0.5)


@pytest.mark.parametrize("knots, seconds", [((1, 1), (0.1, 0.2)), ((2, 1), (0.1, 0.2)), ((1, 2), (0.1,)),
                                            ((), ()), ((1, 2), (0.1, -0.2)), ((1, 2), (0.1, float("nan")))])
def test_bad_curves_are_refused(knots, seconds):
    with pytest.raises(InvalidInputError):
        PiecewiseLinear(knots, seconds)


def test_non_decreasing_is_the_pool_adjacent_violators_fit():
    np.testing.assert_allclose(non_decreasing(np.array([1.0, 3.0, 2.0, 4.0])), [1.0, 2.5, 2.5, 4.0])
    np.testing.assert_allclose(non_decreasing(np.array([5.0, 1.0, 0.0])), [2.0, 2.0, 2.0])
    np.testing.assert_allclose(non_decreasing(np.array([1.0, 2.0])), [1.0, 2.0])


def test_fit_takes_medians_and_is_monotone():
    rng = np.random.default_rng(0)
    ns = np.repeat([1, 2, 4, 8, 16, 64, 256], 7)
    true = 3e-3 + 1e-4 * ns
    seconds = true * (1 + 0.05 * rng.standard_normal(ns.size))
    seconds[::7] *= 20  # one wild outlier per n: the median ignores it
    f = PiecewiseLinear.fit(ns, seconds)
    assert f.knots == (1, 2, 4, 8, 16, 64, 256)
    assert np.all(np.diff(f.seconds) >= 0)
    np.testing.assert_allclose(f(np.array(f.knots)), 3e-3 + 1e-4 * np.array(f.knots), rtol=0.1)


def test_fit_of_a_dip_is_flattened_and_extrapolates_beyond_the_last_knot():
    f = PiecewiseLinear.fit([1, 1, 2, 2, 4, 8], [4.0, 4.2, 3.0, 3.2, 5.0, 7.0])  # medians 4.1, 3.1, 5, 7
    assert f.seconds == pytest.approx((3.6, 3.6, 5.0, 7.0))
    assert f(16) == pytest.approx(7.0 + 8 * 0.5)
    grid = np.arange(0, 40)
    assert np.all(np.diff(f(grid)) >= 0)


def test_fit_refuses_bad_measurements():
    with pytest.raises(InvalidInputError):
        PiecewiseLinear.fit([], [])
    with pytest.raises(InvalidInputError):
        PiecewiseLinear.fit([1, 2], [0.1, float("inf")])


def test_design_preset_has_the_design_numbers():
    lat = LatencyModel.from_design_numbers()
    assert lat.cpu(1) == pytest.approx(3.5 * MS) and lat.cpu(512) == pytest.approx(59 * MS)
    assert lat.gpu(1) == pytest.approx(0.15 * MS) and lat.gpu(128) == pytest.approx(0.15 * MS)
    assert lat.gpu(512) == pytest.approx(0.29 * MS)
    assert lat.transfer_s == pytest.approx(6.4 * MS) and lat.sync_s == pytest.approx(0.3 * MS)
    assert lat.geometry == Geometry(4096, 14336, "bfloat16")
    # the paper's regimes: one token stays on the CPU, a long prefill copies
    assert lat.cpu(1) < lat.transfer_s + lat.gpu(1)
    assert lat.cpu(300) > lat.transfer_s + lat.gpu(300)


@pytest.fixture
def calibrated():
    return LatencyModel(cpu=PiecewiseLinear.fit([1, 1, 8, 64], [0.01, 0.012, 0.02, 0.1]),
                        gpu=PiecewiseLinear((1, 512), (1e-4, 3e-4)), transfer_s=0.006, transfer_busy_s=0.011,
                        sync_s=2e-4,
                        machine=Machine("Test CPU 9000", "Test GPU X"), geometry=Geometry(64, 128, "float32"))


def test_json_round_trip(tmp_path, calibrated):
    path = tmp_path / "sub" / "latency.json"
    calibrated.save(path)
    loaded = LatencyModel.load(path, expect_machine=calibrated.machine, expect_geometry=calibrated.geometry)
    assert loaded == calibrated
    assert json.loads(path.read_text())["format"] == 2 and loaded.transfer_busy_s == 0.011
    assert loaded.cpu(100) == calibrated.cpu(100)
    assert not [p for p in os.listdir(path.parent) if ".tmp" in p]


@pytest.mark.parametrize("field, expected", [("expect_machine", Machine("Other CPU", "Test GPU X")),
                                             ("expect_geometry", Geometry(4096, 14336, "bfloat16"))])
def test_a_file_for_another_machine_or_geometry_is_refused(tmp_path, calibrated, field, expected):
    path = tmp_path / "latency.json"
    calibrated.save(path)
    with pytest.raises(LatencyModelError) as e:
        LatencyModel.load(path, **{field: expected})
    message = str(e.value)
    found = calibrated.machine if field == "expect_machine" else calibrated.geometry
    assert str(found) in message and str(expected) in message and "fiddler-jax calibrate" in message
    assert isinstance(e.value, InvalidInputError)


@pytest.mark.parametrize("content", ["", "{not json", '{"format": 1}', '{"format": 99}', "[1, 2]",
                                     '{"format": 1, "cpu": {"knots": [2, 1], "seconds": [0, 0]}, "gpu": '
                                     '{"knots": [1], "seconds": [0]}, "transfer_s": 0, "sync_s": 0, "machine": '
                                     '{"cpu": "a", "gpu": "b"}, "geometry": {"hidden": 1, "ffn": 1, "dtype": '
                                     '"float32"}, "created": "x"}'])
def test_corrupt_and_missing_files_are_refused(tmp_path, content):
    path = tmp_path / "latency.json"
    path.write_text(content)
    with pytest.raises(LatencyModelError, match="fiddler-jax calibrate"):
        LatencyModel.load(path)
    with pytest.raises(LatencyModelError, match="no latency model"):
        LatencyModel.load(tmp_path / "missing.json")


def test_bad_constants_are_refused(calibrated):
    import dataclasses

    with pytest.raises(InvalidInputError, match="transfer_s"):
        dataclasses.replace(calibrated, transfer_s=-1.0)
    with pytest.raises(InvalidInputError, match="transfer_busy_s"):
        dataclasses.replace(calibrated, transfer_busy_s=float("nan"))


def test_a_format_1_file_is_refused_as_older_and_copies_beside_cpu_default_to_copies_alone(tmp_path, calibrated):
    import dataclasses

    data = calibrated.to_dict()
    del data["transfer_busy_s"]
    data["format"] = 1
    path = tmp_path / "old.json"
    path.write_text(json.dumps(data))
    with pytest.raises(LatencyModelError, match=r"format 1 is not 2 \(made before copies beside CPU work.*calibrate"):
        LatencyModel.load(path)
    alone = LatencyModel.from_design_numbers()
    assert alone.copy_beside_cpu_s == alone.transfer_s
    assert dataclasses.replace(alone, transfer_s=1.0).copy_s(True) == 1.0  # unmeasured: follows the copy alone
    assert calibrated.copy_s(True) == 0.011 and calibrated.copy_s(False) == 0.006
    assert calibrated.copy_s(np.array([True, False])).tolist() == [0.011, 0.006]


def test_default_path_depends_on_machine_and_geometry(tmp_path, calibrated):
    a = default_path(calibrated.machine, calibrated.geometry, root=tmp_path)
    assert a.startswith(str(tmp_path)) and a.endswith(".json") and os.path.basename(a).startswith("latency_v2_")
    assert a != default_path(Machine("x", "y"), calibrated.geometry, root=tmp_path)
    assert a != default_path(calibrated.machine, Geometry(64, 128, "bfloat16"), root=tmp_path)


def test_plot_writes_a_png(tmp_path, calibrated):
    path = tmp_path / "fit.png"
    measurements = {"cpu": ([1, 1, 8, 64], [0.01, 0.012, 0.02, 0.1]), "gpu": ([1, 512], [1e-4, 3e-4])}
    plot(measurements, path, model=calibrated)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    plot({"cpu": measurements["cpu"]}, tmp_path / "fit_only.png")  # without a model: fits the data itself
    assert (tmp_path / "fit_only.png").stat().st_size > 0


def test_latency_and_planners_import_without_jax():
    """Both modules work where JAX is missing: load them with jax blocked and the package __init__ bypassed."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    code = (
        "import sys, types\n"
        "sys.modules['jax'] = None\n"
        f"pkg = types.ModuleType('fiddler_jax'); pkg.__path__ = [{os.path.join(root, 'fiddler_jax')!r}]\n"
        "sys.modules['fiddler_jax'] = pkg\n"
        "from fiddler_jax.runtime import latency, planning as planners\n"
        "import numpy as np\n"
        "plan = planners.get_planner('fiddler_overlap')(np.array([1, 0, 300]), np.zeros(3, bool),"
        " latency.LatencyModel.from_design_numbers())\n"
        "assert 'jax' not in [m.split('.')[0] for m in sys.modules if sys.modules[m] is not None]\n"
        "print(plan)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "fiddler_overlap" in result.stdout
