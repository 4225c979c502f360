"""PEP 562 exports for the package and its subpackages: public names are imported on first use, so that
`import spectral_jax`, the CLI's `--help` and reading the model registry do not import JAX.

    __getattr__, __dir__ = lazy.exports(__name__, {"ViT": ".modeling", "params": None, ...})
"""

from __future__ import annotations

import importlib
import sys
from typing import Callable


def exports(package: str, table: dict[str, str | None]) -> tuple[Callable, Callable]:
    """(`__getattr__`, `__dir__`) for `package`: `table` maps each public name to the module (relative to
    `package`) that defines it, or to None for a subpackage/submodule of that name. A name is imported on first
    access and then kept as a module attribute."""
    module = sys.modules[package]

    def __getattr__(name: str):
        if name not in table:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        source = table[name]
        value = (importlib.import_module(f".{name}", package) if source is None
                 else getattr(importlib.import_module(source, package), name))
        setattr(module, name, value)
        return value

    def __dir__() -> list[str]:
        return sorted({*table, *(n for n in vars(module) if n.startswith("__"))})

    return __getattr__, __dir__
