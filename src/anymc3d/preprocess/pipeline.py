"""The whole preprocessing path: Volume -> canonical (C,X,Y,Z) -> per-view slice stacks.

The prediction and training paths (:func:`anymc3d.runtime.batching.prepare_case` and
:func:`~anymc3d.runtime.batching.slice_streams`) use it as::

    vol = read_volume(path)
    canon, record = canonicalize(vol, spec)        # (C, X, Y, Z) on the canonical grid
    slices = to_slices(canon, spec, "axial")       # (S, C, size, size)
    ...                                            # model -> per-slice maps (S, size, size)
    heat = canonical_to_input(slices_to_canonical(maps, spec, "axial", record), record)  # input's shape
    write_nifti(heat, record.input_affine, "heatmap.nii.gz")
"""
from __future__ import annotations

import numpy as np

from anymc3d.errors import InputError
from anymc3d.preprocess.intensity import apply_intensity
from anymc3d.preprocess.slicing import check_slices
from anymc3d.preprocess.spatial import SpatialRecord, apply_spatial, plan_spatial
from anymc3d.preprocess.spec import PreprocessSpec
from anymc3d.volume import Volume

AFFINE_ATOL_MM = 1e-3


def plan_volume(volume: Volume, spec: PreprocessSpec) -> SpatialRecord:
    """The spatial record of ``volume`` under ``spec``, with every allocation guard of the prediction path
    checked (resampled grid, aspect rule, each view's slice stack) and no voxel touched."""
    shape = tuple(np.shape(volume.array))
    if len(shape) not in (3, 4):
        raise InputError(f"{volume.source}: expected a 3D or 4D image, got shape {shape}")
    c_in = shape[0] if len(shape) == 4 else 1
    channels = max(c_in, spec.out_channels(c_in))
    record = plan_spatial(shape[-3:], volume.affine, spec, volume.source, channels=channels)
    check_slices(spec, record.canonical_shape, spec.slice_channels(c_in), volume.source)
    return record


def canonicalize(volume: Volume, spec: PreprocessSpec) -> tuple[np.ndarray, SpatialRecord]:
    """Orientation + spacing + intensity -> float32 (C, X, Y, Z) in [0,1]-ish, and the record to invert it.

    Spatial steps run first (linear interpolation) so intensity statistics describe the grid the
    model actually sees.
    """
    record = plan_volume(volume, spec)  # refused here, before anything is resampled or sliced
    arr = np.asarray(volume.array, dtype=np.float32)
    if arr.ndim == 3:
        arr = arr[None]
    canon = apply_spatial(arr, record, order=1)
    return apply_intensity(canon, spec), record


def canonicalize_mask(mask: Volume, spec: PreprocessSpec, reference: SpatialRecord) -> np.ndarray:
    """Bring a mask onto its image's canonical grid (nearest neighbour); (X, Y, Z) integer labels.

    The mask must share the image's voxel grid (shape and affine within 1e-3 mm), otherwise
    the labels would silently land on the wrong voxels.
    """
    arr = np.asarray(mask.array)
    if arr.ndim == 4 and arr.shape[0] == 1:
        arr = arr[0]
    if arr.ndim != 3:
        raise InputError(f"{mask.source}: a mask must be 3D (one channel), got shape {arr.shape} (image {reference.input_path})")
    if tuple(arr.shape) != tuple(reference.input_shape):
        raise InputError(
            f"{mask.source}: mask shape {tuple(arr.shape)} does not match image {reference.input_path} shape {tuple(reference.input_shape)}"
        )
    if not np.allclose(np.asarray(mask.affine, dtype=np.float64), reference.input_affine, rtol=0, atol=AFFINE_ATOL_MM):
        diff = float(np.abs(np.asarray(mask.affine) - reference.input_affine).max())
        raise InputError(
            f"{mask.source}: mask affine differs from image {reference.input_path} (max difference {diff:.4g} mm > {AFFINE_ATOL_MM})"
        )
    labels = np.rint(arr).astype(np.int32)
    out = apply_spatial(labels, reference, order=0)
    if out.size and out.min() >= 0 and out.max() <= 255:
        return out.astype(np.uint8)
    return out.astype(np.int32)
