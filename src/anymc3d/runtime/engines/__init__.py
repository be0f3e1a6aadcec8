"""Inference engines for the frozen passes (trunk-cache fill, frozen probes, frozen features).

``--engine auto|torch|onnxruntime|openvino`` (docs/runtime.md, "Engines"); ONNX Runtime and OpenVINO
come with the optional extra ``anymc3d[cpu]``. :func:`frozen_runner` is the one entry point; the
exported graphs live in the export cache (:mod:`.export_cache`).
"""
from __future__ import annotations

from .base import Engine, EngineUnavailable, FrozenPass, Runner, parse_cut
from .export_cache import ExportCache
from .registry import (ENGINE_CHOICES, ENGINES, INSTALL_HINT, TOLERANCE, available_engines, build_runner, clear,
                       current_engine, engine_name, frozen_runner, note, notes, set_engine, using_engine,
                       with_engine_args)

__all__ = ["ENGINES", "ENGINE_CHOICES", "Engine", "EngineUnavailable", "ExportCache", "FrozenPass", "INSTALL_HINT",
           "Runner", "TOLERANCE", "available_engines", "build_runner", "clear", "current_engine", "engine_name",
           "frozen_runner", "note", "notes", "parse_cut", "set_engine", "using_engine", "with_engine_args"]
