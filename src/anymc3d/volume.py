"""The in-memory volume that every reader returns and every writer takes."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np


@dataclass
class Volume:
    """A 3D image in voxel order (X, Y, Z) or (C, X, Y, Z) with a voxel-to-world affine.

    ``affine`` follows nibabel's convention: 4x4, voxel index -> RAS+ world millimetres.
    Keeping the affine of the *input* lets heatmaps be written back in the input's own space.
    """

    array: np.ndarray
    affine: np.ndarray = field(default_factory=lambda: np.eye(4))
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def spatial_shape(self) -> tuple[int, int, int]:
        return tuple(int(s) for s in self.array.shape[-3:])  # type: ignore[return-value]

    @property
    def spacing(self) -> tuple[float, float, float]:
        return tuple(float(s) for s in np.sqrt((np.asarray(self.affine)[:3, :3] ** 2).sum(axis=0)))  # type: ignore[return-value]

    @property
    def source(self) -> str:
        return str(self.meta.get("path", "<array>"))


class MaskPath(type(Path())):  # type: ignore[misc]  # PosixPath/WindowsPath: subclassing Path itself needs 3.12
    """A path that a manifest marks as a *mask*: read without the constant / near-empty image warnings
    (an all-zero mask is what a case without a lesion has)."""
