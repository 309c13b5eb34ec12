"""The ``bench`` config of a list of overrides, composed from ``fiddler_jax/conf`` exactly as ``fiddler-jax bench``
composes it: for ``bench-jobs`` (each job), ``bench-table`` and the cluster launcher's host-memory resolver (each
job of a table). It imports no command module, so any of them may use it."""
from __future__ import annotations

from fiddler_jax.experiments import CONF_DIR


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
