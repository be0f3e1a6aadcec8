"""Task-query attention pooling (AnyMC3D): a = softmax(H q / sqrt(d)), v = a^T H.

Permutation-invariant and ~d parameters. q starts at zero, so pooling starts as the plain mean
(the frozen-probe baseline) and learns to focus on informative slices or views.
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
