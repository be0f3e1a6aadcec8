"""Slice and view aggregation: every pool of the project, in one place.

:class:`TaskQueryPool` is the AnyMC3D task query: a = softmax(H q / sqrt(d)), v = a^T H.
Permutation-invariant and ~d parameters. q starts at zero, so pooling starts as the plain mean
(the frozen-probe baseline) and learns to focus on informative slices or views.

The ablations' aggregators (``make_pool(kind)`` for ``kind`` in :data:`POOLINGS`: attention,
mean, max, transformer) share its contract: slice embeddings ``h`` (B, S, D) with a slice mask
(B, S) -> ``(pooled (B, out_dim), weights (B, S))``. ``weights`` is what the pool attributes to
each slice (uniform for mean; the share of channels a slice wins for max; the class-token
attention of the last layer for the transformer).
"""
from __future__ import annotations

import math

import torch
from torch import nn


class TaskQueryPool(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.query = nn.Parameter(torch.zeros(dim))
        self.scale = 1.0 / math.sqrt(dim)

    def forward(self, h: torch.Tensor, mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """h: (B, S, D); mask: (B, S) True where an item exists. Returns pooled (B, D) and weights (B, S)."""
        scores = (h @ self.query.to(h.dtype)) * self.scale
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf"))
        weights = torch.softmax(scores.float(), dim=1)
        if mask is not None:
            weights = torch.nan_to_num(weights, nan=0.0)  # a row with nothing present pools to zero
        return (weights.unsqueeze(-1) * h.float()).sum(dim=1), weights


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
