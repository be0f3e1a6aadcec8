"""Lazy package exports (PEP 562), so `anymc3d --help` and unrelated verbs do not import torch."""
from __future__ import annotations

import importlib
from typing import Callable


def lazy_exports(package: str, exports: dict[str, str]) -> Callable[[str], object]:
    """Return a module ``__getattr__`` that imports ``exports[name]`` (a relative module) on first use."""

    def __getattr__(name: str) -> object:
        if name in exports:
            return getattr(importlib.import_module(exports[name], package), name)
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    return __getattr__
