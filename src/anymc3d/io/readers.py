"""Read 3D medical images into a :class:`~anymc3d.volume.Volume` through one suffix registry.

Modelled on nnU-Net v2's ``imageio`` registry: a dict maps a (lower-case) file suffix to a
reader function ``reader(path) -> Volume``; a folder is read as a DICOM series. Readers return
the raw array and the nibabel-style voxel->RAS affine; :func:`read_volume` does the checks that
every format shares (dimensionality, NaN/Inf, empty, degenerate affine) and casts to float32, so
a plug-in reader only has to get the geometry right.

Every user-facing failure is an :class:`~anymc3d.errors.InputError` whose one-line message starts
with the offending path.
"""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Callable, Optional, Union

import numpy as np

from anymc3d.errors import InputError
from anymc3d.volume import Volume

Reader = Callable[[Path], Volume]

#: Registry key used for directories (read as one DICOM series).
DIRECTORY = "<directory>"

_READERS: dict[str, Reader] = {}

# ITK/DICOM world coordinates are LPS+; nibabel affines are RAS+. Flipping x and y converts.
_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])


def _one_line(exc: BaseException, limit: int = 200) -> str:
    """Library errors (ITK especially) span many lines; the CLI prints exactly one."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    if "sitk::ERROR:" in text:  # drop ITK's source-file location prefix
        text = text.split("sitk::ERROR:")[-1].strip()
    if len(text) > limit:
        text = text[: limit - 3] + "..."
    return f"{type(exc).__name__}: {text}"


def _fail(path: Path | str, problem: str) -> InputError:
    return InputError(f"{path}: {' '.join(problem.split())}")


def register_reader(suffix: str, reader: Optional[Reader] = None, *, overwrite: bool = False):
    """Register ``reader`` for files ending in ``suffix`` (e.g. ``".nii.gz"``), or for folders with
    :data:`DIRECTORY`. Usable directly or as a decorator (``@register_reader(".foo")``).

    Why a registry: new formats plug in without touching :func:`read_volume`'s callers.
    """
    key = suffix if suffix == DIRECTORY else suffix.lower()
    if key != DIRECTORY and not key.startswith("."):
        raise ValueError(f"suffix must start with '.', got {suffix!r}")

    def _register(fn: Reader) -> Reader:
        if key in _READERS and not overwrite and _READERS[key] is not fn:
            raise ValueError(f"a reader for {key!r} is already registered (pass overwrite=True)")
        _READERS[key] = fn
        return fn

    if reader is None:
        return _register
    return _register(reader)


def registered_suffixes() -> list[str]:
    """Suffixes with a reader (for help texts and error messages)."""
    return sorted(k for k in _READERS if k != DIRECTORY)


def _find_reader(path: Path) -> tuple[str, Reader]:
    if path.is_dir():
        if DIRECTORY not in _READERS:
            raise _fail(path, "is a folder and no folder (DICOM series) reader is registered")
        return DIRECTORY, _READERS[DIRECTORY]
    name = path.name.lower()
    # Longest suffix wins so that ".nii.gz" beats a hypothetical ".gz".
    for key in sorted(_READERS, key=len, reverse=True):
        if key != DIRECTORY and name.endswith(key):
            return key, _READERS[key]
    raise _fail(
        path,
        f"unknown file type; supported: {', '.join(registered_suffixes())} or a DICOM series folder",
    )


def read_volume(path: Union[str, Path], *, affine: Optional[np.ndarray] = None) -> Volume:
    """Read an image file or DICOM series folder into a validated float32 :class:`Volume`.

    The array is (X, Y, Z) or channels-first (C, X, Y, Z); ``affine`` maps voxel indices to RAS+
    millimetres exactly as the file states (no reorientation here, so outputs can be written
    back in the input's own grid). ``meta`` holds ``path``, ``format`` and the original ``dtype``.

    ``affine`` overrides the identity geometry of formats that carry none (``.npy``); passing it
    for a format with its own geometry is an error rather than a silent override.
    """
    p = Path(path)
    if not p.exists():
        raise _fail(p, "file or folder not found")
    key, reader = _find_reader(p)
    try:
        vol = reader(p)
    except InputError:
        raise
    except (MemoryError, KeyboardInterrupt):
        raise
    except Exception as exc:  # a reader that let a library error escape
        raise _fail(p, f"cannot read ({_one_line(exc)})") from exc

    meta = dict(vol.meta)
    meta["path"] = str(p)
    meta.setdefault("format", key.lstrip(".") if key != DIRECTORY else "dicom")
    arr = np.asarray(vol.array)
    meta.setdefault("dtype", str(arr.dtype))

    if affine is not None:
        if meta.get("has_geometry", True):
            raise ValueError(f"{p}: format {meta['format']} has its own geometry; affine= only applies to .npy")
        vol_affine = np.asarray(affine, dtype=np.float64)
        if vol_affine.shape != (4, 4):
            raise ValueError(f"affine must be 4x4, got shape {vol_affine.shape}")
    else:
        vol_affine = np.asarray(vol.affine, dtype=np.float64)

    return Volume(array=_validate_array(arr, p), affine=_validate_affine(vol_affine, p), meta=meta)


def _validate_array(arr: np.ndarray, path: Path) -> np.ndarray:
    if arr.dtype.kind not in "biuf":
        raise _fail(path, f"has non-numeric voxel type {arr.dtype}")
    if arr.size == 0:
        raise _fail(path, f"is empty (array shape {tuple(arr.shape)})")
    if arr.ndim not in (3, 4):
        raise _fail(path, f"has {arr.ndim} dimensions (shape {tuple(arr.shape)}); expected a 3D volume (X,Y,Z) or 4D (C,X,Y,Z)")
    spatial = arr.shape[-3:]
    if sum(s == 1 for s in spatial) >= 1:
        raise _fail(path, f"is a 2D image (spatial shape {'x'.join(map(str, spatial))}); a 3D volume is needed")
    out = np.ascontiguousarray(arr, dtype=np.float32)
    finite = np.isfinite(out)
    if not finite.all():
        n_nan = int(np.isnan(out).sum())
        n_inf = int(out.size - finite.sum() - n_nan)
        raise _fail(path, f"contains {n_nan} NaN and {n_inf} Inf voxel values (after conversion to float32)")
    return out


def _validate_affine(affine: np.ndarray, path: Path) -> np.ndarray:
    if affine.shape != (4, 4) or not np.isfinite(affine).all():
        raise _fail(path, "has an invalid voxel-to-world affine (not a finite 4x4 matrix)")
    if abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        raise _fail(path, "has a degenerate voxel-to-world affine (zero spacing or collinear axes)")
    return affine


# --------------------------------------------------------------------------- NIfTI (nibabel)
def read_nifti(path: Path) -> Volume:
    """NIfTI-1/2 via nibabel; 4D (X,Y,Z,C) -> (C,X,Y,Z). The file's best affine is kept as is."""
    import nibabel as nib

    try:
        img = nib.load(str(path))
        arr = np.asanyarray(img.dataobj)  # applies scl_slope/inter
        dtype = str(img.get_data_dtype())
        affine = np.asarray(img.affine, dtype=np.float64)
    except Exception as exc:
        raise _fail(path, f"cannot read as NIfTI ({_one_line(exc)})") from exc
    if arr.ndim == 5 and arr.shape[3] == 1:  # NIfTI vector images are X,Y,Z,1,C
        arr = arr[:, :, :, 0, :]
    if arr.ndim == 4:
        arr = np.moveaxis(arr, -1, 0)
    return Volume(arr, affine, {"format": "nifti", "dtype": dtype})


# --------------------------------------------------------------------------- SimpleITK formats
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
    import SimpleITK as sitk

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


def _make_sitk_reader(fmt: str) -> Reader:
    def read(path: Path) -> Volume:
        import SimpleITK as sitk

        try:
            img = sitk.ReadImage(str(path))
        except Exception as exc:
            raise _fail(path, f"cannot read as {fmt.upper()} ({_one_line(exc)})") from exc
        return _sitk_image_to_volume(img, path, fmt)

    read.__name__ = f"read_{fmt}"
    read.__doc__ = f"{fmt.upper()} via SimpleITK; ITK's LPS geometry converted to a RAS affine."
    return read


def read_dicom_series(path: Path) -> Volume:
    """A folder holding a DICOM series (GDCM orders slices by position; rescale slope applied).

    If the folder holds several series the one with most files is read, with a warning, and its
    UID is recorded in ``meta['dicom_series_uid']``.
    """
    import SimpleITK as sitk

    try:
        ids = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(path))
    except Exception as exc:
        raise _fail(path, f"cannot scan folder for DICOM ({_one_line(exc)})") from exc
    if not ids:
        raise _fail(path, "is a folder without a DICOM series")
    files_by_id = {uid: sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(path), uid) for uid in ids}
    uid = max(ids, key=lambda u: len(files_by_id[u]))
    if len(ids) > 1:
        warnings.warn(f"{path}: {len(ids)} DICOM series found; reading {uid} ({len(files_by_id[uid])} files)")
    files = files_by_id[uid]
    if len(files) < 2:
        raise _fail(path, "holds a single-file DICOM series (a 2D image); a 3D volume is needed")
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(files)
    try:
        img = reader.Execute()
    except Exception as exc:
        raise _fail(path, f"cannot read DICOM series ({_one_line(exc)})") from exc
    vol = _sitk_image_to_volume(img, path, "dicom")
    vol.meta.update({"dicom_series_uid": uid, "dicom_n_files": len(files)})
    return vol


# --------------------------------------------------------------------------- NumPy
def read_npy(path: Path) -> Volume:
    """A .npy array, 3D (X,Y,Z) or 4D channels-first; identity affine (1 mm, index = world)."""
    try:
        arr = np.load(str(path), allow_pickle=False)
    except Exception as exc:
        raise _fail(path, f"cannot read as .npy ({_one_line(exc)})") from exc
    return Volume(arr, np.eye(4), {"format": "npy", "dtype": str(arr.dtype), "has_geometry": False})


register_reader(".nii", read_nifti)
register_reader(".nii.gz", read_nifti)
for _suffix, _fmt in ((".nrrd", "nrrd"), (".nhdr", "nrrd"), (".mha", "mha"), (".mhd", "mha")):
    register_reader(_suffix, _make_sitk_reader(_fmt))
register_reader(".dcm", _make_sitk_reader("dicom"))  # single (multi-frame) DICOM file
register_reader(DIRECTORY, read_dicom_series)
register_reader(".npy", read_npy)
