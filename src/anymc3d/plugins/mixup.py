"""Mixup of slice embeddings (training only; issue 32's "augmentation that survives caching").

Two cases of a batch are blended after the backbone, before the task-query pooling: the slice
embeddings of case i become ``lam * h_i + (1 - lam) * h_perm[i]`` in every stream, slice for slice,
and the loss is ``lam * L(z, y_i) + (1 - lam) * L(z, y_perm[i])`` (Zhang et al. 2018, applied at the
embedding level as manifold mixup does). It costs nothing with a cached trunk: the trunk's
activations are the same, only the trainable tail and the pooling see mixed inputs.

A slice that is padding in one case and real in the other stays real (the padding row's embedding
is zero, so it adds ``lam * h_i``); a view that one case lacks is present when the other has it.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class Mix:
    """One batch's mixing: case i is blended with case ``perm[i]`` with weight ``lam`` on itself."""

    perm: torch.Tensor
    lam: float

    @classmethod
    def draw(cls, batch_size: int, alpha: float, rng: np.random.Generator) -> "Mix":
        """``lam ~ Beta(alpha, alpha)`` and a random pairing of the batch's cases."""
        return cls(torch.as_tensor(rng.permutation(batch_size)), float(rng.beta(alpha, alpha)))

    def embeddings(self, embeddings: dict[str, torch.Tensor], slice_mask: dict[str, torch.Tensor] | None,
                   present: torch.Tensor | None):
        """(mixed embeddings, slice masks, present views) of one forward (stream -> (B, S, D))."""
        p = self.perm.to(next(iter(embeddings.values())).device)
        mixed = {s: self.lam * h + (1.0 - self.lam) * h[p] for s, h in embeddings.items()}
        if slice_mask:
            slice_mask = {s: m | m[p.to(m.device)] for s, m in slice_mask.items()}
        if present is not None:
            present = present | present[p.to(present.device)]
        return mixed, slice_mask, present

    def loss(self, loss_fn, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """The mixed loss of ``logits`` against the two cases' targets."""
        return self.lam * loss_fn(logits, target) + (1.0 - self.lam) * loss_fn(logits, target[self.perm.to(target.device)])
