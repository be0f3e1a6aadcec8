"""NumPy ``.npy`` arrays: header checked first, never unpickled; identity geometry."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from anymc3d.errors import InputError
from anymc3d.io.readers.checks import _check_numeric, _fail, check_declared_size
from anymc3d.io.readers.quiet import _one_line
from anymc3d.volume import Volume


def read_npy_header(fh) -> tuple[tuple[int, ...], bool, np.dtype]:
    """(shape, fortran_order, dtype) from the header of a .npy stream (a file or an .npz member),
    leaving ``fh`` at the array data; nothing is unpickled. ValueError for an unknown format version."""
    fmt = np.lib.format
    version = fmt.read_magic(fh)
    if version == (1, 0):
        return fmt.read_array_header_1_0(fh)
    if version in ((2, 0), (3, 0)):
        return fmt.read_array_header_2_0(fh)
    raise ValueError(f"unsupported .npy format version {version}")


def read_npy(path: Path) -> Volume:
    """A .npy array, 3D (X,Y,Z) or 4D channels-first; identity affine (1 mm, index = world).

    The header (shape, dtype, data length) is checked before the array is read; never unpickled.
    """
    _checked_npy_header(path)
    try:
        arr = np.load(str(path), allow_pickle=False)
    except MemoryError:
        raise
    except Exception as exc:
        raise _fail(path, f"cannot read as .npy ({_one_line(exc)})") from exc
    return Volume(arr, np.eye(4), {"format": "npy", "dtype": str(arr.dtype), "has_geometry": False})


def read_npy_file_header(path: Path) -> Volume:
    """What :func:`read_npy` checks before reading, as a :class:`Volume` whose array is a read-only zero of
    the declared shape (nothing read or allocated)."""
    shape, dtype = _checked_npy_header(path)
    return Volume(np.broadcast_to(np.float32(0), shape), np.eye(4),
                  {"format": "npy", "dtype": str(dtype), "has_geometry": False, "header_only": True})


def _checked_npy_header(path: Path) -> tuple[tuple[int, ...], np.dtype]:
    """The declared (shape, dtype) of a .npy file, refused when too large, not numeric or truncated."""
    try:
        with open(path, "rb") as fh:
            shape, fortran, dtype = read_npy_header(fh)
            offset = fh.tell()
    except InputError:
        raise
    except Exception as exc:
        raise _fail(path, f"cannot read as .npy ({_one_line(exc)})") from exc
    check_declared_size(path, shape, "its .npy header declares")
    if dtype.hasobject:
        raise _fail(path, f"holds Python objects (dtype {dtype}); anymc3d never unpickles, save a numeric array")
    _check_numeric(path, dtype, ".npy")
    need, have = math.prod(shape) * dtype.itemsize, path.stat().st_size - offset
    if have < need:
        raise _fail(path, f"is truncated: its header declares {need:,} bytes of array data, the file has {have:,}")
    return tuple(int(v) for v in shape), dtype
