"""nnU-Net-style 3D augmentation from MONAI dictionary transforms (the paper's recipe, docs/method.md).

Applied to canonical (C, X, Y, Z) volumes *before* slicing, so every view of a case sees the same
3D transform, and a mask (key "mask") follows the image with nearest-neighbour interpolation.
"""
from __future__ import annotations

import math

from monai.transforms import (Compose, RandAdjustContrastd, RandAffined, RandFlipd, RandGaussianNoised,
                              RandGaussianSmoothd, RandRotated, RandScaleIntensityd,
                              RandScaleIntensityFixedMeand, RandSimulateLowResolutiond, RandZoomd)


def build_augmentation(image_keys: list[str], spatial_size: tuple[int, int, int], with_mask: bool,
                       seed: int = 0) -> Compose:
    """Flip p=.5 per axis; rotate ±30° p=.2; zoom .7-1.4 p=.2; translate ±10 vox (at most 15% of the
    smallest side, so 28³ volumes are not pushed out of view) p=.2; noise σ .02 p=.25; blur σ .5-1 p=.2;
    brightness ×.75-1.25 p=.15; contrast .75-1.25 p=.15; low-res .5-1 p=.2; gamma .7-1.5 p=.25."""
    keys = list(image_keys) + (["mask"] if with_mask else [])
    modes_lin = ["bilinear"] * len(image_keys) + (["nearest"] if with_mask else [])
    modes_zoom = ["trilinear"] * len(image_keys) + (["nearest"] if with_mask else [])
    shift = float(min(10, max(1, round(0.15 * min(spatial_size)))))
    rot = math.radians(30)
    t = [RandFlipd(keys, prob=0.5, spatial_axis=a) for a in range(3)]
    t += [
        RandRotated(keys, range_x=rot, range_y=rot, range_z=rot, prob=0.2, mode=modes_lin, padding_mode="zeros"),
        RandZoomd(keys, min_zoom=0.7, max_zoom=1.4, prob=0.2, mode=modes_zoom, keep_size=True),
        RandAffined(keys, prob=0.2, translate_range=(shift, shift, shift), mode=modes_lin, padding_mode="zeros"),
        RandGaussianNoised(image_keys, prob=0.25, std=0.02),
        RandGaussianSmoothd(image_keys, sigma_x=(0.5, 1.0), sigma_y=(0.5, 1.0), sigma_z=(0.5, 1.0), prob=0.2),
        RandScaleIntensityd(image_keys, factors=0.25, prob=0.15),
        RandScaleIntensityFixedMeand(image_keys, factors=0.25, prob=0.15),
        RandSimulateLowResolutiond(image_keys, zoom_range=(0.5, 1.0), prob=0.2),
        RandAdjustContrastd(image_keys, gamma=(0.7, 1.5), prob=0.25),
    ]
    comp = Compose(t)
    comp.set_random_state(seed=seed)
    return comp
