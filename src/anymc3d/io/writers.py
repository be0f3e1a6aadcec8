"""Atomic writers: a crash or Ctrl-C never leaves a half-written output behind.

Everything the tool writes (NIfTI heatmaps, JSON specs, CSV tables, PNG plots, safetensors
plugins) goes through :func:`atomic_write`: the data is written to a hidden temporary file in the
destination folder (same filesystem) and moved into place with ``os.replace``, which is atomic.
"""
from __future__ import annotations

import contextlib
import os
import uuid
from pathlib import Path
from typing import Iterator, Union

import numpy as np

from anymc3d.errors import InputError

PathLike = Union[str, "os.PathLike[str]"]


@contextlib.contextmanager
def atomic_write(path: PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success rename it to ``path``, on failure delete it.

    The temporary name ends with the target's full name (``.tmp-<id>-heatmap.nii.gz``) so libraries
    that infer the format from the extension (nibabel, matplotlib, numpy) behave as for ``path``.
    The parent folder is created if needed. Usage::

        with atomic_write("out/report.json") as tmp:
            tmp.write_text(json.dumps(obj))
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".tmp-{uuid.uuid4().hex[:12]}-{target.name}")
    try:
        yield tmp
        if not tmp.exists():
            raise FileNotFoundError(f"atomic_write: nothing was written to the temporary file for {target}")
        _set_mode(tmp, target)
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def _umask() -> int:
    mask = os.umask(0o022)  # reading the umask means setting it; restored at once
    os.umask(mask)
    return mask


def _set_mode(tmp: Path, target: Path) -> None:
    """Give the new file the usual permissions: the target's own when it exists, else 0666 minus the umask.

    Libraries that write the temporary file may create it 0600 (safetensors does, as does
    ``tempfile.mkstemp``); a plugin or an image written that way would be unreadable to the group.
    """
    if tmp.is_dir() or tmp.is_symlink():
        return
    try:
        mode = target.stat().st_mode & 0o7777 if target.exists() else 0o666 & ~_umask()
        os.chmod(tmp, mode)
    except OSError:  # a filesystem without POSIX modes: keep what the library made
        pass


def write_nifti(array, affine: np.ndarray, path: PathLike) -> Path:
    """Write (X,Y,Z) or channels-first (C,X,Y,Z) ``array`` as NIfTI with ``affine`` (voxel->RAS), atomically.

    Pass ``record.input_affine`` with an array from ``canonical_to_input`` to overlay the input
    exactly. float64 is stored as float32, bool as uint8, int64 as int32 (viewers' support).
    Channels are stored last, as NIfTI readers (and :func:`read_volume`) expect.
    """
    import nibabel as nib

    target = Path(path)
    if not (target.name.lower().endswith(".nii") or target.name.lower().endswith(".nii.gz")):
        raise InputError(f"{target}: a NIfTI output must end with .nii or .nii.gz")
    if hasattr(array, "detach"):  # torch tensor
        array = array.detach().cpu().numpy()
    arr = np.asarray(array)
    if arr.ndim not in (3, 4):
        raise ValueError(f"write_nifti: expected a 3D or 4D array, got shape {arr.shape} for {target}")
    if arr.dtype == np.float64 or arr.dtype == np.float16:
        arr = arr.astype(np.float32)
    elif arr.dtype == np.bool_:
        arr = arr.astype(np.uint8)
    elif arr.dtype == np.int64:
        arr = arr.astype(np.int32)
    if arr.ndim == 4:
        arr = np.moveaxis(arr, 0, -1)
    aff = np.asarray(affine, dtype=np.float64)
    img = nib.Nifti1Image(np.ascontiguousarray(arr), aff)
    img.header.set_xyzt_units("mm", "sec")
    img.set_sform(aff, code=1)
    img.set_qform(aff, code=1)
    with atomic_write(target) as tmp:
        nib.save(img, str(tmp))
    return target


def write_json(obj, path: PathLike, default=str) -> Path:
    """``obj`` as indented JSON at ``path``, written atomically (the one JSON writer of the project)."""
    import json

    path = Path(path)
    with atomic_write(path) as tmp:
        Path(tmp).write_text(json.dumps(obj, indent=2, default=default))
    return path
