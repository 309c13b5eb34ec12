"""Shared pieces of the Hydra apps: where the configs are (``fiddler_jax/conf``, shipped inside the package so a
wheel install works), and turning our errors into one clear line."""
from __future__ import annotations

import functools
import logging
import os
import sys

from fiddler_jax.errors import FiddlerError

# Hydra's job logging puts the root logger at INFO; JAX's backend probing is noise at that level.
logging.getLogger("jax._src.xla_bridge").setLevel(logging.WARNING)

CONF_DIR = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "conf"))  # fiddler_jax/conf (package data)


def clear_errors(task):
    """Run a Hydra task; a FiddlerError prints ``error: <message>`` and exits with status 2 (no traceback)."""

    @functools.wraps(task)
    def wrapper(*args, **kwargs):
        try:
            return task(*args, **kwargs)
        except FiddlerError as e:
            print(f"error: {e}", file=sys.stderr)
            raise SystemExit(2) from None

    return wrapper


def resolve_model_path(path: str | None) -> str:
    """``model.path`` or, when null, the bundled default model."""
    from fiddler_jax.assets import default_model_path
    from fiddler_jax.errors import CheckpointError

    if path:
        return os.path.expanduser(str(path))
    default = default_model_path()
    if default is None:
        raise CheckpointError("no model.path given and this installation ships no bundled model; pass "
                              "model.path=<HF Mixtral folder> (or create one with `fiddler-jax init-random`)")
    return str(default)

