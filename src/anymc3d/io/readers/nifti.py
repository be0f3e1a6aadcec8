"""NIfTI-1/2 via nibabel, header checked before any voxel is read (size, type, offset, raw pixdim, gzip CRC)."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Optional

import numpy as np

from anymc3d.errors import InputError
from anymc3d.io.readers.checks import _check_numeric, _fail, check_declared_size, spacing_problem
from anymc3d.io.readers.quiet import _one_line
from anymc3d.volume import Volume


def _nifti_layout(shape: tuple[int, ...]) -> tuple[int, ...]:
    """The array shape read_nifti returns for a file of ``shape``: 4D (X,Y,Z,C) -> (C,X,Y,Z)."""
    if len(shape) == 5 and shape[3] == 1:  # NIfTI vector images are X,Y,Z,1,C
        shape = shape[:3] + shape[4:]
    return (shape[3], *shape[:3]) if len(shape) == 4 else shape


def read_nifti_header(path: Path) -> Volume:
    """What :func:`read_nifti` checks from the header alone (size, voxel type, raw pixdim, the length of an
    uncompressed file), as a :class:`Volume` whose array is a read-only zero of the declared shape (no voxel
    is read or allocated; a .nii.gz is not decompressed, so its CRC is checked when it is read)."""
    img, shape, dtype, problem = _checked_header(path, verify_gzip=False)
    meta = {"format": "nifti", "dtype": str(dtype), "header_only": True}
    if problem:
        meta["_geometry_problem"] = problem
    return Volume(np.broadcast_to(np.float32(0), _nifti_layout(shape)), np.asarray(img.affine, dtype=np.float64), meta)


def _checked_header(path: Path, verify_gzip: bool = True):
    """(image, shape, dtype, geometry problem) with every header check done; ``verify_gzip``: a .nii.gz
    is decompressed once to its end (CRC, length) and the image returned is read from those bytes."""
    import nibabel as nib

    try:
        img = nib.load(str(path))  # header only; the data stays on disk
        shape = tuple(int(s) for s in img.shape)
        dtype = img.get_data_dtype()
    except Exception as exc:
        raise _fail(path, f"cannot read as NIfTI ({_one_line(exc)})") from exc
    check_declared_size(path, shape, "its NIfTI header declares")
    _check_numeric(path, dtype, "NIfTI")
    problem = _nifti_geometry_problem(path, img)
    offset = getattr(img.dataobj, "offset", None)
    nbytes = math.prod(shape) * dtype.itemsize
    if offset is not None and not path.name.lower().endswith(".gz"):
        need = int(offset) + nbytes
        have = path.stat().st_size
        if have < need:
            raise _fail(path, f"is truncated: its header declares {nbytes:,} bytes of voxel "
                              f"data from offset {offset}, the file has {max(0, have - int(offset)):,}")
    elif offset is not None and verify_gzip:
        img = _verified_gzip_nifti(path, img, int(offset) + nbytes)
    return img, shape, dtype, problem


def read_nifti(path: Path) -> Volume:
    """NIfTI-1/2 via nibabel; 4D (X,Y,Z,C) -> (C,X,Y,Z). The file's best affine is kept as is.

    The header (shape, voxel type, data offset) is checked before the data is read.
    """
    img, shape, dtype, problem = _checked_header(path)
    try:
        arr = np.asarray(img.dataobj, dtype=np.float32)  # applies scl_slope/inter, straight to float32
        affine = np.asarray(img.affine, dtype=np.float64)
    except MemoryError:
        raise
    except Exception as exc:
        raise _fail(path, f"cannot read as NIfTI ({_one_line(exc)})") from exc
    if arr.ndim == 5 and arr.shape[3] == 1:  # NIfTI vector images are X,Y,Z,1,C
        arr = arr[:, :, :, 0, :]
    if arr.ndim == 4:
        arr = np.moveaxis(arr, -1, 0)
    meta = {"format": "nifti", "dtype": str(dtype)}
    if problem:
        meta["_geometry_problem"] = problem
    return Volume(arr, affine, meta)


def _nifti_geometry_problem(path: Path, img) -> Optional[str]:
    """nibabel replaces a zero pixdim by 1 (and a negative one by its absolute value) when it loads a header,
    so a file without any voxel size would be read as 1 mm: look at the header as written. The pixdims
    define the geometry unless an sform is set (qform: pixdim x rotation; no qform/sform: pixdim alone)."""
    import gzip

    try:
        opener = gzip.open if path.name.lower().endswith(".gz") else open
        with opener(path, "rb") as fh:
            raw = type(img.header).from_fileobj(fh, check=False)
        sform, qform = int(raw["sform_code"]), int(raw["qform_code"])
        pixdim = np.asarray(raw["pixdim"], dtype=np.float64)[1:4]
    except Exception:  # the header was read once already; leave damage to the data read
        return None
    if sform > 0:
        return None
    which = "a qform and no sform" if qform > 0 else "no qform or sform"
    cause = spacing_problem(pixdim, f"its NIfTI header ({which}, so pixdim is the voxel size) declares")
    return f"{cause}, which nibabel would silently read as 1 mm (or as its absolute value)" if cause else None


#: bytes a .nii.gz may hold after the declared voxel data (padding some writers add)
_GZ_SLACK = 1 << 16



def _verified_gzip_nifti(path: Path, img, need: int):
    """Decompress a .nii.gz to its end, so that gzip's CRC and length are checked: a damaged file is refused
    instead of being read as different voxel values. Reads at most ``need`` + 64 KiB (no gzip bombs)."""
    import gzip
    import zlib

    try:
        with gzip.open(path, "rb") as fh:
            raw = fh.read(need)
            if len(raw) < need:
                raise _fail(path, f"is truncated: its header declares {need:,} bytes (header and voxel data), the "
                                  f"compressed file holds {len(raw):,}")
            tail = fh.read(_GZ_SLACK)
            if len(tail) == _GZ_SLACK and fh.read(1):
                raise _fail(path, "holds more data than its NIfTI header declares (a different or damaged file?)")
            fh.read(1)  # at the end of the stream: gzip compares CRC and length here
    except InputError:
        raise
    except (OSError, EOFError, zlib.error) as exc:  # BadGzipFile is an OSError
        raise _fail(path, f"is a damaged gzip file ({_one_line(exc)})") from exc
    return type(img).from_bytes(raw)
