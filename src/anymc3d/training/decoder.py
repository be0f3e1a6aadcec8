"""Auxiliary pixel-level supervision: a light 3D decoder on the pseudo-3D token volume.

The last block's patch tokens of every slice, stacked along the slice axis, form a (D, S, h, w)
volume; two 3D convolutions map it to voxel logits, upsampled to the slice grid. Used only in
training (L = L_cls + λ · L_seg over the cases that have a mask); never saved in the plugin,
so inference costs nothing extra.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class SegDecoder3D(nn.Module):
    def __init__(self, in_dim: int, hidden: int = 32) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv3d(in_dim, hidden, kernel_size=1),
            nn.GroupNorm(min(8, hidden), hidden),
            nn.GELU(),
            nn.Conv3d(hidden, hidden, kernel_size=3, padding=1),
            nn.GroupNorm(min(8, hidden), hidden),
            nn.GELU(),
            nn.Conv3d(hidden, 1, kernel_size=1),
        )

    def forward(self, patches: torch.Tensor, out_hw: tuple[int, int]) -> torch.Tensor:
        """patches (B, S, h, w, D) -> voxel logits (B, S, H, W) on the slice grid."""
        x = patches.permute(0, 4, 1, 2, 3).float()          # (B, D, S, h, w)
        logits = self.net(x)                                 # (B, 1, S, h, w)
        logits = F.interpolate(logits, size=(x.shape[2], *out_hw), mode="trilinear", align_corners=False)
        return logits[:, 0]


def dice_ce_loss(logits: torch.Tensor, target: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Soft Dice + BCE per case, averaged over cases with ``valid`` True (those that have a mask).

    logits, target: (B, S, H, W); valid: (B,) bool. Padded slices carry target 0 and are masked
    out through ``slice_mask`` by the caller (logits there are ignored via target weighting)."""
    if not bool(valid.any()):
        return logits.sum() * 0.0
    lg, tg = logits[valid], target[valid].float()
    bce = F.binary_cross_entropy_with_logits(lg, tg, reduction="none").flatten(1).mean(1)
    p = torch.sigmoid(lg).flatten(1)
    t = tg.flatten(1)
    dice = 1 - (2 * (p * t).sum(1) + 1.0) / (p.sum(1) + t.sum(1) + 1.0)
    return (bce + dice).mean()
