"""Read 3D medical images into a :class:`~anymc3d.volume.Volume` through one suffix registry.

Modelled on nnU-Net v2's ``imageio`` registry: a dict maps a (lower-case) file suffix to a
reader function ``reader(path) -> Volume``; a folder is read as a DICOM series. Readers return
the raw array and the nibabel-style voxel->RAS affine; :func:`read_volume` does the checks that
every format shares (dimensionality, channels, NaN/Inf, empty, degenerate affine, constant
content) and casts to float32, so a plug-in reader only has to get the geometry right.

Before any voxel is allocated, the built-in readers check the shape and voxel type that the
header declares against :attr:`~anymc3d.io.options.ReaderOptions.max_voxels` (default 2 GiB as
float32; ``--max-voxels``). DICOM series are checked for missing slices and uneven spacing
(refused unless ``--allow-gaps``) and for several series in one folder (a warning naming the one
read; ``--series UID`` chooses).

Every user-facing failure is an :class:`~anymc3d.errors.InputError` whose one-line message starts
with the offending path; every warning is one ``anymc3d: warning: <file>: <cause>`` line on
stderr and one string in ``volume.meta["warnings"]``.
"""
from __future__ import annotations

import contextlib
import logging
import math
import os
import sys
import warnings
from pathlib import Path
from typing import Callable, Optional, Union

import numpy as np

from anymc3d.errors import InputError, input_warning
from anymc3d.io import options as _options
from anymc3d.io.allocation import check_allocation
from anymc3d.volume import MaskPath, Volume

Reader = Callable[[Path], Volume]

#: Registry key used for directories (read as one DICOM series).
DIRECTORY = "<directory>"

_READERS: dict[str, Reader] = {}

# ITK/DICOM world coordinates are LPS+; nibabel affines are RAS+. Flipping x and y converts.
_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])

#: A volume is "nearly empty" when at most this fraction of its voxels differ from its minimum.
NEAR_EMPTY_FRACTION = 1e-3


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


@contextlib.contextmanager
def _quiet():
    """Libraries' own warnings (Python ``warnings``, nibabel's logger) never reach the terminal: the
    readers say what matters in their own one-line errors and warnings."""
    loggers = [logging.getLogger(name) for name in ("nibabel", "pydicom")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.CRITICAL)
    try:
        with warnings.catch_warnings(), np.errstate(all="ignore"):
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


@contextlib.contextmanager
def _keep_locale():
    """GDCM resets the C library's locale to "C" while it reads some DICOM files, which turns Python's
    default text encoding into ASCII for the rest of the process (every later ``open()`` of a UTF-8
    file fails): restore the locale afterwards."""
    import locale

    saved = locale.setlocale(locale.LC_ALL)
    try:
        yield
    finally:
        if locale.setlocale(locale.LC_ALL) != saved:
            locale.setlocale(locale.LC_ALL, saved)


@contextlib.contextmanager
def _mute_native():
    """Silence file descriptors 1 and 2 while a C++ library reads: ITK's MetaIO, NRRD and GDCM code print
    their own messages ("MetaImage: M_Read: Error parsing file") with no way to switch them off.
    The C library's locale is restored afterwards (``_keep_locale``)."""
    with _keep_locale():
        yield from _mute_native_fds()


def _mute_native_fds():
    try:
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
        saved = (os.dup(1), os.dup(2))
    except (OSError, ValueError, AttributeError):  # no real file descriptors (embedded interpreters)
        yield
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 1)
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in (*saved, devnull):
            os.close(fd)


def _sitk():
    """SimpleITK with ITK's C++ warnings switched off (they go straight to the terminal otherwise)."""
    import SimpleITK as sitk

    sitk.ProcessObject.SetGlobalWarningDisplay(False)
    return sitk


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


# --------------------------------------------------------------------------- size guard
def check_declared_size(path: Path | str, shape, what: str = "header declares") -> int:
    """Refuse a volume whose declared shape holds more values than the limit, before allocating it.

    ``shape`` includes channels/components. Returns the number of values. The reader's use of the one
    allocation guard (:func:`anymc3d.io.allocation.check_allocation`).
    """
    return check_allocation(path, shape, what, done="nothing was read")


