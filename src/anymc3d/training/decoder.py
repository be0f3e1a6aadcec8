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


#: MONAI's Dice + BCE on sigmoid outputs, Dice per case with smoothing 1 (soft Dice), both terms averaged
_DICE_CE = None


def dice_ce_loss(logits: torch.Tensor, target: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Soft Dice + BCE per case (MONAI ``DiceCELoss``), averaged over cases with ``valid`` True
    (those that have a mask). logits, target: (B, S, H, W); valid: (B,) bool."""
    global _DICE_CE
    if not bool(valid.any()):
        return logits.sum() * 0.0
    if _DICE_CE is None:
        from monai.losses import DiceCELoss

        _DICE_CE = DiceCELoss(sigmoid=True, smooth_nr=1.0, smooth_dr=1.0, batch=False, reduction="mean")
    return _DICE_CE(logits[valid][:, None], target[valid][:, None].float())
