"""Backbone registry (timm-style): name -> builder. ``create_backbone`` is the only entry point.

Like timm's ``@register_model``, every backbone module registers its own builders when it is imported
(``@register_backbone("name")``); this module imports no builder module. The package ``__init__``
imports the backbone modules, so ``anymc3d.backbones`` always has them all.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from ..errors import InputError
from .base import Backbone


@dataclass(frozen=True)
class BackboneEntry:
    name: str
    builder: Callable[..., Backbone]
    default_size: int = 224
    #: () -> (weights available on this machine, where they come from); None: not known
    weights_status: Callable[[], tuple[bool, str]] | None = None
    #: the plugins' default slice-embedding normalisation (anymc3d.plugins.embed_norm)
    embed_norm: str = "none"


_ENTRIES: dict[str, BackboneEntry] = {}


def register_backbone(name: str, builder: Callable[..., Backbone] | None = None, default_size: int = 224,
                      weights_status: Callable[[], tuple[bool, str]] | None = None, embed_norm: str = "none"):
    """Register ``builder(weights=None, input_size=...) -> Backbone`` under ``name``.

    As a decorator: ``@register_backbone("name", default_size=256)`` above the builder function
    (returned unchanged). As a call: ``register_backbone("name", builder)``. A name registered twice
    is replaced (the last import wins), as in timm. ``embed_norm="center_scale"`` for a backbone whose
    class embedding has no head norm (plugins then centre and scale it; ``none`` otherwise)."""
    def add(fn: Callable[..., Backbone]) -> Callable[..., Backbone]:
        _ENTRIES[name] = BackboneEntry(name, fn, int(default_size), weights_status, embed_norm)
        return fn

    if builder is None:
        return add
    add(builder)
    return None


def list_backbones() -> list[str]:
    return sorted(_ENTRIES)


def backbone_entry(name: str) -> BackboneEntry:
    if name not in _ENTRIES:
        raise InputError(f"unknown backbone '{name}'; available: {', '.join(list_backbones())}")
    return _ENTRIES[name]


def default_input_size(name: str) -> int:
    return backbone_entry(name).default_size


def default_embed_norm(name: str) -> str:
    return backbone_entry(name).embed_norm


def weights_status(name: str) -> tuple[bool | None, str]:
    """(available here: True / False / None = unknown, where the weights come from), never raises."""
    entry = backbone_entry(name)
    if entry.weights_status is None:
        return None, "not declared"
    try:
        return entry.weights_status()
    except Exception as exc:  # a status check must never break the listing
        return False, f"status check failed ({type(exc).__name__}: {str(exc)[:120]})"


def create_backbone(name: str, weights: str | None = None, input_size: int | None = None) -> Backbone:
    """Build a frozen backbone. ``weights``: a local file, ``"random"`` (tests/benchmarks), or None (default source)."""
    entry = backbone_entry(name)
    return entry.builder(weights=weights, input_size=input_size or entry.default_size)