# --------------------------------------------------------------------------- read_volume
def read_volume(path: Union[str, Path], *, affine: Optional[np.ndarray] = None, max_voxels: Optional[int] = None,
                allow_gaps: Optional[bool] = None, series: Optional[str] = None,
                content_warnings: Optional[bool] = None, assume_spacing=None) -> Volume:
    """Read an image file or DICOM series folder into a validated float32 :class:`Volume`.

    The array is (X, Y, Z) or channels-first (C, X, Y, Z); ``affine`` maps voxel indices to RAS+
    millimetres exactly as the file states (no reorientation here, so outputs can be written
    back in the input's own grid). ``meta`` holds ``path``, ``format``, the original ``dtype`` and,
    when there is something to say, ``warnings`` (a list of one-line strings, also printed).

    ``affine`` overrides the identity geometry of formats that carry none (``.npy``); passing it
    for a format with its own geometry is an error rather than a silent override.
    ``max_voxels`` / ``allow_gaps`` / ``series`` override the process-wide reader options for this
    call. ``content_warnings`` (default: on, off for a :class:`~anymc3d.volume.MaskPath`) warns about
    a constant or nearly empty volume.

    Degenerate geometry (a zero, negative or non-finite voxel size, a singular or non-finite affine) is
    refused, naming it; ``assume_spacing=(x, y, z)`` (``--assume-spacing``) reads such a file (and a .npy)
    with that spacing and identity directions instead, with a warning that travels into every prediction.
    """
    if content_warnings is None:
        content_warnings = not isinstance(path, MaskPath)
    p = Path(path)
    overrides = {k: v for k, v in (("max_voxels", max_voxels), ("allow_gaps", allow_gaps), ("series", series),
                                   ("assume_spacing", assume_spacing)) if v is not None}
    previous = _options.set_reader_options(**overrides) if overrides else None
    try:
        return _read_volume(p, affine, content_warnings)
    finally:
        if previous is not None:
            _options.OPTIONS = previous


def _read_volume(p: Path, affine: Optional[np.ndarray], content_warnings: bool) -> Volume:
    try:
        exists = p.exists()
    except (OSError, ValueError) as exc:  # name too long, NUL byte, permission on a parent
        raise _fail(p, f"cannot access ({_one_line(exc)})") from exc
    if not exists:
        raise _fail(p, "file or folder not found")
    key, reader = _find_reader(p)
    try:
        with _quiet(), _mute_native():
            vol = reader(p)
    except InputError:
        raise
    except KeyboardInterrupt:
        raise
    except MemoryError as exc:
        raise _fail(p, "not enough memory to read it (lower the volume size, or free memory)") from exc
    except Exception as exc:  # a reader that let a library error escape
        raise _fail(p, f"cannot read ({_one_line(exc)})") from exc

    meta = dict(vol.meta)
    meta["path"] = str(p)
    meta.setdefault("format", key.lstrip(".") if key != DIRECTORY else "dicom")
    arr = np.asarray(vol.array)
    meta.setdefault("dtype", str(arr.dtype))

    problem = meta.pop("_geometry_problem", None)
    assume = _options.current().assume_spacing
    if affine is not None:
        if meta.get("has_geometry", True):
            raise ValueError(f"{p}: format {meta['format']} has its own geometry; affine= only applies to .npy")
        vol_affine = np.asarray(affine, dtype=np.float64)
        if vol_affine.shape != (4, 4):
            raise ValueError(f"affine must be 4x4, got shape {vol_affine.shape}")
    else:
        vol_affine = np.asarray(vol.affine, dtype=np.float64)
        if not meta.get("has_geometry", True) and assume is not None:
            problem = problem or f"a .{meta['format']} file has no geometry"

    try:
        out = _validate_array(arr, p)
    except MemoryError as exc:
        raise _fail(p, "not enough memory to convert it to float32") from exc
    problem = problem or geometry_problem(vol_affine)
    if problem:
        if assume is None:
            raise _fail(p, f"{problem}; refused, because the voxel size decides the resampling and the slices. To "
                           f"read it anyway, give the spacing with --assume-spacing X,Y,Z (mm; identity directions)")
        vol_affine = np.diag([*assume, 1.0])
        meta.setdefault("_pending_warnings", []).insert(0, (
            f"{problem}; read with the assumed spacing {'x'.join(f'{v:g}' for v in assume)} mm and identity "
            f"directions (--assume-spacing): sizes and orientation are not the scan's own"))
        meta["assumed_spacing"] = list(assume)
    result = Volume(array=out, affine=vol_affine, meta=meta)
    pending = meta.pop("_pending_warnings", [])
    for cause in pending:
        input_warning(meta, p, cause)
    if content_warnings:
        cause = content_problem(out)
        if cause:
            input_warning(meta, p, cause)
    return result


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
    channels = _options.current().channels
    if arr.ndim == 4 and channels is not None and arr.shape[0] not in channels:
        raise _fail(path, f"has {arr.shape[0]} channels (4D, read as C,X,Y,Z = {'x'.join(map(str, arr.shape))}); the "
                          f"backbone takes {' or '.join(map(str, channels))}: give each sequence as its own 3D file "
                          f"(one manifest image column each)")
    out = np.ascontiguousarray(arr, dtype=np.float32)
    finite = np.isfinite(out)
    if not finite.all():
        n_nan = int(np.isnan(out).sum())
        n_inf = int(out.size - finite.sum() - n_nan)
        raise _fail(path, f"contains {n_nan} NaN and {n_inf} Inf voxel values (after conversion to float32)")
    return out


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


