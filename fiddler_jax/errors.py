"""The exceptions fiddler-jax raises for bad input.

Every user-facing failure is one of these, with a message that names the file, tensor or argument at fault and
says how to fix it, so nobody has to read a traceback from deep inside JAX.
"""


class FiddlerError(Exception):
    """Base class of every error fiddler-jax raises on purpose."""


class ModelConfigError(FiddlerError, ValueError):
    """A config.json that is not a Mixtral config we can run (wrong model_type, missing or invalid fields)."""


class CheckpointError(FiddlerError, OSError):
    """A checkpoint folder that cannot be read: missing files, corrupt safetensors, tensors of the wrong shape."""


class InvalidInputError(FiddlerError, ValueError):
    """Arguments of a call that cannot be right: token ids outside the vocabulary, sequences that are too long."""
