"""Intensity normalisation to a [0, 1]-ish range, per channel, as the spec says."""
from __future__ import annotations

import numpy as np

from anymc3d.preprocess.spec import PreprocessSpec

#: MRI: z-scores are mapped to (z + MRI_Z_OFFSET) / MRI_Z_RANGE, i.e. -3 SD -> 0 and +3 SD -> 1.
MRI_Z_OFFSET = 3.0
MRI_Z_RANGE = 6.0


def apply_intensity(array_cxyz: np.ndarray, spec: PreprocessSpec) -> np.ndarray:
    """Normalise a (C, X, Y, Z) array; returns float32 (C', X, Y, Z) (C' = C x windows for "ct").

    Done after the spatial steps so the statistics describe exactly the grid the model sees.
    """
    x = np.asarray(array_cxyz, dtype=np.float32)
    mode = spec.intensity
    if mode == "none":
        return x
    if mode == "fixed":
        return x / np.float32(spec.scale)
    if mode == "ct":
        out = [
            (np.clip(c, lo, hi) - np.float32(lo)) / np.float32(hi - lo)
            for c in x
            for lo, hi in spec.windows  # type: ignore[union-attr]
        ]
        return np.stack(out).astype(np.float32, copy=False)
    if mode == "minmax":
        out = []
        for c in x:
            lo, hi = float(c.min()), float(c.max())
            out.append((c - lo) / (hi - lo) if hi > lo else np.zeros_like(c))
        return np.stack(out).astype(np.float32, copy=False)
    if mode == "mri":
        return np.stack([_mri_channel(c, spec.clip_percentiles) for c in x]).astype(np.float32, copy=False)
    raise ValueError(f"unknown intensity mode {mode!r}")


def _mri_channel(c: np.ndarray, percentiles: tuple[float, float]) -> np.ndarray:
    """Statistics over non-zero voxels (the background of skull-stripped/masked MRI stays 0)."""
    fg = c != 0
    out = np.zeros_like(c, dtype=np.float32)
    if not fg.any():
        return out
    vals = c[fg]
    lo, hi = np.percentile(vals, percentiles)
    vals = np.clip(vals, lo, hi)
    mean, std = float(vals.mean()), float(vals.std())
    z = (vals - mean) / (std if std > 1e-8 else 1.0)
    out[fg] = (z + MRI_Z_OFFSET) / MRI_Z_RANGE
    return out