def _check_numeric(path: Path, dtype, fmt: str) -> None:
    dt = np.dtype(dtype)
    if dt.fields is not None or dt.kind not in "biuf":
        raise _fail(path, f"has voxel type {dt} in its {fmt} header; anymc3d reads integer or floating-point volumes")


# --------------------------------------------------------------------------- NIfTI (nibabel)
def read_nifti(path: Path) -> Volume:
    """NIfTI-1/2 via nibabel; 4D (X,Y,Z,C) -> (C,X,Y,Z). The file's best affine is kept as is.

    The header (shape, voxel type, data offset) is checked before the data is read.
    """
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
    elif offset is not None:
        img = _verified_gzip_nifti(path, img, int(offset) + nbytes)
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


# --------------------------------------------------------------------------- DICOM series
_UNDEFINED_LENGTH = 0xFFFFFFFF
_PIXEL_DATA = 0x7FE00010


def _floats(value, n: int) -> Optional[np.ndarray]:
    try:
        v = np.array([float(x) for x in value], dtype=np.float64)
    except (TypeError, ValueError):
        return None
    return v if v.shape == (n,) and np.isfinite(v).all() else None


def _dicom_header(f: Path, folder: Path):
    """pydicom's header of one file (pixel data not read, large values deferred), or None for a non-DICOM file.

    Every declared element length must fit in the file: GDCM allocates what a header declares, so a
    damaged length field would otherwise cost gigabytes before any error."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        ds = pydicom.dcmread(str(f), defer_size=256)  # large values (pixel data) are not read, only located
    except InvalidDicomError:
        return None  # not DICOM (a README, a JPEG): ignored, as GDCM ignores it
    except Exception as exc:
        raise _fail(folder, f"{f.name} is a damaged DICOM file ({_one_line(exc)})") from exc
    size = f.stat().st_size
    meta = getattr(ds, "file_meta", None)
    for elem in [*(meta._dict.values() if meta is not None else ()), *ds._dict.values()]:
        length = getattr(elem, "length", 0) or 0
        if length != _UNDEFINED_LENGTH and length > size:
            raise _fail(folder, f"{f.name} is a damaged DICOM file: element {elem.tag} declares {length:,} bytes, "
                                f"the file has {size:,}")
    try:  # every header value must parse as its VR (GDCM reads a damaged header differently, at great cost)
        for group in ((meta,) if meta is not None else ()) + (ds,):
            for tag in list(group.keys()):
                if tag != _PIXEL_DATA:
                    group[tag]
    except Exception as exc:
        raise _fail(folder, f"{f.name} is a damaged DICOM file ({_one_line(exc)})") from exc
    if meta is None or "TransferSyntaxUID" not in meta or any((int(t) >> 16) == 0x0002 for t in ds._dict):
        raise _fail(folder, f"{f.name} is a damaged DICOM file (its file meta information is incomplete)")
    pixels = ds._dict.get(_PIXEL_DATA)
    if pixels is None:
        raise _fail(folder, f"{f.name} is a DICOM file without pixel data (not an image)")
    length = getattr(pixels, "length", None)
    if length is None:
        length = len(pixels.value or b"")
    syntax = getattr(meta, "TransferSyntaxUID", None) if meta is not None else None
    compressed = bool(getattr(syntax, "is_compressed", False))
    if not compressed and length != _UNDEFINED_LENGTH:
        try:
            need = (int(_get(ds, "Rows", 0)) * int(_get(ds, "Columns", 0)) * int(_get(ds, "SamplesPerPixel", 1))
                    * max(1, int(_get(ds, "NumberOfFrames", 1) or 1)) * int(_get(ds, "BitsAllocated", 16)) + 7) // 8
        except (TypeError, ValueError) as exc:
            raise _fail(folder, f"{f.name} is a damaged DICOM file ({_one_line(exc)})") from exc
        if length < need or need == 0:
            raise _fail(folder, f"{f.name} is a damaged DICOM file: its pixel data holds {length:,} bytes, its header "
                                f"(Rows x Columns x SamplesPerPixel x BitsAllocated) declares {need:,}")
    return ds


def _get(ds, keyword: str, default=None):
    try:
        v = ds.get(keyword, default)
        return default if v is None else v
    except Exception:  # a value that does not parse as its VR
        return default


def _scan_dicom_folder(folder: Path) -> dict[str, list[tuple[Path, object]]]:
    """SeriesInstanceUID -> [(file, header)] for the DICOM files directly in ``folder`` (not sub-folders)."""
    series: dict[str, list] = {}
    for f in sorted(p for p in folder.iterdir() if p.is_file()):
        ds = _dicom_header(f, folder)
        if ds is None:
            continue
        uid = str(_get(ds, "SeriesInstanceUID", "") or "").strip() or "(no SeriesInstanceUID)"
        series.setdefault(uid, []).append((f, ds))
    return series


def _slice_table(folder: Path, items: list) -> tuple[list[tuple[Path, object]], list[str], Optional[np.ndarray]]:
    """Check one series' files (same size and orientation, declared size within the limit) and sort them
    along the slice normal; refuse duplicates, and gaps or uneven spacing unless --allow-gaps.
    Returns the sorted files and warning texts."""
    opts = _options.current()
    dims = []
    for f, ds in items:
        try:
            dims.append((int(_get(ds, "Rows", 0)), int(_get(ds, "Columns", 0)), int(_get(ds, "SamplesPerPixel", 1)),
                         max(1, int(_get(ds, "NumberOfFrames", 1) or 1))))
        except (TypeError, ValueError):
            raise _fail(folder, f"{f.name} has an invalid Rows/Columns/SamplesPerPixel/NumberOfFrames")
    if len(set(d[:3] for d in dims)) > 1:
        i = next(i for i, d in enumerate(dims) if d[:3] != dims[0][:3])
        raise _fail(folder, f"the DICOM files of one series have different sizes ({items[0][0].name}: "
                            f"{dims[0][0]}x{dims[0][1]}, {items[i][0].name}: {dims[i][0]}x{dims[i][1]})")
    rows, cols, spp, _ = dims[0]
    check_declared_size(folder, (cols, rows, sum(d[3] for d in dims), *((spp,) if spp > 1 else ())),
                        f"its {len(items)} DICOM files declare")
    files = [f for f, _ in items]
    if len(items) < 2:
        return items, [], None
    pos = [_floats(_get(ds, "ImagePositionPatient"), 3) for _, ds in items]
    ori = [_floats(_get(ds, "ImageOrientationPatient"), 6) for _, ds in items]
    if any(p is None for p in pos) or any(o is None for o in ori):
        return items, ["some DICOM files have no valid ImagePositionPatient/ImageOrientationPatient: slice order "
                       "and spacing cannot be checked"], None
    o0 = ori[0]
    bad = next((i for i, o in enumerate(ori) if np.abs(o - o0).max() > 1e-3), None)
    if bad is not None:
        raise _fail(folder, f"the DICOM files of one series have different slice orientations "
                            f"({files[0].name} and {files[bad].name})")
    normal = np.cross(o0[:3], o0[3:])
    if not np.linalg.norm(normal) > 1e-6:
        raise _fail(folder, f"{files[0].name} has an invalid ImageOrientationPatient {o0.tolist()}")
    normal /= np.linalg.norm(normal)
    z = np.array([float(p @ normal) for p in pos])
    order = np.argsort(z, kind="stable")
    files, s = [files[i] for i in order], z[order]
    items = [items[i] for i in order]
    positions = np.stack([pos[i] for i in order])
    steps = np.diff(s)
    m = float(np.median(steps))
    dup = np.flatnonzero(steps <= max(1e-3, 0.01 * m))
    if dup.size:
        k = int(dup[0])
        raise _fail(folder, f"{files[k].name} and {files[k + 1].name} lie at the same slice position ({s[k]:.4g} mm "
                            f"along the slice normal): several acquisitions or time points in one series; put each "
                            f"in its own folder")
    uneven = np.flatnonzero(np.abs(steps - m) > 0.1 * m)
    if not uneven.size:
        return items, [], positions
    k = int(uneven[np.argmax(np.abs(steps[uneven] - m))])
    step = float(steps[k])
    if step > 1.5 * m:
        what = (f"slice missing: a gap of {step:.3g} mm between slice positions {s[k]:.4g} and {s[k + 1]:.4g} mm "
                f"(about {round(step / m) - 1} slice(s)) where the other slices are {m:.3g} mm apart")
    else:
        what = (f"uneven slice spacing: {step:.3g} mm between slice positions {s[k]:.4g} and {s[k + 1]:.4g} mm "
                f"where the other slices are {m:.3g} mm apart")
    if not opts.allow_gaps:
        raise _fail(folder, f"{what} ({len(uneven)} uneven step(s) in {len(files)} files); refused because the "
                            f"volume would be distorted; pass --allow-gaps to read it anyway")
    return items, [f"{what}; read anyway (--allow-gaps) on a uniform grid, so the volume is distorted"], positions


def _pydicom_volume(folder: Path, items: list, positions: np.ndarray) -> Volume:
    """An uncompressed single-frame series read by pydicom (no GDCM): slices stacked in position order,
    RescaleSlope/Intercept applied, affine from ImageOrientationPatient, PixelSpacing and the positions."""
    slices = []
    for f, ds in items:
        try:
            a = np.asarray(ds.pixel_array)
        except Exception as exc:
            raise _fail(folder, f"cannot read the pixel data of {f.name} ({_one_line(exc)})") from exc
        slope = float(_get(ds, "RescaleSlope", 1.0) or 1.0)
        inter = float(_get(ds, "RescaleIntercept", 0.0) or 0.0)
        dtype = a.dtype
        if a.ndim == 3:  # (rows, columns, samples)
            a = np.moveaxis(a, -1, 0)
        slices.append(a.astype(np.float32) * np.float32(slope) + np.float32(inter)
                      if (slope, inter) != (1.0, 0.0) else a)
    arr = np.stack(slices, axis=-1)  # (rows, cols, z) or (C, rows, cols, z)
    arr = np.swapaxes(arr, -3, -2)   # -> (x = column, y = row, z)
    ds0 = items[0][1]
    o = _floats(_get(ds0, "ImageOrientationPatient"), 6)
    raw_sp = _get(ds0, "PixelSpacing")
    sp = _floats(raw_sp, 2)
    problem = None
    if sp is None:
        problem = (f"{items[0][0].name} has no valid PixelSpacing ({raw_sp!r:.40}): its voxel size is unknown"
                   if raw_sp is not None else f"{items[0][0].name} has no PixelSpacing: its voxel size is unknown")
        sp = np.array([1.0, 1.0])
    elif not (sp > 0).all():
        problem = spacing_problem(sp, f"{items[0][0].name} has PixelSpacing with")
        sp = np.where(sp > 0, sp, 1.0)
    lps = np.eye(4)
    lps[:3, 0] = o[:3] * sp[1]  # along a row: increasing column index, spaced by the column spacing
    lps[:3, 1] = o[3:] * sp[0]
    lps[:3, 2] = (positions[-1] - positions[0]) / (len(items) - 1)
    lps[:3, 3] = positions[0]
    ras = np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps
    meta = {"format": "dicom", "dtype": str(dtype)}
    if problem:
        meta["_geometry_problem"] = problem
    return Volume(arr, ras, meta)


def read_dicom_series(path: Path) -> Volume:
    """A folder holding a DICOM series (sorted along the slice normal; rescale slope applied by GDCM).

    The folder is scanned with pydicom (headers only, lengths checked against the file sizes) and only
    screened files are handed to SimpleITK/GDCM. Several series: the one with most files is read (or
    ``--series UID``), with a one-line warning naming it; its UID is in ``meta['dicom_series_uid']``.
    A missing slice, uneven spacing, duplicate positions, or files of different sizes/orientations are
    refused (``--allow-gaps`` reads gaps and uneven spacing, with a warning).
    """
    sitk = _sitk()
    opts = _options.current()
    try:
        series = _scan_dicom_folder(path)
    except InputError:
        raise
    except OSError as exc:
        raise _fail(path, f"cannot scan folder for DICOM ({_one_line(exc)})") from exc
    if not series:
        subdirs = sorted(p.name for p in path.iterdir() if p.is_dir())[:3]
        hint = f" (sub-folders are not searched: {', '.join(subdirs)}; give the series folder itself)" if subdirs else ""
        raise _fail(path, f"is a folder without a DICOM series{hint}")
    ids = sorted(series)
    pending: list[str] = []
    if opts.series is not None:
        if opts.series not in series:
            raise _fail(path, f"has no DICOM series {opts.series} (--series); series here: "
                              + ", ".join(f"{u} ({len(series[u])} files)" for u in ids))
        uid = opts.series
    else:
        uid = max(ids, key=lambda u: len(series[u]))
        if len(ids) > 1:
            others = ", ".join(f"{u} ({len(series[u])} files)" for u in ids if u != uid)
            pending.append(f"{len(ids)} DICOM series in this folder; reading {uid} ({len(series[uid])} files), "
                           f"not {others}; choose with --series UID")
    items, notes, positions = _slice_table(path, series[uid])
    files = [f for f, _ in items]
    pending += notes
    uncompressed = all(not getattr(getattr(ds.file_meta, "TransferSyntaxUID", None), "is_compressed", True)
                       and int(_get(ds, "NumberOfFrames", 1) or 1) == 1 for _, ds in items)
    if len(files) >= 2 and positions is not None and uncompressed:
        vol = _pydicom_volume(path, items, positions)
    elif len(files) < 2:
        reader = _sitk_header(files[0], "dicom")
        try:
            img = reader.Execute()
        except Exception as exc:
            raise _fail(path, f"cannot read DICOM file {files[0].name} ({_one_line(exc)})") from exc
        if img.GetDimension() < 3 or img.GetDepth() < 2:
            raise _fail(path, "holds a single-file DICOM series (a 2D image); a 3D volume is needed")
    else:
        reader = sitk.ImageSeriesReader()
        reader.SetFileNames([str(f) for f in files])
        try:
            img = reader.Execute()
        except Exception as exc:
            raise _fail(path, f"cannot read DICOM series ({_one_line(exc)})") from exc
    if not (len(files) >= 2 and positions is not None and uncompressed):
        vol = _sitk_image_to_volume(img, path, "dicom")
    vol.meta.update({"dicom_series_uid": uid, "dicom_n_files": len(files)})
    if pending:
        vol.meta["_pending_warnings"] = pending  # printed by read_volume once the volume is valid
    return vol


# --------------------------------------------------------------------------- NumPy
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
    try:
        arr = np.load(str(path), allow_pickle=False)
    except MemoryError:
        raise
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
