"""Frozen 2D backbones: registry, local weights, fingerprints.

Importing this package imports every backbone module; each registers its builders with
``@register_backbone`` (``registry`` itself imports none of them).
"""
from .base import Backbone, BackboneOutput, weights_fingerprint
from .registry import (backbone_entry, create_backbone, default_embed_norm, default_input_size, list_backbones,
                       register_backbone, weights_status)
from . import efficientnet, vit, litemedsam  # noqa: E402,F401  (self-registering backbone modules)

__all__ = ["Backbone", "BackboneOutput", "weights_fingerprint", "create_backbone", "list_backbones", "register_backbone",
           "backbone_entry", "default_embed_norm", "default_input_size", "weights_status"]
