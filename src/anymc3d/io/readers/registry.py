"""The suffix registry and :func:`read_volume`, the one entry point that finds a file's reader, runs it with
the libraries kept quiet, and applies the shared checks (:mod:`.checks`) and the geometry policy."""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional, Union

import numpy as np

from anymc3d.errors import InputError, input_warning
from anymc3d.io import options as _options
from anymc3d.io.readers.checks import _fail, _validate_array, check_layout, content_problem, geometry_problem
from anymc3d.io.readers.quiet import _mute_native, _one_line, _quiet
from anymc3d.volume import MaskPath, Volume

Reader = Callable[[Path], Volume]


#: Registry key used for directories (read as one DICOM series).
DIRECTORY = "<directory>"


_READERS: dict[str, Reader] = {}
#: suffix -> header reader: the same header checks as the reader, a read-only zero array of the declared
#: shape and the file's affine, no voxel read (``read_volume(..., header_only=True)``)
_HEADERS: dict[str, Reader] = {}


def register_reader(suffix: str, reader: Optional[Reader] = None, *, overwrite: bool = False,
                    header: Optional[Reader] = None):
    """Register ``reader`` for files ending in ``suffix`` (e.g. ``".nii.gz"``), or for folders with
    :data:`DIRECTORY`. Usable directly or as a decorator (``@register_reader(".foo")``). ``header``
    (optional): a reader of the header alone (a read-only zero array of the declared shape and the
    file's affine) that ``read_volume(..., header_only=True)`` uses; without one it reads the file.

    Why a registry: new formats plug in without touching :func:`read_volume`'s callers.
    """
    key = suffix if suffix == DIRECTORY else suffix.lower()
    if key != DIRECTORY and not key.startswith("."):
        raise ValueError(f"suffix must start with '.', got {suffix!r}")

    def _register(fn: Reader) -> Reader:
        if key in _READERS and not overwrite and _READERS[key] is not fn:
            raise ValueError(f"a reader for {key!r} is already registered (pass overwrite=True)")
        _READERS[key] = fn
        if header is not None:
            _HEADERS[key] = header
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


def read_volume(path: Union[str, Path], *, affine: Optional[np.ndarray] = None, max_voxels: Optional[int] = None,
                allow_gaps: Optional[bool] = None, series: Optional[str] = None,
                content_warnings: Optional[bool] = None, assume_spacing=None, header_only: bool = False) -> Volume:
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

    ``header_only=True``: what the header decides (every check but NaN/Inf, a .nii.gz's CRC and the
    content warnings), with a read-only zero array of the declared shape (no voxel read or allocated),
    for a format whose header reader is registered (every built-in one; a DICOM series that GDCM must
    decode, compressed or multi-frame, is read whole); other formats are read whole.
    ``meta["header_only"]`` says which it was.
    """
    if content_warnings is None:
        content_warnings = not isinstance(path, MaskPath)
    p = Path(path)
    overrides = {k: v for k, v in (("max_voxels", max_voxels), ("allow_gaps", allow_gaps), ("series", series),
                                   ("assume_spacing", assume_spacing)) if v is not None}
    previous = _options.set_reader_options(**overrides) if overrides else None
    try:
        return _read_volume(p, affine, content_warnings, header_only)
    finally:
        if previous is not None:
            _options.OPTIONS = previous


def _read_volume(p: Path, affine: Optional[np.ndarray], content_warnings: bool, header_only: bool = False) -> Volume:
    try:
        exists = p.exists()
    except (OSError, ValueError) as exc:  # name too long, NUL byte, permission on a parent
        raise _fail(p, f"cannot access ({_one_line(exc)})") from exc
    if not exists:
        raise _fail(p, "file or folder not found")
    key, reader = _find_reader(p)
    header_only = header_only and key in _HEADERS
    if header_only:
        reader = _HEADERS[key]
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
        out = arr if header_only else _validate_array(arr, p)
        if header_only:
            check_layout(arr, p)
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
    if content_warnings and not header_only:
        cause = content_problem(out)
        if cause:
            input_warning(meta, p, cause)
    return result
