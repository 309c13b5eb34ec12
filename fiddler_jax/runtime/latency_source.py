"""Which latency model an engine plans with, and why -- never silently another machine's.

``latency`` as given to ``Engine.from_pretrained``:
  * ``"auto"``: this machine's calibration for the model's expert geometry (``fiddler-jax calibrate`` keeps one
    per machine identity and geometry, ``latency.default_path``); when there is none yet, this machine is
    calibrated now (about a minute, with a progress bar) and the result is cached for the next run;
  * a path: that JSON file (a model measured for another geometry makes that geometry's decisions);
  * ``None``: the H100 machine's design numbers (``LatencyModel.from_design_numbers``), with a warning that
    says so and how to plan with this machine's own numbers -- decisions are then the H100 machine's.
"""
from __future__ import annotations

import os
import warnings

from fiddler_jax.models.quantization import parse_precision_tag
from fiddler_jax.runtime.latency import Geometry, LatencyModel, default_path


class DesignLatencyWarning(UserWarning):
    """The engine plans with the H100 machine's design numbers, not this machine's measurements."""


def resolve_latency(latency, geometry: Geometry, *, progress: bool = True) -> LatencyModel:
    """The latency model for ``latency`` (module docstring) and an expert ``geometry``."""
    if latency is None:
        warnings.warn(
            "planning with the H100 machine's design latency numbers (latency=None), not measurements of this "
            "machine: pass latency='auto' (calibrates this machine once and caches it) or a file from "
            "`fiddler-jax calibrate`", DesignLatencyWarning, stacklevel=4)
        return LatencyModel.from_design_numbers()
    if isinstance(latency, str) and latency == "auto":
        return load_or_calibrate(geometry, progress=progress)
    return LatencyModel.load(os.fspath(latency))


def load_or_calibrate(geometry: Geometry, root: str | os.PathLike | None = None, *,
                      progress: bool = True) -> LatencyModel:
    """This machine's cached calibration for ``geometry``, made now (and cached under ``root``, default the
    user's cache folder) when there is none."""
    from fiddler_jax.runtime.calibrate import DEFAULT_NS, calibrate, machine_identity

    machine = machine_identity()
    path = default_path(machine, geometry, root)
    if os.path.isfile(path):
        return LatencyModel.load(path, expect_machine=machine, expect_geometry=geometry)
    from tqdm.auto import tqdm

    rows = 2 * len(DEFAULT_NS) + 4  # the header, cpu and gpu per token count, then copy, copy beside cpu, sync
    with tqdm(total=rows, desc=f"calibrating this machine for {geometry.hidden}x{geometry.ffn} {geometry.dtype} "
                                         f"{geometry.precision}",
              unit="row", disable=not progress, leave=False) as bar:
        precision, group = parse_precision_tag(geometry.precision)
        model, _ = calibrate(geometry.hidden, geometry.ffn, geometry.dtype, progress=lambda line: bar.update(1),
                             expert_precision=precision, int4_group=group)
    model.save(path)
    if progress:
        print(f"calibrated this machine's latency model: {path}", flush=True)
    return model
