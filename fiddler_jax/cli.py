"""The ``fiddler-jax`` command: ``fiddler-jax <subcommand> [hydra overrides...]``.

Most subcommands are Hydra apps in :mod:`fiddler_jax.experiments` with their config in
``fiddler_jax/conf/<name>.yaml`` (``fiddler-jax <subcommand> --help`` shows it, ``--cfg job`` prints the resolved
config); ``bench-kernel``, ``bench-jobs`` and ``report`` take plain arguments (``--help`` lists them). A user
error ends in one ``error: ...`` line (exit status 2), Ctrl-C in one ``interrupted`` line (exit status 130).
Outputs a command writes without an ``out=`` go to ``./fiddler-jax-outputs/<command>/<date>_<time>/``.
"""
from __future__ import annotations

import importlib
import sys

from fiddler_jax.errors import FiddlerError

COMMANDS = {
    "generate": ("fiddler_jax.experiments.generate", "generate text with a Mixtral checkpoint"),
    "init-random": ("fiddler_jax.experiments.init_random", "write a random-weight Mixtral HF folder (seeded)"),
    "profile": ("fiddler_jax.experiments.profile", "count router choices per (layer, expert) over a corpus"),
    "bench-kernel": ("fiddler_jax.kernels.bench", "benchmark the CPU expert kernel (Mixtral-8x7B shapes)"),
    "train-tiny": ("fiddler_jax.experiments.train_tiny", "train the bundled tiny Mixtral (optax)"),
    "calibrate": ("fiddler_jax.experiments.calibrate", "measure this machine's lane latencies for a model geometry"),
    "bench": ("fiddler_jax.experiments.bench", "run a scenario (decode/prefill/beam) and write result.json"),
    "bench-jobs": ("fiddler_jax.experiments.bench_jobs", "several bench jobs in one process (one engine build)"),
    "bench-table": ("fiddler_jax.experiments.bench_table",
                    "one table of docs/benchmarks.md (conf/table/) as a Hydra job"),
    "ceilings": ("fiddler_jax.experiments.ceilings", "measure host/PCIe/HBM bandwidths and the limits they set"),
    "report": ("fiddler_jax.experiments.report", "CSV + markdown table + plots of a sweep's result.json files"),
    "quant-accuracy": ("fiddler_jax.experiments.quant_accuracy",
                       "perplexity, routing and greedy agreement of int8 / int4 experts against bf16"),
}


def usage() -> str:
    lines = ["usage: fiddler-jax <command> [key=value ...]", "", "commands:"]
    lines += [f"  {name:<14}{desc}" for name, (_, desc) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"fiddler-jax: unknown command {name!r}\n\n{usage()}", file=sys.stderr)
        raise SystemExit(2)
    sys.argv = [f"fiddler-jax {name}", *rest]
    try:
        module = importlib.import_module(COMMANDS[name][0])
        module.main()
    except KeyboardInterrupt:  # Ctrl-C anywhere (loading, compiling, generating): one line, the shell's status
        print("interrupted", file=sys.stderr, flush=True)
        raise SystemExit(130) from None
    except FiddlerError as e:  # a command without its own handler (the Hydra apps print these themselves)
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
