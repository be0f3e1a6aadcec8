"""Benchmarks: suites x methods x seeds -> one side-by-side table (``anymc3d bench``). See docs/bench.md."""
from __future__ import annotations


from anymc3d._lazy import lazy_exports

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

__getattr__ = lazy_exports(__name__, _EXPORTS)


__all__ = ["DEFAULT_OPTIONS", "METHODS", "Method", "Suite", "TaskEntry", "collect", "get_method", "load_suite",
           "materialise", "register_method", "run_bench", "write_tables"]
