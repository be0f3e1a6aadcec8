"""DICOM series folders: screened with pydicom (headers only, lengths checked against the file sizes),
sorted along the slice normal, gaps and several series handled; read by pydicom or SimpleITK/GDCM."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np

from anymc3d.errors import InputError
from anymc3d.io import options as _options
from anymc3d.io.readers.checks import _fail, check_declared_size, spacing_problem
from anymc3d.io.readers.itk import _sitk, _sitk_header, _sitk_image_to_volume
from anymc3d.io.readers.quiet import _one_line
from anymc3d.volume import Volume

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
    ras, problem = _series_geometry(items, positions)
    meta = {"format": "dicom", "dtype": str(dtype)}
    if problem:
        meta["_geometry_problem"] = problem
    return Volume(arr, ras, meta)


def _series_geometry(items: list, positions: np.ndarray) -> tuple[np.ndarray, Optional[str]]:
    """The RAS affine of a sorted series (ImageOrientationPatient, PixelSpacing and the slice positions)
    and the geometry problem to report, if any (PixelSpacing missing, zero or negative)."""
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
    return np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps, problem


def read_dicom_series(path: Path) -> Volume:
    """A folder holding a DICOM series (sorted along the slice normal; rescale slope applied by GDCM).

    The folder is scanned with pydicom (headers only, lengths checked against the file sizes) and only
    screened files are handed to SimpleITK/GDCM. Several series: the one with most files is read (or
    ``--series UID``), with a one-line warning naming it; its UID is in ``meta['dicom_series_uid']``.
    A missing slice, uneven spacing, duplicate positions, or files of different sizes/orientations are
    refused (``--allow-gaps`` reads gaps and uneven spacing, with a warning).
    """
    uid, items, positions, pending = _chosen_series(path)
    files = [f for f, _ in items]
    if _pydicom_reads(items, positions):
        vol = _pydicom_volume(path, items, positions)
    elif len(files) < 2:
        reader = _sitk_header(files[0], "dicom")
        try:
            img = reader.Execute()
        except Exception as exc:
            raise _fail(path, f"cannot read DICOM file {files[0].name} ({_one_line(exc)})") from exc
        if img.GetDimension() < 3 or img.GetDepth() < 2:
            raise _fail(path, "holds a single-file DICOM series (a 2D image); a 3D volume is needed")
        vol = _sitk_image_to_volume(img, path, "dicom")
    else:
        reader = _sitk().ImageSeriesReader()
        reader.SetFileNames([str(f) for f in files])
        try:
            img = reader.Execute()
        except Exception as exc:
            raise _fail(path, f"cannot read DICOM series ({_one_line(exc)})") from exc
        vol = _sitk_image_to_volume(img, path, "dicom")
    return _with_series_meta(vol, uid, len(files), pending)


def read_dicom_series_header(path: Path) -> Volume:
    """What :func:`read_dicom_series` checks, from the files' headers alone (pydicom, pixel data deferred):
    the series chosen, sizes, orientations, slice order, gaps, the declared size and the geometry, with a
    read-only zero array of the series' shape. Only a series that pydicom itself would read (two or more
    uncompressed single-frame files with positions) has its geometry known from the headers; any other
    (compressed, multi-frame, one file, no positions: GDCM decides those) is read whole."""
    uid, items, positions, pending = _chosen_series(path)
    if not _pydicom_reads(items, positions):
        return read_dicom_series(path)
    ds0 = items[0][1]
    rows, cols, spp = (int(_get(ds0, k, d)) for k, d in (("Rows", 0), ("Columns", 0), ("SamplesPerPixel", 1)))
    shape = ((spp,) if spp > 1 else ()) + (cols, rows, len(items))
    ras, problem = _series_geometry(items, positions)
    meta = {"format": "dicom", "dtype": _stored_dtype(items), "header_only": True}
    if problem:
        meta["_geometry_problem"] = problem
    return _with_series_meta(Volume(np.broadcast_to(np.float32(0), shape), ras, meta), uid, len(items), pending)


def _stored_dtype(items: list) -> str:
    """The dtype the pixel data would be read as (float32 once a rescale applies)."""
    if any((float(_get(ds, "RescaleSlope", 1.0) or 1.0), float(_get(ds, "RescaleIntercept", 0.0) or 0.0)) != (1.0, 0.0)
           for _, ds in items):
        return "float32"
    ds0 = items[0][1]
    bits = int(_get(ds0, "BitsAllocated", 16))
    return f"{'int' if int(_get(ds0, 'PixelRepresentation', 0)) else 'uint'}{bits}" if bits in (8, 16, 32) else "unknown"


def _pydicom_reads(items: list, positions: Optional[np.ndarray]) -> bool:
    """pydicom reads the series (uncompressed single-frame files with positions); GDCM reads any other."""
    return len(items) >= 2 and positions is not None and all(
        not getattr(getattr(ds.file_meta, "TransferSyntaxUID", None), "is_compressed", True)
        and int(_get(ds, "NumberOfFrames", 1) or 1) == 1 for _, ds in items)


def _with_series_meta(vol: Volume, uid: str, n_files: int, pending: list[str]) -> Volume:
    vol.meta.update({"dicom_series_uid": uid, "dicom_n_files": n_files})
    if pending:
        vol.meta["_pending_warnings"] = pending  # printed by read_volume once the volume is valid
    return vol


def _chosen_series(path: Path) -> tuple[str, list, Optional[np.ndarray], list[str]]:
    """(series UID, its sorted (file, header) items, slice positions or None, warnings to print) for the
    series ``--series`` names, or the one with most files."""
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
    return uid, items, positions, pending + notes
