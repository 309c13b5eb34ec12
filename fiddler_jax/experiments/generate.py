r"""``fiddler-jax generate``: load a checkpoint, continue a prompt (text or token ids), print it and tokens/s;
or every prompt of ``prompts_file``, ``batch_size`` at a time, into a JSONL file (:mod:`.generate_batch`).

The ``model``, ``placement``, ``planner`` and ``kernel`` groups are the benchmark's (:mod:`.schemas`); the
``engine:`` block turns the hybrid engine on (a GPU budget, a resident-expert count, or a random model) and sizes
it, and the engine is built by :func:`fiddler_jax.experiments.build.build_engine`. Without it the plain model
runs, every weight on the default device, and an option only the engine reads (``planner=``, ``placement.*``,
``kernel.*``, ``engine.latency`` ...) is refused rather than ignored. A text prompt's ``\n``, ``\t`` and ``\\``
stand for newline, tab and backslash."""
from __future__ import annotations

import functools
import time
from dataclasses import dataclass, field

import hydra
from hydra.core.config_store import ConfigStore
from omegaconf import OmegaConf

from fiddler_jax.errors import InvalidInputError
from fiddler_jax.experiments.build import build_engine
from fiddler_jax.experiments.model_group import checkpoint_path
from fiddler_jax.experiments.common import (
    CONF_DIR, check_output_path, clear_errors, decode_escapes, run_dir, write_output,
)
from fiddler_jax.experiments.generate_batch import check_prompts_file, generate_all, output_path, read_prompts
from fiddler_jax.experiments.schemas import KernelSchema, ModelSchema, PlacementSchema, PlannerConfig


@dataclass
class EngineSchema:
    """``generate``'s ``engine:`` block: whether the hybrid engine runs, and its size."""

    gpu_budget: str | None = None  # null = no budget (the plain model unless resident_experts is set); e.g. "24GiB"
    resident_experts: int | None = None  # shorthand for placement.resident_experts (generate.yaml links them)
    latency: str | None = None  # latency model file from calibration, or auto; null = the design-note numbers
    max_batch: int = 1  # KV reserve rows (beam search needs num_beams)
    max_context: int | None = None  # KV reserve positions per row; null = the model's context
    max_step_tokens: int | None = None  # tokens per forward step (the workspace); null = max_batch x max_context
    trace: str | None = None  # write the per-layer Perfetto timeline here


@dataclass
class GenerateConfig:
    model: ModelSchema = field(default_factory=ModelSchema)
    placement: PlacementSchema = field(default_factory=PlacementSchema)
    planner: PlannerConfig = field(default_factory=PlannerConfig)
    kernel: KernelSchema = field(default_factory=KernelSchema)
    engine: EngineSchema = field(default_factory=EngineSchema)
    prompt: str | None = None  # text, through the folder's tokenizer (\n \t \\ decoded: common.decode_escapes)
    prompt_ids: list[int] | None = None  # or token ids
    prompts_file: str | None = None  # or a file of prompts, one output per prompt (generate_batch)
    batch_size: int = 8  # prompts_file: prompts generated together
    out: str | None = None  # prompts_file: the JSONL output file
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

    trace = check_args(cfg)  # before any model loads
    out_file = check_output_path(output_path(cfg.prompts_file, cfg.out, run_dir("generate")), "out") \
        if cfg.prompts_file else None
    if hybrid(cfg):
        engine, tokenizer = build_engine(cfg)
        model, source = engine.model, cfg.model.path or f"model={cfg.model.name}"
    else:
        engine = None
        source = checkpoint_path(cfg.model)
        model = fj.load_pretrained(source, dtype=cfg.model.dtype, expert_precision=cfg.model.expert_precision,
                                   int4_group=cfg.model.int4_group)
        tokenizer = fj.load_tokenizer(source)
    if cfg.prompts_file:
        generate_file(cfg, engine, model, tokenizer, out_file)
    else:
        generate_one(cfg, engine, model, tokenizer, source)
    if engine is not None:
        summary = engine.trace_summary()
        print(f"[engine: {engine.placement.memory}; planner {engine.planner.name}; "
              f"{summary['planned_steps']} planned layer steps, GPU hit rate {summary.get('gpu_hit_rate', 1.0):.0%}, "
              f"experts per lane {summary.get('experts_per_lane', {})}]")
        if trace:
            write_output(trace, "engine.trace", engine.trace.save)
            print(f"wrote the per-layer timeline to {trace} (open it in ui.perfetto.dev)")


def generate_file(cfg, engine, model, tokenizer, path: str) -> None:
    """Every prompt of ``prompts_file``, ``batch_size`` at a time, into the JSONL file ``path``."""
    import fiddler_jax as fj
    from fiddler_jax.runtime.generate import eos_token_ids

    prompts = read_prompts(cfg.prompts_file, tokenizer)
    kwargs = dict(do_sample=cfg.do_sample, seed=cfg.seed, temperature=cfg.temperature, top_p=cfg.top_p,
                  num_beams=cfg.num_beams, length_penalty=cfg.length_penalty, early_stopping=cfg.early_stopping)
    run = engine.generate if engine is not None else functools.partial(fj.generate, model)
    totals = generate_all(lambda batch, n: run(batch, n, **kwargs), prompts, cfg.batch_size, cfg.max_new_tokens,
                          eos_token_ids(model.config), tokenizer, path)
    print(f"wrote {totals['prompts']} outputs to {path}")
    print(f"[{totals['prompts']} prompts in batches of {cfg.batch_size}: {totals['new_tokens']} new tokens in "
          f"{totals['seconds']:.2f} s, {totals['tokens_per_s']:.1f} tokens/s over all rows, compile included, on "
          f"{model_device(model)}]")


