"""PEP 562 lazy attributes for package ``__init__`` files: heavy modules load on first use of a name."""
from __future__ import annotations

import importlib


def lazy_attributes(package: str, names: dict[str, str], submodules: tuple[str, ...] = ()):
    """``__getattr__`` and ``__dir__`` for ``package``: ``names`` maps an attribute to the module defining it;
    ``submodules`` are imported on attribute access."""

    def __getattr__(name: str):
        if name in submodules:
            return importlib.import_module(f"{package}.{name}")
        if name in names:
            value = getattr(importlib.import_module(names[name]), name)
            setattr(importlib.import_module(package), name, value)
            return value
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    def __dir__():
        return sorted(set(vars(importlib.import_module(package))) | set(names) | set(submodules))

    return __getattr__, __dir__
