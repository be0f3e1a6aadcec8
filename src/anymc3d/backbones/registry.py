"""Backbone registry (timm-style): name -> builder. ``create_backbone`` is the only entry point."""
from __future__ import annotations

from typing import Callable

from ..errors import InputError
from .base import Backbone
from .efficientnet import _LITE, build_efficientnet_lite
from .vit import _VITS, build_vit

_REGISTRY: dict[str, Callable[..., Backbone]] = {}
_DEFAULT_SIZE: dict[str, int] = {}


def register_backbone(name: str, builder: Callable[..., Backbone], default_size: int = 224) -> None:
    _REGISTRY[name] = builder
    _DEFAULT_SIZE[name] = default_size


for _n in _LITE:
    register_backbone(_n, lambda weights=None, input_size=224, _n=_n: build_efficientnet_lite(_n, weights, input_size))
for _n, (_arch, _ps, _) in _VITS.items():
    register_backbone(_n, lambda weights=None, input_size=224, _n=_n: build_vit(_n, weights, input_size))


def list_backbones() -> list[str]:
    return sorted(_REGISTRY)


def create_backbone(name: str, weights: str | None = None, input_size: int | None = None) -> Backbone:
    """Build a frozen backbone. ``weights``: a local file, ``"random"`` (tests/benchmarks), or None (default source)."""
    if name not in _REGISTRY:
        raise InputError(f"unknown backbone '{name}'; available: {', '.join(list_backbones())}")
    return _REGISTRY[name](weights=weights, input_size=input_size or _DEFAULT_SIZE[name])
