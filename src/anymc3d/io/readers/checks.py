"""The checks every format shares: the declared size before allocating, voxel type, dimensionality,
channels, NaN/Inf, degenerate geometry and constant content. Every failure is one
:class:`~anymc3d.errors.InputError` line that starts with the offending path."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np

from anymc3d.errors import InputError
from anymc3d.io import options as _options
from anymc3d.io.allocation import check_allocation

#: A volume is "nearly empty" when at most this fraction of its voxels differ from its minimum.
NEAR_EMPTY_FRACTION = 1e-3


def _fail(path: Path | str, problem: str) -> InputError:
    return InputError(f"{path}: {' '.join(problem.split())}")


def check_declared_size(path: Path | str, shape, what: str = "header declares") -> int:
    """Refuse a volume whose declared shape holds more values than the limit, before allocating it.

    ``shape`` includes channels/components. Returns the number of values. The reader's use of the one
    allocation guard (:func:`anymc3d.io.allocation.check_allocation`).
    """
    return check_allocation(path, shape, what, done="nothing was read")


def _check_numeric(path: Path, dtype, fmt: str) -> None:
    dt = np.dtype(dtype)
    if dt.fields is not None or dt.kind not in "biuf":
        raise _fail(path, f"has voxel type {dt} in its {fmt} header; anymc3d reads integer or floating-point volumes")


def _validate_array(arr: np.ndarray, path: Path) -> np.ndarray:
    """``arr`` checked (:func:`check_layout`, then NaN/Inf) and as contiguous float32."""
    check_layout(arr, path)
    out = np.ascontiguousarray(arr, dtype=np.float32)
    finite = np.isfinite(out)
    if not finite.all():
        n_nan = int(np.isnan(out).sum())
        n_inf = int(out.size - finite.sum() - n_nan)
        raise _fail(path, f"contains {n_nan} NaN and {n_inf} Inf voxel values (after conversion to float32)")
    return out


def check_layout(arr: np.ndarray, path: Path) -> None:
    """Voxel type, emptiness, dimensionality, a 2D image and the channel count: what the shape alone
    decides (a header-only read is checked this far)."""
    if arr.dtype.kind not in "biuf":
        raise _fail(path, f"has non-numeric voxel type {arr.dtype}")
    if arr.size == 0:
        raise _fail(path, f"is empty (array shape {tuple(arr.shape)})")
    if arr.ndim not in (3, 4):
        raise _fail(path, f"has {arr.ndim} dimensions (shape {tuple(arr.shape)}); expected a 3D volume (X,Y,Z) or 4D (C,X,Y,Z)")
    spatial = arr.shape[-3:]
    if sum(s == 1 for s in spatial) >= 1:
        raise _fail(path, f"is a 2D image (spatial shape {'x'.join(map(str, spatial))}); a 3D volume is needed")
    channels = _options.current().channels
    if arr.ndim == 4 and channels is not None and arr.shape[0] not in channels:
        raise _fail(path, f"has {arr.shape[0]} channels (4D, read as C,X,Y,Z = {'x'.join(map(str, arr.shape))}); the "
                          f"backbone takes {' or '.join(map(str, channels))}: give each sequence as its own 3D file "
                          f"(one manifest image column each)")


def content_problem(arr: np.ndarray) -> Optional[str]:
    """A warning text when the volume is constant or nearly empty (else None). Chunked: no full-size temporaries."""
    flat = arr.reshape(-1)
    lo, hi = float(flat.min()), float(flat.max())
    if lo == hi:
        return (f"the volume is constant (every voxel is {lo:g}): there is nothing to classify, a prediction "
                f"would only reflect the plugin's bias")
    step = 1 << 22
    differ = sum(int(np.count_nonzero(flat[i:i + step] != lo)) for i in range(0, flat.size, step))
    if differ <= NEAR_EMPTY_FRACTION * flat.size:
        return (f"the volume is nearly empty: only {differ:,} of {flat.size:,} voxels ({100.0 * differ / flat.size:.2g} %) "
                f"differ from the background value {lo:g}; is it a mask, or an empty scan?")
    return None


def _spacing_text(values) -> str:
    return "x".join(f"{float(v):g}" for v in values)


def spacing_problem(spacing, what: str) -> Optional[str]:
    """The cause when a declared voxel size is zero, negative or non-finite (else None)."""
    sp = np.asarray(list(spacing), dtype=np.float64)
    if sp.size and not (np.isfinite(sp).all() and (sp > 0).all()):
        kinds = [k for k, bad in (("zero", (sp == 0).any()), ("negative", (sp < 0).any()),
                                  ("non-finite", (~np.isfinite(sp)).any())) if bad]
        return f"{what} a {' and '.join(kinds)} voxel size ({_spacing_text(sp)} mm)"
    return None


def geometry_problem(affine: np.ndarray) -> Optional[str]:
    """The cause when a voxel-to-world affine is not usable (non-finite, zero spacing, singular), else None."""
    affine = np.asarray(affine, dtype=np.float64)
    if affine.shape != (4, 4) or not np.isfinite(affine).all():
        return "has an invalid voxel-to-world affine (not a finite 4x4 matrix)"
    spacing = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))
    if (spacing < 1e-6).any():
        return f"has a degenerate voxel-to-world affine (zero spacing: {_spacing_text(spacing)} mm)"
    with np.errstate(all="ignore"):
        det = np.linalg.det(affine[:3, :3] / spacing)
    if not np.isfinite(det) or abs(det) < 1e-6:
        return "has a degenerate voxel-to-world affine (its axes are collinear: a singular matrix)"
    return None
