"""Invertible spatial steps: reorientation (exact axis flips/permutes) then resampling.

Grid conventions (all exact, so outputs map back voxel for voxel):

* Reorientation uses nibabel's orientation transforms, as ``as_closest_canonical`` does; the
  oriented affine is ``input_affine @ inv_ornt_aff(ornt, input_shape)``.
* Resampling keeps the field-of-view centre fixed: along each axis, canonical index ``j`` sits at
  oriented index ``i = (j - (n_out-1)/2) * r + (n_in-1)/2`` with ``r = target/current spacing``
  and ``n_out = max(1, round(n_in / r))``, so the canonical spacing equals the target exactly.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
from nibabel.orientations import apply_orientation, axcodes2ornt, inv_ornt_aff, io_orientation, ornt_transform
from scipy import ndimage

from anymc3d.io.allocation import check_allocation, check_aspect
from anymc3d.preprocess.spec import PreprocessSpec

_SPACING_RTOL = 1e-4  # spacings this close to the target are not resampled


@dataclass
class SpatialRecord:
    """Everything needed to map canonical-grid outputs back onto the input's voxel grid."""

    input_path: str
    input_shape: tuple[int, int, int]
    input_affine: np.ndarray
    ornt: Optional[np.ndarray]  # nibabel ornt transform input -> oriented (3x2); None = unchanged
    oriented_shape: tuple[int, int, int]
    oriented_affine: np.ndarray
    resample_ratio: Optional[tuple[float, float, float]]  # target / oriented spacing; None = no resampling
    canonical_shape: tuple[int, int, int]
    canonical_affine: np.ndarray

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready (e.g. to store next to a prediction)."""
        return {
            "input_path": self.input_path,
            "input_shape": list(self.input_shape),
            "input_affine": np.asarray(self.input_affine).tolist(),
            "ornt": None if self.ornt is None else np.asarray(self.ornt).tolist(),
            "oriented_shape": list(self.oriented_shape),
            "oriented_affine": np.asarray(self.oriented_affine).tolist(),
            "resample_ratio": None if self.resample_ratio is None else list(self.resample_ratio),
            "canonical_shape": list(self.canonical_shape),
            "canonical_affine": np.asarray(self.canonical_affine).tolist(),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "SpatialRecord":
        return cls(
            input_path=d["input_path"],
            input_shape=tuple(int(v) for v in d["input_shape"]),  # type: ignore[arg-type]
            input_affine=np.asarray(d["input_affine"], dtype=np.float64),
            ornt=None if d["ornt"] is None else np.asarray(d["ornt"], dtype=np.float64),
            oriented_shape=tuple(int(v) for v in d["oriented_shape"]),  # type: ignore[arg-type]
            oriented_affine=np.asarray(d["oriented_affine"], dtype=np.float64),
            resample_ratio=None if d["resample_ratio"] is None else tuple(float(v) for v in d["resample_ratio"]),  # type: ignore[arg-type]
            canonical_shape=tuple(int(v) for v in d["canonical_shape"]),  # type: ignore[arg-type]
            canonical_affine=np.asarray(d["canonical_affine"], dtype=np.float64),
        )


def _mm(values) -> str:
    return "x".join(f"{float(v):.4g}" for v in values)


def plan_spatial(input_shape: tuple[int, int, int], input_affine: np.ndarray, spec: PreprocessSpec,
                 input_path: str = "<array>", channels: int = 1) -> SpatialRecord:
    """Work out the orientation transform and the resampled grid without touching voxels.

    The planned grid goes through the allocation guard (``channels`` values per voxel, float32, against
    ``--max-voxels``) and the aspect rule (:func:`anymc3d.io.allocation.check_aspect`): a volume whose
    resampled grid would not fit is refused here, before anything is resampled."""
    shape = tuple(int(s) for s in input_shape)
    affine = np.asarray(input_affine, dtype=np.float64)
    ornt = None
    oriented_shape, oriented_affine = shape, affine
    if spec.orientation is not None:
        t = ornt_transform(io_orientation(affine), axcodes2ornt(tuple(spec.orientation)))
        if not (np.array_equal(t[:, 0], np.arange(3)) and np.all(t[:, 1] == 1)):
            ornt = t
            oriented_shape = tuple(shape[int(i)] for i in np.argsort(t[:, 0]))
            oriented_affine = affine @ inv_ornt_aff(t, shape)

    ratio = None
    canonical_shape, canonical_affine = oriented_shape, oriented_affine
    if spec.spacing is not None:
        current = np.sqrt((oriented_affine[:3, :3] ** 2).sum(axis=0))
        target = np.array([c if t is None else t for c, t in zip(current, spec.spacing)])
        r = target / current
        if not np.allclose(r, 1.0, rtol=0, atol=_SPACING_RTOL):
            ratio = tuple(float(v) for v in r)
            n_in = np.array(oriented_shape, dtype=np.float64)
            n_out = np.maximum(1, np.round(n_in / r)).astype(int)
            canonical_shape = tuple(int(v) for v in n_out)
            m = np.eye(4)
            m[:3, :3] = np.diag(r)
            m[:3, 3] = (n_in - 1) / 2 - r * (n_out - 1) / 2
            canonical_affine = oriented_affine @ m
    if ratio is not None:
        what = (f"resampling its {_mm(current)} mm voxels ({'x'.join(map(str, oriented_shape))}) to the plugin's "
                f"{_mm(target)} mm spacing makes")
    else:
        what = "its preprocessed volume (channels x X x Y x Z) is"
    check_aspect(input_path, canonical_shape, "resampled to the plugin's spacing it is" if ratio is not None
                 else "the volume the model sees is")
    check_allocation(input_path, (max(1, int(channels)), *canonical_shape), what)
    return SpatialRecord(
        input_path=input_path,
        input_shape=shape,  # type: ignore[arg-type]
        input_affine=affine,
        ornt=ornt,
        oriented_shape=oriented_shape,  # type: ignore[arg-type]
        oriented_affine=oriented_affine,
        resample_ratio=ratio,  # type: ignore[arg-type]
        canonical_shape=canonical_shape,  # type: ignore[arg-type]
        canonical_affine=canonical_affine,
    )


def _per_channel(fn, array: np.ndarray) -> np.ndarray:
    if array.ndim == 3:
        return fn(array)
    if array.ndim == 4:
        return np.stack([fn(c) for c in array])
    raise ValueError(f"expected (X,Y,Z) or (C,X,Y,Z), got shape {array.shape}")


def _reorient(arr: np.ndarray, ornt: Optional[np.ndarray]) -> np.ndarray:
    if ornt is None:
        return arr
    return np.ascontiguousarray(apply_orientation(arr, ornt))


def _invert_ornt(ornt: np.ndarray) -> np.ndarray:
    inv = np.zeros_like(ornt)
    for axis, (new_axis, flip) in enumerate(ornt):
        inv[int(new_axis)] = (axis, flip)
    return inv


def _resample(arr: np.ndarray, ratio: np.ndarray, offset: np.ndarray, out_shape, order: int) -> np.ndarray:
    return ndimage.affine_transform(
        arr, ratio, offset=offset, output_shape=tuple(out_shape), order=order, mode="nearest", prefilter=False
    )


def apply_spatial(array: np.ndarray, record: SpatialRecord, order: int = 1) -> np.ndarray:
    """Input grid -> canonical grid for (X,Y,Z) or (C,X,Y,Z); order 1 = linear, 0 = nearest (masks)."""
    arr = np.asarray(array)
    if tuple(arr.shape[-3:]) != tuple(record.input_shape):
        raise ValueError(f"array spatial shape {arr.shape[-3:]} != record input shape {record.input_shape}")

    def one(c: np.ndarray) -> np.ndarray:
        c = _reorient(c, record.ornt)
        if record.resample_ratio is not None:
            r = np.asarray(record.resample_ratio)
            n_in = np.asarray(record.oriented_shape, dtype=np.float64)
            n_out = np.asarray(record.canonical_shape, dtype=np.float64)
            c = _resample(c, r, (n_in - 1) / 2 - r * (n_out - 1) / 2, record.canonical_shape, order)
        return c

    return _per_channel(one, arr)


def canonical_to_input(array_xyz: np.ndarray, record: SpatialRecord, order: int = 1) -> np.ndarray:
    """Canonical grid -> exactly the input's voxel grid (undo resampling, then orientation).

    The result has the input's spatial shape, so ``write_nifti(result, record.input_affine, p)``
    overlays the input file. Accepts (X,Y,Z) or (C,X,Y,Z); order 0 for label maps.
    """
    arr = np.asarray(array_xyz)
    if tuple(arr.shape[-3:]) != tuple(record.canonical_shape):
        raise ValueError(f"array spatial shape {arr.shape[-3:]} != canonical shape {record.canonical_shape}")
    if order > 0 and arr.dtype.kind != "f":
        arr = arr.astype(np.float32)

    def one(c: np.ndarray) -> np.ndarray:
        if record.resample_ratio is not None:
            r = np.asarray(record.resample_ratio)
            n_in = np.asarray(record.oriented_shape, dtype=np.float64)
            n_out = np.asarray(record.canonical_shape, dtype=np.float64)
            c = _resample(c, 1.0 / r, (n_out - 1) / 2 - (n_in - 1) / 2 / r, record.oriented_shape, order)
        if record.ornt is not None:
            c = _reorient(c, _invert_ornt(np.asarray(record.ornt)))
        return np.ascontiguousarray(c)

    out = _per_channel(one, arr)
    assert tuple(out.shape[-3:]) == tuple(record.input_shape)
    return out
