"""A jobs spec (``common:`` and ``jobs:`` override lists, from a jobs file or a ``table`` preset) and the ``bench``
config of each job, composed from ``fiddler_jax/conf`` exactly as ``fiddler-jax bench`` composes it: for
``bench-jobs``, ``bench-table`` and the cluster launcher's host-memory resolver (each job of a table). It imports
no command module, so any of them may use it."""
from __future__ import annotations

from fiddler_jax.errors import InvalidInputError
from fiddler_jax.experiments import CONF_DIR


def parse_jobs(spec, source: str) -> tuple[list[str], list[list[str]]]:
    """(common overrides, per-job overrides) of a jobs spec (a mapping with ``jobs:`` and optionally ``common:``,
    from a file or a ``table`` preset); ``source`` names it in the clear error for anything else."""
    if not isinstance(spec, dict) or not isinstance(spec.get("jobs"), list) or not spec["jobs"]:
        raise InvalidInputError(f"{source} must hold a non-empty list `jobs:` of override lists (and optionally "
                                "`common:`); see `fiddler-jax bench-jobs --help`")
    common = spec.get("common") or []
    jobs = spec["jobs"]
    for item in [common, *jobs]:
        if not isinstance(item, list) or not all(isinstance(o, str) and "=" in o for o in item):
            raise InvalidInputError(f"{source}: {item!r} is not a list of key=value overrides")
    return [str(o) for o in common], [[str(o) for o in job] for job in jobs]


def compose(overrides: list[str]):
    """The bench config for these overrides. Inside a Hydra app of ours (``bench-table``, whose config search
    path is the same ``fiddler_jax/conf``) through that app's Hydra."""
    from hydra import compose as hydra_compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from fiddler_jax.experiments import schemas  # noqa: F401  (registers bench_schema)

    if GlobalHydra.instance().is_initialized():
        return hydra_compose(config_name="bench", overrides=overrides)
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return hydra_compose(config_name="bench", overrides=overrides)
