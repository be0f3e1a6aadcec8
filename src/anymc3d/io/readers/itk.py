"""NRRD, MetaImage and single DICOM files via SimpleITK: header read first, ITK's LPS geometry turned
into a nibabel-style RAS affine."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from anymc3d.io import options as _options
from anymc3d.io.readers.checks import _fail, check_declared_size, spacing_problem
from anymc3d.io.readers.quiet import _one_line
from anymc3d.io.readers.registry import Reader
from anymc3d.volume import Volume

_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])



def _sitk():
    """SimpleITK with ITK's C++ warnings switched off (they go straight to the terminal otherwise)."""
    import SimpleITK as sitk

    sitk.ProcessObject.SetGlobalWarningDisplay(False)
    return sitk


def itk_to_ras_affine(direction, spacing, origin) -> np.ndarray:
    """nibabel-style RAS affine from ITK geometry (LPS+ world, index order x,y,z)."""
    ndim = len(spacing)
    d = np.asarray(direction, dtype=np.float64).reshape(ndim, ndim)[:3, :3]
    sp = np.asarray(spacing, dtype=np.float64)[:3]
    o = np.asarray(origin, dtype=np.float64)[:3]
    aff = np.eye(4)
    aff[:3, :3] = _LPS_TO_RAS @ d @ np.diag(sp)
    aff[:3, 3] = _LPS_TO_RAS @ o
    return aff


def _sitk_image_to_volume(img, path: Path, fmt: str) -> Volume:
    sitk = _sitk()

    dim = img.GetDimension()
    if dim < 3:
        raise _fail(path, f"is a 2D image (size {'x'.join(map(str, img.GetSize()))}); a 3D volume is needed")
    arr = sitk.GetArrayFromImage(img)  # scalar: (Z,Y,X) or (T,Z,Y,X); vector: (...,C)
    ncomp = img.GetNumberOfComponentsPerPixel()
    if ncomp > 1:
        arr = np.moveaxis(arr, -1, 0)  # (C, [T,] Z, Y, X)
        if dim > 3:
            raise _fail(path, f"is a {dim}D multi-component image; expected 3D")
        arr = arr.transpose(0, 3, 2, 1)
    elif dim == 3:
        arr = arr.transpose(2, 1, 0)
    elif dim == 4:  # a 4th ITK axis (time/sequence) is treated as channels
        arr = arr.transpose(0, 3, 2, 1)
    else:
        raise _fail(path, f"has {dim} dimensions; expected a 3D volume")
    affine = itk_to_ras_affine(img.GetDirection(), img.GetSpacing(), img.GetOrigin())
    return Volume(arr, affine, {"format": fmt, "dtype": str(arr.dtype)})


def _sitk_header(path: Path, fmt: str):
    """An ImageFileReader with the header read (size, components, pixel type), nothing allocated."""
    sitk = _sitk()
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
        size = tuple(int(s) for s in reader.GetSize())
        ncomp = int(reader.GetNumberOfComponents())
    except Exception as exc:
        raise _fail(path, f"cannot read as {fmt.upper()} ({_one_line(exc)})") from exc
    check_declared_size(path, size + ((ncomp,) if ncomp > 1 else ()), f"its {fmt.upper()} header declares")
    try:
        spacing = tuple(float(v) for v in reader.GetSpacing())[:3]
        direction = np.asarray(reader.GetDirection(), dtype=np.float64)
    except Exception:
        return reader
    problem = spacing_problem(spacing, f"its {fmt.upper()} header declares")
    n = int(round(math.sqrt(direction.size))) if direction.size else 0
    if problem is None and n >= 3:
        d = direction.reshape(n, n)[:3, :3]
        with np.errstate(all="ignore"):
            det = np.linalg.det(d) if np.isfinite(d).all() else np.nan
        if not np.isfinite(det) or abs(det) < 1e-6:
            problem = f"its {fmt.upper()} header declares a singular or non-finite direction matrix"
    reader._anymc3d_geometry_problem = problem  # ITK refuses some of these itself when it reads the voxels
    return reader


def _sitk_layout(path: Path, size: tuple[int, ...], ncomp: int) -> tuple[int, ...]:
    """The array shape :func:`_sitk_image_to_volume` gives an image of ITK ``size`` (x, y, z[, t]) and
    ``ncomp`` components per pixel, with the same refusals."""
    dim = len(size)
    if dim < 3:
        raise _fail(path, f"is a 2D image (size {'x'.join(map(str, size))}); a 3D volume is needed")
    if ncomp > 1:
        if dim > 3:
            raise _fail(path, f"is a {dim}D multi-component image; expected 3D")
        return (ncomp, *size)
    if dim == 3:
        return size
    if dim == 4:  # a 4th ITK axis (time/sequence) is treated as channels
        return (size[3], *size[:3])
    raise _fail(path, f"has {dim} dimensions; expected a 3D volume")


def make_sitk_header_reader(fmt: str) -> Reader:
    """The header-only reader of :func:`_make_sitk_reader`'s format: the same header checks, a read-only
    zero array of the declared shape, the affine from the header's geometry (no voxel read)."""
    def header(path: Path) -> Volume:
        reader = _sitk_header(path, fmt)
        shape = _sitk_layout(path, tuple(int(s) for s in reader.GetSize()), int(reader.GetNumberOfComponents()))
        meta = {"format": fmt, "dtype": _sitk().GetPixelIDValueAsString(reader.GetPixelID()), "header_only": True}
        problem = getattr(reader, "_anymc3d_geometry_problem", None)
        if problem:
            meta["_geometry_problem"] = problem
            affine = np.eye(4)
        else:
            affine = itk_to_ras_affine(reader.GetDirection(), reader.GetSpacing(), reader.GetOrigin())
        return Volume(np.broadcast_to(np.float32(0), shape), affine, meta)

    header.__name__ = f"read_{fmt}_header"
    return header


def _make_sitk_reader(fmt: str) -> Reader:
    def read(path: Path) -> Volume:
        reader = _sitk_header(path, fmt)
        problem = getattr(reader, "_anymc3d_geometry_problem", None)
        if problem and _options.current().assume_spacing is None:
            raise _fail(path, f"{problem}; refused, because the voxel size decides the resampling and the slices. "
                              f"To read it anyway, give the spacing with --assume-spacing X,Y,Z (mm; identity "
                              f"directions)")
        try:
            img = reader.Execute()
        except Exception as exc:
            if problem:  # ITK refuses zero spacing and singular directions: no voxels to assume a spacing for
                raise _fail(path, f"{problem}, and ITK refuses to read such a file even with --assume-spacing: fix "
                                  f"the header's spacing/direction fields ({_one_line(exc)})") from exc
            raise _fail(path, f"cannot read as {fmt.upper()} ({_one_line(exc)})") from exc
        vol = _sitk_image_to_volume(img, path, fmt)
        if problem:
            vol.meta["_geometry_problem"] = problem
        return vol

    read.__name__ = f"read_{fmt}"
    read.__doc__ = f"{fmt.upper()} via SimpleITK (header checked first); ITK's LPS geometry converted to a RAS affine."
    return read
