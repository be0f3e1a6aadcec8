"""View dropout (training only; issue 32): each present stream (view or sequence) of a training case is
hidden from the view fusion with probability ``p``, and every case keeps at least one, so the plugin
learns to answer from any subset of its views, as it must when a sequence is missing at prediction.

It acts on the batch's ``present`` mask alone, which the view pooling already honours for missing
inputs, so it works with a cached trunk (the trunk's activations are untouched) and costs nothing.
"""
from __future__ import annotations

import numpy as np
import torch


def drop_views(present: torch.Tensor, p: float, rng: np.random.Generator) -> torch.Tensor:
    """``present`` (B, V) bool with each True dropped with probability ``p``; a case that would lose
    every view keeps one of its own, drawn at random."""
    if p <= 0 or present.shape[1] < 2:
        return present
    keep = present & torch.as_tensor(rng.random(tuple(present.shape)) >= p)
    for i in torch.nonzero(~keep.any(dim=1)).flatten().tolist():
        own = torch.nonzero(present[i]).flatten().tolist()
        if own:
            keep[i, own[int(rng.integers(len(own)))]] = True
    return keep
