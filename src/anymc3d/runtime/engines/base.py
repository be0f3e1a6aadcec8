"""What an inference engine runs: the frozen part of a backbone at a cut point, as a plain function of slices.

A cut point is ``embed`` (the whole frozen backbone -> (N, D) class embeddings; frozen probes and
pooling-only plugins) or ``trunk:k`` (the backbone's first blocks -> the input of the last ``k``
blocks; shared-trunk plugins). :class:`FrozenPass` is that function as a ``nn.Module`` (no LoRA:
the adapters of a shared backbone are switched off while it is exported or run), which every
engine exports or runs. An engine turns it into a :class:`Runner`: slices (N, C, H, W) float32 on
the CPU in, the frozen output (float32) out, any N.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn


class EngineUnavailable(RuntimeError):
    """The engine's package is not installed (or cannot run this graph here)."""


def parse_cut(cut: str) -> int | None:
    """``embed`` -> None, ``trunk:k`` -> k; ValueError otherwise."""
    if cut == "embed":
        return None
    if cut.startswith("trunk:") and cut[6:].isdigit() and int(cut[6:]) >= 1:
        return int(cut[6:])
    raise ValueError(f"cut point must be 'embed' or 'trunk:k' (k >= 1), got {cut!r}")


class FrozenPass(nn.Module):
    """The frozen function of ``backbone`` at ``cut``: slices in [0, 1] -> class embeddings or trunk activations."""

    def __init__(self, backbone, cut: str) -> None:
        super().__init__()
        self.backbone, self.cut, self.last_k = backbone, cut, parse_cut(cut)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.last_k is None:
            return self.backbone(x).cls
        return self.backbone.forward_trunk(x, self.last_k)


class Runner:
    """A compiled frozen pass: ``runner(x)`` -> float32 tensor. ``engine``: the engine's name;
    ``detail``: how it runs (precision, threads); ``source``: the cached graph file, if any."""

    def __init__(self, engine: str, fn: Callable[[torch.Tensor], torch.Tensor], detail: str = "",
                 source: str | None = None) -> None:
        self.engine, self.fn, self.detail, self.source = engine, fn, detail, source

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x)

    def __repr__(self) -> str:
        return f"Runner({self.engine}{', ' + self.detail if self.detail else ''})"


class Engine:
    """One inference engine. ``name`` is what ``--engine`` takes; :meth:`available` says whether its
    package is installed; :meth:`build` turns a :class:`FrozenPass` into a :class:`Runner` (using the
    export cache for anything it writes)."""

    name = "?"
    package: str | None = None  # the PyPI package (None: part of the default install)
    #: the modules it needs (importable without being imported: ``available`` only looks them up)
    modules: tuple[str, ...] = ()

    def available(self) -> bool:
        """Whether every module of :attr:`modules` is installed (nothing is imported)."""
        import importlib.util

        return all(importlib.util.find_spec(m) is not None for m in self.modules)

    def version(self) -> str:
        raise NotImplementedError

    def build(self, frozen: FrozenPass, example: torch.Tensor, cache, threads: int) -> Runner:
        raise NotImplementedError


def export_onnx(frozen: FrozenPass, example: torch.Tensor, path) -> None:
    """The frozen pass as an ONNX graph (batch dimension dynamic), written to ``path`` (a temporary
    name of the export cache). TorchScript-based exporter (``dynamo=False``): seconds, and it handles
    timm's TinyViT and EfficientNet; opset 17."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer warnings about Python-side shape checks (fixed slice size)
        torch.onnx.export(frozen, (example,), str(path), input_names=["slices"], output_names=["out"],
                          dynamic_axes={"slices": {0: "n"}, "out": {0: "n"}}, opset_version=17, dynamo=False,
                          do_constant_folding=True)
