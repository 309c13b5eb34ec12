"""Hydra entry points (one module per ``fiddler-jax`` subcommand) and their shared helpers."""
import os as _os

CONF_DIR = _os.path.abspath(_os.path.join(_os.path.dirname(__file__), "..", "conf"))  # fiddler_jax/conf (package data)
