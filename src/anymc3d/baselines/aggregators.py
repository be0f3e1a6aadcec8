"""Slice aggregation modules for the ablations (mean / max / attention / transformer) and an
AnyMC3D subclass whose per-stream slice pooling is one of them.

Every pool maps slice embeddings ``h`` (B, S, D) with a slice mask (B, S) to ``(pooled (B, out_dim),
weights (B, S))`` -- the same contract as :class:`anymc3d.plugins.pooling.TaskQueryPool`, so the
rest of the model (view fusion, head, trainer, predictor) is unchanged. ``weights`` is what the
pool attributes to each slice (uniform for mean; the share of channels a slice wins for max;
the class-token attention of the last layer for the transformer).
"""
from __future__ import annotations

import math

import torch
from torch import nn

from ..model import AnyMC3D
from ..plugins.pooling import TaskQueryPool

POOLINGS = ("attention", "mean", "max", "transformer")


def _uniform(mask: torch.Tensor | None, b: int, s: int) -> torch.Tensor:
    m = torch.ones(b, s) if mask is None else mask.float()
    return m / m.sum(dim=1, keepdim=True).clamp_min(1.0)


class MeanPool(nn.Module):
    """Plain mean over the present slices (the frozen-probe aggregation); no parameters."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.out_dim = dim

    def forward(self, h: torch.Tensor, mask: torch.Tensor | None = None):
        w = _uniform(mask, h.shape[0], h.shape[1]).to(h.device)
        return (w.unsqueeze(-1) * h.float()).sum(dim=1), w


class MaxPool(nn.Module):
    """Channel-wise max over the present slices; no parameters."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.out_dim = dim

    def forward(self, h: torch.Tensor, mask: torch.Tensor | None = None):
        x = h.float()
        if mask is not None:
            x = x.masked_fill(~mask.unsqueeze(-1), float("-inf"))
        pooled, idx = x.max(dim=1)
        pooled = torch.nan_to_num(pooled, neginf=0.0)
        w = torch.zeros(h.shape[0], h.shape[1], device=h.device)
        w.scatter_add_(1, idx, torch.ones_like(idx, dtype=w.dtype))
        return pooled, w / h.shape[-1]


class AttentionPool(TaskQueryPool):
    """The paper's task-query attention pooling (alias, with ``out_dim``)."""

    def __init__(self, dim: int) -> None:
        super().__init__(dim)
        self.out_dim = dim


class TransformerPool(nn.Module):
    """Slice transformer (MST-like): project to ``hidden``, add a learned slice-position embedding
    and a class token, ``layers`` pre-norm encoder layers, read the class token.

    Not permutation invariant (positions matter), unlike the task query.
    """

    def __init__(self, dim: int, hidden: int = 256, layers: int = 1, heads: int = 4, max_slices: int = 512,
                 dropout: float = 0.1) -> None:
        super().__init__()
        self.out_dim = hidden
        self.proj = nn.Linear(dim, hidden)
        self.cls = nn.Parameter(torch.zeros(1, 1, hidden))
        self.pos = nn.Parameter(torch.zeros(1, max_slices, hidden))
        nn.init.trunc_normal_(self.pos, std=0.02)
        layer = nn.TransformerEncoderLayer(hidden, heads, dim_feedforward=2 * hidden, dropout=dropout,
                                           batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(hidden)

    def forward(self, h: torch.Tensor, mask: torch.Tensor | None = None):
        b, s, _ = h.shape
        if s + 1 > self.pos.shape[1]:
            raise ValueError(f"TransformerPool: {s} slices exceed max_slices={self.pos.shape[1] - 1}")
        x = self.proj(h.float())
        x = torch.cat([self.cls.expand(b, -1, -1), x], dim=1) + self.pos[:, : s + 1]
        pad = None
        if mask is not None:
            pad = torch.cat([torch.zeros(b, 1, dtype=torch.bool, device=h.device), ~mask], dim=1)
        x = self.encoder(x, src_key_padding_mask=pad)
        pooled = self.norm(x[:, 0])
        # slice weights: similarity of the class token to each slice token, softmax over present slices
        scores = (x[:, 1:] @ x[:, 0].unsqueeze(-1)).squeeze(-1) / math.sqrt(self.out_dim)
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf"))
        w = torch.nan_to_num(torch.softmax(scores.float(), dim=1), nan=0.0)
        return pooled, w.detach()


def make_pool(kind: str, dim: int, **kw) -> nn.Module:
    if kind == "attention":
        return AttentionPool(dim)
    if kind == "mean":
        return MeanPool(dim)
    if kind == "max":
        return MaxPool(dim)
    if kind == "transformer":
        return TransformerPool(dim, **kw)
    raise ValueError(f"unknown pooling {kind!r}; choose one of {', '.join(POOLINGS)}")


class AggregatorAnyMC3D(AnyMC3D):
    """AnyMC3D with another slice aggregation; optionally the whole 2D backbone fine-tuned.

    ``pooling`` in :data:`POOLINGS`. ``finetune_backbone=True`` makes every backbone weight trainable
    (the "fine-tuned 2D backbone + slice transformer" baseline; use LoRA r=0 with it). The trainer
    sees backbone weights in the LoRA optimiser group (lr_lora) and pools + head in the head group.
    Plugin files written from this model need this class to be read back (bench use only).
    """

    def __init__(self, backbone, spec, pooling: str = "attention", pool_kw: dict | None = None,
                 finetune_backbone: bool = False, **kw) -> None:
        super().__init__(backbone, spec, **kw)
        d = backbone.embed_dim
        self.pooling = pooling
        self.finetune_backbone = finetune_backbone
        self.slice_pool = nn.ModuleDict({s.replace(":", "__"): make_pool(pooling, d, **(pool_kw or {}))
                                         for s in self.streams})
        out_dim = next(iter(self.slice_pool.values())).out_dim
        self.view_pool = TaskQueryPool(out_dim)
        self.head = nn.Sequential(nn.Dropout(spec.head_dropout), nn.Linear(out_dim, spec.n_outputs))
        self._out_dim = out_dim

    def lora_parameters(self) -> dict[str, nn.Parameter]:
        out = super().lora_parameters()
        if self.finetune_backbone:
            for k, p in self.backbone.model.named_parameters():
                if "lora_" not in k:
                    out[f"backbone.{k}"] = p
        return out

    def head_parameters(self) -> dict[str, nn.Parameter]:
        out = {}
        for s in self.streams:
            for k, p in self.slice_pool[s.replace(":", "__")].named_parameters():
                out[f"pool.{s}.{k}"] = p
        out["query.fusion"] = self.view_pool.query
        for k, p in self.head.named_parameters():
            out[f"head.{k}"] = p
        return out

    def forward(self, slices, slice_mask=None, present=None, keep_patches: bool = False, **kw):
        # the parent pads missing streams with zeros of the backbone's width: fine for pools that keep it
        if self._out_dim != self.backbone.embed_dim and present is not None and not bool(present.all()):
            raise ValueError("AggregatorAnyMC3D: missing inputs are only supported with width-preserving pools")
        if self.finetune_backbone:
            self.backbone.model.eval()  # BatchNorm statistics stay frozen; weights still get gradients
        return super().forward(slices, slice_mask, present, keep_patches, **kw)
