"""Benchmarks: suites x methods x seeds -> one side-by-side table (``anymc3d bench``). See docs/bench.md."""
from __future__ import annotations


# Exports load on first use, so `anymc3d --help` and other verbs do not import torch for this package.
_EXPORTS = {
    'DEFAULT_OPTIONS': '.methods',
    'METHODS': '.methods',
    'Method': '.methods',
    'get_method': '.methods',
    'register_method': '.methods',
    'collect': '.runner',
    'run_bench': '.runner',
    'write_tables': '.runner',
    'Suite': '.suite',
    'TaskEntry': '.suite',
    'load_suite': '.suite',
    'materialise': '.suite',
}


def __getattr__(name: str):
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["DEFAULT_OPTIONS", "METHODS", "Method", "Suite", "TaskEntry", "collect", "get_method", "load_suite",
           "materialise", "register_method", "run_bench", "write_tables"]
