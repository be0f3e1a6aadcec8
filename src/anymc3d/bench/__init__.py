"""Benchmarks: suites x methods x seeds -> one side-by-side table (``anymc3d bench``). See docs/bench.md."""
from __future__ import annotations

from .methods import DEFAULT_OPTIONS, METHODS, Method, get_method, register_method
from .runner import collect, run_bench, write_tables
from .suite import Suite, TaskEntry, load_suite, materialise

__all__ = ["DEFAULT_OPTIONS", "METHODS", "Method", "Suite", "TaskEntry", "collect", "get_method", "load_suite",
           "materialise", "register_method", "run_bench", "write_tables"]
