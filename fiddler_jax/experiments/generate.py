"""``fiddler-jax generate``: load a checkpoint, continue a prompt (text or token ids), print it and tokens/s.

The ``model``, ``placement``, ``planner`` and ``kernel`` groups are the benchmark's (:mod:`.schemas`); the
``engine:`` block turns the hybrid engine on (a GPU budget, a resident-expert count, or a random model) and sizes
it, and the engine is built by :func:`fiddler_jax.experiments.build.build_engine`. Without it the plain model
runs, every weight on the default device."""
from __future__ import annotations

import functools
import time
from dataclasses import dataclass, field

import hydra
from hydra.core.config_store import ConfigStore
from omegaconf import OmegaConf

from fiddler_jax.errors import InvalidInputError
from fiddler_jax.experiments.build import build_engine, checkpoint_path
from fiddler_jax.experiments.common import CONF_DIR, clear_errors
from fiddler_jax.experiments.schemas import KernelSchema, ModelSchema, PlacementSchema, PlannerConfig


@dataclass
class EngineSchema:
    """``generate``'s ``engine:`` block: whether the hybrid engine runs, and its size."""

    gpu_budget: str | None = None  # null = no budget (the plain model unless resident_experts is set); e.g. "24GiB"
    resident_experts: int | None = None  # shorthand for placement.resident_experts (generate.yaml links them)
    latency: str | None = None  # latency model file from calibration, or auto; null = the design-note numbers
    max_batch: int = 1  # KV reserve rows (beam search needs num_beams)
    trace: str | None = None  # write the per-layer Perfetto timeline here


@dataclass
class GenerateConfig:
    model: ModelSchema = field(default_factory=ModelSchema)
    placement: PlacementSchema = field(default_factory=PlacementSchema)
    planner: PlannerConfig = field(default_factory=PlannerConfig)
    kernel: KernelSchema = field(default_factory=KernelSchema)
    engine: EngineSchema = field(default_factory=EngineSchema)
    prompt: str | None = None  # text, through the folder's tokenizer
    prompt_ids: list[int] | None = None  # or token ids
    max_new_tokens: int = 64
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int = 0
    num_beams: int = 1
    length_penalty: float = 1.0
    early_stopping: bool = False


ConfigStore.instance().store(name="generate_schema", node=GenerateConfig)
DEFAULT_PROMPT = "def fibonacci(n):"


@hydra.main(config_path=CONF_DIR, config_name="generate", version_base="1.3")
@clear_errors
def main(cfg) -> None:
    import numpy as np

    import fiddler_jax as fj
    from fiddler_jax.runtime.generate import GenerationStats

    if hybrid(cfg):
        engine, tokenizer = build_engine(cfg)
        model, source = engine.model, cfg.model.path or f"model={cfg.model.name}"
    else:
        if cfg.engine.trace:
            raise InvalidInputError("engine.trace needs the hybrid engine: set engine.gpu_budget (e.g. 24GiB) or "
                                    "engine.resident_experts")
        engine = None
        source = checkpoint_path(cfg.model)
        model, tokenizer = fj.load_pretrained(source, dtype=cfg.model.dtype), fj.load_tokenizer(source)
    if cfg.prompt is not None and cfg.prompt_ids is not None:
        raise InvalidInputError("give either prompt=<text> or prompt_ids=[...], not both")
    if cfg.prompt_ids is not None:
        ids = np.asarray(OmegaConf.to_container(cfg.prompt_ids), dtype=np.int64)[None, :]
    else:
        if tokenizer is None:
            raise InvalidInputError(f"{source} has no tokenizer files, so a text prompt cannot be encoded; pass "
                                    "prompt_ids=[1,2,3] instead")
        ids = np.asarray(tokenizer(cfg.prompt if cfg.prompt is not None else DEFAULT_PROMPT)["input_ids"])[None, :]
    kwargs = dict(do_sample=cfg.do_sample, seed=cfg.seed, temperature=cfg.temperature, top_p=cfg.top_p,
                  num_beams=cfg.num_beams, length_penalty=cfg.length_penalty, early_stopping=cfg.early_stopping)
    if cfg.num_beams > 1:
        tic = time.perf_counter()
        out = (engine.generate if engine is not None else functools.partial(fj.generate, model))(
            ids, cfg.max_new_tokens, **kwargs)
        stats = GenerationStats(ids.shape[1], out.shape[1] - ids.shape[1], decode_s=time.perf_counter() - tic)
    else:
        run = engine.generate_with_stats if engine is not None else functools.partial(fj.generate_with_stats, model)
        out, stats = run(ids, cfg.max_new_tokens, do_sample=cfg.do_sample, seed=cfg.seed,
                         temperature=cfg.temperature, top_p=cfg.top_p)
    new = out[0, ids.shape[1]:]
    if tokenizer is not None:
        print(tokenizer.decode(out[0], skip_special_tokens=True))
    else:
        print("prompt ids:   ", ids[0].tolist())
        print("generated ids:", new.tolist())
    if stats.prefill_s:
        print(f"[{stats.prompt_tokens} prompt tokens, {stats.new_tokens} new; time to first token "
              f"{stats.prefill_s * 1e3:.0f} ms (compile included); decode {stats.decode_tokens_per_s:.1f} tokens/s "
              f"(steady state) on {model_device(model)}]")
    else:
        print(f"[{stats.prompt_tokens} prompt tokens, {stats.new_tokens} new in {stats.decode_s:.2f} s, compile "
              f"included, on {model_device(model)}]")
    if engine is not None:
        summary = engine.trace_summary()
        print(f"[engine: {engine.placement.memory}; planner {engine.planner.name}; "
              f"{summary['planned_steps']} planned layer steps, GPU hit rate {summary.get('gpu_hit_rate', 1.0):.0%}, "
              f"experts per lane {summary.get('experts_per_lane', {})}]")
        if cfg.engine.trace:
            engine.trace.save(cfg.engine.trace)
            print(f"wrote the per-layer timeline to {cfg.engine.trace} (open it in ui.perfetto.dev)")


def hybrid(cfg) -> bool:
    """Whether the config asks for the hybrid engine: a GPU budget, a resident-expert count, or a random model
    (which exists only inside an engine)."""
    return (cfg.engine.gpu_budget is not None or cfg.placement.resident_experts is not None
            or bool(cfg.model.random))


def model_device(model) -> str:
    import jax
    return jax.devices()[0].platform


if __name__ == "__main__":
    main()