def generate_one(cfg, engine, model, tokenizer, source) -> None:
    """The one prompt of ``prompt`` / ``prompt_ids``: print the text (or ids) and the speed."""
    import numpy as np

    import fiddler_jax as fj
    from fiddler_jax.runtime.generate import GenerationStats

    if cfg.prompt_ids is not None:
        ids = np.asarray(OmegaConf.to_container(cfg.prompt_ids), dtype=np.int64)[None, :]
    else:
        if tokenizer is None:
            raise InvalidInputError(f"{source} has no tokenizer files, so a text prompt cannot be encoded; pass "
                                    "prompt_ids=[1,2,3] instead")
        text = decode_escapes(cfg.prompt) if cfg.prompt is not None else DEFAULT_PROMPT
        ids = np.asarray(tokenizer(text)["input_ids"])[None, :]
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


# Overrides that only the hybrid engine reads: with the plain model they would be ignored.
ENGINE_ONLY = ("planner", "placement", "kernel", "engine.latency", "engine.max_batch", "engine.max_context",
               "engine.max_step_tokens", "engine.trace")


def check_args(cfg) -> str | None:
    """Refuse what cannot be right before any model loads (one clear line each); returns the checked
    ``engine.trace`` path. An option that only the hybrid engine reads (:data:`ENGINE_ONLY`) is refused while the
    plain model runs, instead of being ignored."""
    from fiddler_jax.runtime.beam_search import check_beam_args

    if sum(x is not None for x in (cfg.prompt, cfg.prompt_ids, cfg.prompts_file)) > 1:
        raise InvalidInputError("give one of prompt=<text>, prompt_ids=[...] and prompts_file=<file>, not several")
    if not cfg.prompts_file and (cfg.out is not None or "batch_size" in _given_keys()):
        raise InvalidInputError("out and batch_size go with prompts_file=<file> (one output per prompt); for one "
                                "prompt the output is printed")
    if cfg.prompts_file:
        check_prompts_file(cfg.prompts_file)
    if cfg.batch_size < 1:
        raise InvalidInputError(f"batch_size must be ≥ 1, got {cfg.batch_size}")
    check_beam_args(cfg.num_beams, cfg.length_penalty, cfg.early_stopping, cfg.do_sample)
    if not hybrid(cfg):
        if cfg.engine.trace:
            raise InvalidInputError("engine.trace needs the hybrid engine: set engine.gpu_budget (e.g. 24GiB) or "
                                    "engine.resident_experts")
        ignored = engine_only_overrides()
        if ignored:
            raise InvalidInputError(f"{', '.join(ignored)} only appl{'ies' if len(ignored) == 1 else 'y'} to the "
                                    "hybrid engine, which is off: set engine.gpu_budget (e.g. engine.gpu_budget=24GiB) "
                                    "or engine.resident_experts=<n> to turn it on; without either the plain model "
                                    "runs, every weight on the default device")
    check_context(cfg)
    return check_output_path(cfg.engine.trace, "engine.trace") if cfg.engine.trace else None


def check_context(cfg) -> None:
    """``max_new_tokens`` (with ``prompt_ids``' length when given) must fit the model's context: read from the
    checkpoint's config.json (or the random model's geometry) before any weights load."""
    from fiddler_jax.experiments.model_group import model_config

    if cfg.max_new_tokens < 0:
        raise InvalidInputError(f"max_new_tokens must be ≥ 0, got {cfg.max_new_tokens}")
    config = model_config(cfg.model)
    prompt = len(cfg.prompt_ids) if cfg.prompt_ids is not None else 1
    if prompt + cfg.max_new_tokens > config.max_position_embeddings:
        raise InvalidInputError(
            f"max_new_tokens={cfg.max_new_tokens} after a prompt of {'at least ' if cfg.prompt_ids is None else ''}"
            f"{prompt} token(s) goes beyond the model's {config.max_position_embeddings} positions "
            f"(max_position_embeddings); lower max_new_tokens")


def _given() -> list[str]:
    """The command line's overrides, as given ([] outside Hydra)."""
    from hydra.core.hydra_config import HydraConfig

    try:
        return list(HydraConfig.get().overrides.task)
    except ValueError:  # not under Hydra (a direct call)
        return []


def _given_keys() -> set[str]:
    return {o.lstrip("+~").split("=", 1)[0].strip() for o in _given()}


def engine_only_overrides() -> list[str]:
    """The command-line overrides that only the hybrid engine reads (group choices and keys), as given."""
    given = _given()
    found = []
    for override in given:
        key = override.lstrip("+~").split("=", 1)[0].strip()
        if any(key == k or key.startswith(k + ".") for k in ENGINE_ONLY):
            found.append(override)
    return found


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
