"""Slice-embedding normalisation, fitted once on the training set before the first epoch.

A backbone whose class embedding has no head norm (LiteMedSAM's TinyViT: the plain average of the
last stage's tokens) gives embeddings with a large shared offset and a small spread: on the
synthetic ``lesion_binary`` task at 64², the per-dimension std over slices is 0.025 against a mean
magnitude of 0.14 (EfficientNet-Lite0: 0.26 against 0.65). The task query's scores ``h q`` and the
head's logits then move ~10x slower for the same learning rate, and the plugin does not learn in a
normal number of epochs although the features carry the signal (a standardised linear probe on the
same embeddings reaches AUC 0.97; docs/results.md, issue 18).

``center_scale`` subtracts the training set's per-dimension mean and divides by one scalar, the root
mean per-dimension variance. One scalar keeps the dimensions' relative scales (a per-dimension
standardisation blows up near-constant dimensions and measured worse on EfficientNet-Lite0), so the
embedding keeps its geometry and only its offset and overall scale change. The statistics are
buffers, not parameters: they are fitted from the frozen slice embeddings of up to
:data:`FIT_CASES` training cases (LoRA starts at B = 0, so these are the backbone's own), stored in
the plugin file (``norm.<stream>.mean`` / ``.scale``) and re-applied verbatim at prediction.
"""
from __future__ import annotations

import torch
from torch import nn

from ..backbones import default_embed_norm, list_backbones

#: the choices of ``TrainConfig.embed_norm`` / ``PluginSpec.embed_norm`` ("auto": the backbone's default)
EMBED_NORMS = ("none", "center_scale")
#: at most this many training cases (all their slices) give the statistics
FIT_CASES = 64


def resolve_embed_norm(requested: str, backbone) -> str:
    """``auto`` -> the default registered with the backbone (``register_backbone(..., embed_norm=)``:
    ``center_scale`` for backbones without a head norm); ``none`` for a backbone built outside the registry."""
    if requested == "auto":
        return default_embed_norm(backbone.name) if backbone.name in list_backbones() else "none"
    if requested not in EMBED_NORMS:
        raise ValueError(f"embed_norm must be auto or one of {EMBED_NORMS}, got {requested!r}")
    return requested


class EmbedNorm(nn.Module):
    """(h - mean) / scale on slice embeddings (..., D); identity until fitted."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("scale", torch.ones(()))
        self._acc: list | None = None  # [count, sum, sum of squares] while fitting

    def forward(self, h: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        if self._acc is not None:
            rows = h.detach().reshape(-1, h.shape[-1]) if mask is None else h.detach()[mask.to(h.device)]
            rows = rows.to(torch.float64)
            self._acc[0] += rows.shape[0]
            self._acc[1] += rows.sum(0).cpu()
            self._acc[2] += (rows * rows).sum(0).cpu()
            return h
        return (h - self.mean.to(h.dtype)) / self.scale.to(h.dtype)

    def start_fit(self) -> None:
        d = self.mean.shape[0]
        self._acc = [0, torch.zeros(d, dtype=torch.float64), torch.zeros(d, dtype=torch.float64)]

    def cancel_fit(self) -> None:
        self._acc = None

    def finish_fit(self) -> None:
        n, s, sq = self._acc
        self._acc = None
        if n == 0:
            raise ValueError("embedding normalisation: no slice embeddings to fit on")
        mean = s / n
        var = (sq / n - mean * mean).clamp_min(0.0)
        scale = var.mean().sqrt().clamp_min(1e-6)
        with torch.no_grad():
            self.mean.copy_(mean.to(self.mean.dtype))
            self.scale.copy_(scale.to(self.scale.dtype))
