"""setuptools entry: the project metadata lives in pyproject.toml; this file only adds what pyproject cannot
express (the cffi-built FFI kernel library, added by the kernel work)."""
from setuptools import setup

setup()
