"""One upload in a private folder: which files are accepted, and how they become a readable input.

Accepted: one NIfTI (``.nii``, ``.nii.gz``), NRRD (``.nrrd``, header and data in one file), MetaImage
(``.mha``, data in the file) or NumPy (``.npy``, never unpickled) volume, or a ``.zip`` of one DICOM
series. Everything else is refused before any reader sees it, as are headers that point at other files
(an NRRD ``data file:`` field, a MetaImage ``ElementDataFile`` other than ``LOCAL``): an upload can only
ever make the service read the bytes that were uploaded.

Zips are extracted flat (member folders dropped, no path leaves the upload folder), with limits on the
number of members and on the uncompressed size counted while extracting (headers can lie).
"""
from __future__ import annotations

import re
import shutil
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from ..errors import InputError

VOLUME_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".mha", ".npy")
ZIP_SUFFIX = ".zip"
ACCEPTED = (*VOLUME_SUFFIXES, ZIP_SUFFIX)


class UploadTooLarge(InputError):
    """The upload (or a zip's content) is over the service's limit: HTTP 413."""


class BadUpload(InputError):
    """The request itself is unusable (type, name, empty, broken zip): HTTP 400."""


def suffix_of(name: str) -> str | None:
    low = name.lower()
    return next((s for s in ACCEPTED if low.endswith(s)), None)


def safe_filename(name: str | None) -> str:
    """The upload's own name, reduced to a harmless file name that keeps its suffix."""
    base = re.split(r"[\\/]", name or "")[-1]
    suffix = suffix_of(base)
    if suffix is None:
        shown = base or "(no file name)"
        raise BadUpload(f"{shown}: unsupported upload type; send one of {', '.join(ACCEPTED)} "
                        f"(.zip: one DICOM series)")
    stem = base[: -len(suffix)]
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", stem).strip("._-") or "volume"
    return stem[:100] + suffix


@dataclass
class Upload:
    """A request's private folder (mode 0700) with the uploaded file, and the path the readers get."""

    folder: Path
    filename: str        # the sanitised upload name (what messages and the result JSON call the file)
    path: Path           # the volume file, or the folder of an extracted DICOM series

    def public(self, text: str) -> str:
        """``text`` with the private folder removed from paths: messages name the uploaded file as the user
        called it, exactly as the CLI names the file it was given."""
        return text.replace(str(self.folder) + "/", "").replace(str(self.folder), "")

    def discard(self, keep: Path | None = None, rid: str = "") -> None:
        if keep is not None:
            keep.mkdir(parents=True, exist_ok=True)
            shutil.move(str(self.folder), str(keep / (rid or self.folder.name)))
        else:
            shutil.rmtree(self.folder, ignore_errors=True)


def _copy_limited(src, out, total: int, max_bytes: int, too_large: str) -> int:
    """Copy ``src`` to ``out`` in 1 MiB chunks; ``total`` (bytes so far) past ``max_bytes`` raises
    UploadTooLarge(too_large) before that chunk is written. Returns the new total."""
    while True:
        chunk = src.read(1 << 20)
        if not chunk:
            return total
        total += len(chunk)
        if total > max_bytes:
            raise UploadTooLarge(too_large)
        out.write(chunk)


def new_folder(parent: Path | None = None) -> Path:
    return Path(tempfile.mkdtemp(prefix="anymc3d-upload-", dir=None if parent is None else str(parent)))


def save_upload(stream, filename: str | None, max_bytes: int, max_unzipped: int, max_members: int,
                parent: Path | None = None) -> Upload:
    """Copy a file-like ``stream`` into a new private folder and check it; on any error the folder is removed."""
    name = safe_filename(filename)
    folder = new_folder(parent)
    try:
        target = folder / name
        with open(target, "xb") as fh:
            n = _copy_limited(stream, fh, 0, max_bytes, f"{name}: upload larger than the service's limit of "
                              f"{max_bytes / 2**20:.3g} MiB (--max-upload-mb)")
        if n == 0:
            raise BadUpload(f"{name}: the upload is empty")
        if name.lower().endswith(ZIP_SUFFIX):
            path = _extract_series(target, folder / name[: -len(ZIP_SUFFIX)], max_unzipped, max_members)
            target.unlink()
        else:
            _check_header(target)
            path = target
        return Upload(folder, name, path)
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise


def _header_text(path: Path, limit: int = 65536) -> str:
    with open(path, "rb") as fh:
        head = fh.read(limit)
    return head.decode("latin-1")


def _check_header(path: Path) -> None:
    low = path.name.lower()
    if low.endswith(".nrrd"):
        head = _header_text(path)
        header = re.split(r"\r?\n\r?\n", head, maxsplit=1)[0]
        if re.search(r"^\s*data\s*file\s*:", header, flags=re.I | re.M):
            raise BadUpload(f"{path.name}: NRRD header names a separate data file; upload an NRRD with the "
                            f"data in the file (attached header), or NIfTI")
    elif low.endswith(".mha"):
        head = _header_text(path)
        m = re.search(r"^\s*ElementDataFile\s*=\s*(\S+)", head, flags=re.M)
        if m and m.group(1).upper() != "LOCAL":
            raise BadUpload(f"{path.name}: MetaImage header names a separate data file ({m.group(1)}); "
                            f"upload an .mha with ElementDataFile = LOCAL, or NIfTI")


def _extract_series(zpath: Path, dest: Path, max_bytes: int, max_members: int) -> Path:
    """Extract a zip of one DICOM series into ``dest`` (flat); returns ``dest``."""
    try:
        zf = zipfile.ZipFile(zpath)
    except (zipfile.BadZipFile, OSError) as exc:
        raise BadUpload(f"{zpath.name}: not a readable zip file ({exc})") from exc
    dest.mkdir()
    total, names = 0, set()
    with zf:
        members = [m for m in zf.infolist() if not m.is_dir()]
        if len(members) > max_members:
            raise UploadTooLarge(f"{zpath.name}: {len(members)} files in the zip, more than the limit of {max_members}")
        for m in members:
            base = re.split(r"[\\/]", m.filename)[-1]
            if not base or base.startswith(".") or "__MACOSX" in m.filename:
                continue
            base = re.sub(r"[^A-Za-z0-9_.-]+", "_", base)[:120]
            while base in names:
                base = "_" + base
            names.add(base)
            try:
                with zf.open(m) as src, open(dest / base, "xb") as out:
                    total = _copy_limited(src, out, total, max_bytes, f"{zpath.name}: uncompressed content larger "
                                          f"than the limit of {max_bytes / 2**20:.3g} MiB")
            except (zipfile.BadZipFile, RuntimeError, NotImplementedError, EOFError, OSError) as exc:
                # RuntimeError: encrypted member; NotImplementedError: unknown compression
                raise BadUpload(f"{zpath.name}: cannot extract {m.filename!r} ({exc})") from exc
    if not names:
        raise BadUpload(f"{zpath.name}: the zip holds no files (send a zip of one DICOM series)")
    return dest
