"""Hydra entry points (one module per ``fiddler-jax`` subcommand) and their shared helpers."""
