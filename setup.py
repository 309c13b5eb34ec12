"""setuptools entry: the project metadata lives in pyproject.toml; this file only adds what pyproject cannot
express: the cffi-built XLA FFI kernel library (fiddler_jax/kernels/_build.py compiles xla_ffi/*.cc)."""
from setuptools import setup

setup(cffi_modules=["fiddler_jax/kernels/_build.py:ffibuilder"])
