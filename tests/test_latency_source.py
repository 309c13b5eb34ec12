"""Which latency model an engine plans with: the design numbers only with a warning that says so, "auto"
calibrates this machine once per geometry and then reads the cached file, a path is read as given."""
from __future__ import annotations

import dataclasses

import pytest

from fiddler_jax.runtime import calibrate as C
from fiddler_jax.runtime import latency_source as S
from fiddler_jax.runtime.latency import Geometry, LatencyModel, LatencyModelError, default_path

GEOMETRY = Geometry(hidden=64, ffn=128, dtype="bfloat16")


def test_no_latency_warns_that_the_design_numbers_are_used():
    with pytest.warns(S.DesignLatencyWarning, match="design latency numbers.*latency='auto'"):
        model = S.resolve_latency(None, GEOMETRY)
    assert model == LatencyModel.from_design_numbers()


def test_auto_calibrates_once_then_reads_the_cache(tmp_path, monkeypatch):
    calls, lines = [], []
    machine = C.machine_identity()

    def fake_calibrate(hidden, ffn, dtype, progress=True, **kwargs):
        calls.append((hidden, ffn, dtype))
        for n in range(3):
            progress(f"row {n}")  # the progress bar's rows
            lines.append(n)
        model = dataclasses.replace(LatencyModel.from_design_numbers(), machine=machine,
                                    geometry=Geometry(hidden, ffn, dtype), transfer_s=1.25)
        return model, None

    monkeypatch.setattr(C, "calibrate", fake_calibrate)
    first = S.load_or_calibrate(GEOMETRY, tmp_path, progress=False)
    assert calls == [(64, 128, "bfloat16")] and lines == [0, 1, 2]
    assert (tmp_path / default_path(machine, GEOMETRY, tmp_path).rsplit("/", 1)[1]).is_file()
    second = S.load_or_calibrate(GEOMETRY, tmp_path, progress=False)
    assert len(calls) == 1 and second.transfer_s == first.transfer_s == 1.25
    other = Geometry(hidden=32, ffn=128, dtype="bfloat16")  # another geometry: calibrated apart
    S.load_or_calibrate(other, tmp_path, progress=False)
    assert len(calls) == 2


def test_a_path_is_read_and_a_missing_one_is_a_clear_error(tmp_path):
    path = tmp_path / "lat.json"
    LatencyModel.from_design_numbers().save(path)
    assert S.resolve_latency(str(path), GEOMETRY) == LatencyModel.from_design_numbers()
    with pytest.raises(LatencyModelError, match="no latency model at .*fiddler-jax calibrate"):
        S.resolve_latency(str(tmp_path / "missing.json"), GEOMETRY)
