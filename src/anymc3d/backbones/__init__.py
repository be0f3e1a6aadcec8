"""Frozen 2D backbones: registry, local weights, fingerprints."""
from .base import Backbone, BackboneOutput, weights_fingerprint
from .registry import create_backbone, list_backbones, register_backbone

__all__ = ["Backbone", "BackboneOutput", "weights_fingerprint", "create_backbone", "list_backbones", "register_backbone"]
