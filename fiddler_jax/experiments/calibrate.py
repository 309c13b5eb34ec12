"""``fiddler-jax calibrate``: time this machine's lanes (CPU kernel, GPU expert, host -> GPU copy, layer-step
sync) for one model geometry, fit the latency model and save it where ``Engine.from_pretrained(latency="auto")``
looks (``latency.default_path``) or to ``out=``, with a plot of measurements vs fit and the raw measurements
(:func:`output_paths` says where)."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

import hydra
from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from omegaconf import OmegaConf

from fiddler_jax.experiments.model_group import checkpoint_path
from fiddler_jax.experiments.common import CONF_DIR, check_output_path, clear_errors, write_output
from fiddler_jax.experiments.schemas import ModelSchema
from fiddler_jax.runtime.calibrate import DEFAULT_BUDGET_S, DEFAULT_NS


@dataclass
class GeometryOverride:
    """Overrides of the expert geometry (``runtime.latency.Geometry``) that the model's config.json gives."""

    hidden: int | None = None  # expert hidden size; null = the model's hidden_size
    ffn: int | None = None  # expert FFN size; null = the model's intermediate_size


@dataclass
class CalibrateConfig:
    model: ModelSchema = field(default_factory=lambda: ModelSchema(dtype="bfloat16"))
    geometry: GeometryOverride = field(default_factory=GeometryOverride)
    ns: list[int] = field(default_factory=lambda: list(DEFAULT_NS))
    experts: int = 4
    budget_s: float = DEFAULT_BUDGET_S
    out: str | None = None  # latency JSON; null = latency.default_path(machine, geometry)
    plot: bool = True  # also the PNG of measurements vs fit (output_paths says where)


ConfigStore.instance().store(name="calibrate_schema", node=CalibrateConfig)


def resolve_geometry(cfg) -> tuple[int, int, str]:
    """(hidden, ffn, where they came from): the overrides where given, the model folder's config.json for the rest."""
    hidden, ffn = cfg.geometry.hidden, cfg.geometry.ffn
    if hidden is not None and ffn is not None:
        return hidden, ffn, "geometry overrides"
    from fiddler_jax.models.config import ModelConfig

    path = checkpoint_path(cfg.model)
    config = ModelConfig.from_pretrained(path)
    return (config.hidden_size if hidden is None else hidden, config.intermediate_size if ffn is None else ffn,
            f"{path}/config.json" + (" with geometry overrides" if (hidden, ffn) != (None, None) else ""))


def output_paths(cfg, geometry) -> tuple[str, str, str]:
    """(latency JSON, measurements JSON, plot PNG), checked writable before any measuring. With ``out=`` the
    measurements and the plot go beside it (``<out>.measurements.json``, ``<out>.png``); without, the latency model
    goes to the cache (``latency.default_path``) and the other two to the run folder
    (``fiddler-jax-outputs/calibrate/<date>_<time>/``)."""
    from fiddler_jax.runtime.calibrate import machine_identity
    from fiddler_jax.runtime.latency import default_path

    if cfg.out:
        out = check_output_path(cfg.out, "the latency model")
        stem = out[:-5] if out.endswith(".json") else out
        measurements, png = f"{stem}.measurements.json", f"{stem}.png"
    else:
        out = check_output_path(default_path(machine_identity(), geometry), "the latency model")
        run_dir = HydraConfig.get().runtime.output_dir
        measurements, png = os.path.join(run_dir, "measurements.json"), os.path.join(run_dir, "latency.png")
    check_output_path(measurements, "the measurements")
    if cfg.plot:
        check_output_path(png, "the plot")
    return out, measurements, png


@hydra.main(config_path=CONF_DIR, config_name="calibrate", version_base="1.3")
@clear_errors
def main(cfg) -> None:
    from fiddler_jax.runtime.calibrate import calibrate, check_args, table
    from fiddler_jax.runtime.latency import plot

    hidden, ffn, source = resolve_geometry(cfg)
    ns = OmegaConf.to_container(cfg.ns)
    precision = dict(expert_precision=cfg.model.expert_precision, int4_group=cfg.model.int4_group)
    geometry, _ = check_args(hidden, ffn, cfg.model.dtype, ns, cfg.experts, cfg.budget_s,
                             **precision)  # fail before any setup
    out, measurements_path, png = output_paths(cfg, geometry)
    print(f"expert geometry from {source}")
    model, measurements = calibrate(hidden, ffn, cfg.model.dtype, ns=ns, experts=cfg.experts,
                                    budget_s=cfg.budget_s, **precision)
    write_output(out, "the latency model", model.save)
    print(f"wrote {out}")

    def dump(path):
        with open(path, "w") as f:
            json.dump({"model": model.to_dict(), "measurements": measurements.to_dict()}, f, indent=1)

    write_output(measurements_path, "the measurements", dump)
    print(f"wrote {measurements_path}")
    if cfg.plot:
        write_output(png, "the plot", lambda path: plot(measurements.curves(), path, model))
        print(f"wrote {png}")
    print(table(model, measurements))


if __name__ == "__main__":
    main()
