"""One upload in a private folder: which files are accepted, and how they become a readable input.

Accepted: one NIfTI (``.nii``, ``.nii.gz``), NRRD (``.nrrd``, header and data in one file), MetaImage
(``.mha``, data in the file) or NumPy (``.npy``, never unpickled) volume, or a ``.zip`` of one DICOM
series. Everything else is refused before any reader sees it, as are headers that point at other files
(an NRRD ``data file:`` field, a MetaImage ``ElementDataFile`` other than ``LOCAL``): an upload can only
ever make the service read the bytes that were uploaded: NRRD and MetaImage uploads are parsed and
rewritten with a header written by :mod:`.inline` (refused with :class:`NotInline`, HTTP 422, when the
data is not inline).

Zips: the member count is read from the End Of Central Directory record (zip64 too) and every central
directory entry is counted, directories included, before :mod:`zipfile` parses the directory; members
are extracted flat (member folders dropped, no path leaves the upload folder; a repeated name gets a
counter, ``a.dcm``, ``a_1.dcm``, ...), with the uncompressed size counted while extracting (headers can
lie). The upload folder holds only the upload (the zip is deleted after extraction).
"""
from __future__ import annotations

import re
import struct
import shutil
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from ..errors import InputError
from .inline import NotInline, rewrite_inline

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
            path = rewrite_inline(target)  # .nrrd / .mha: a header written here, the data inline
        return Upload(folder, name, path)
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise


_EOCD = b"PK\x05\x06"
_EOCD64_LOCATOR = b"PK\x06\x07"
_EOCD64 = b"PK\x06\x06"
_CENTRAL = b"PK\x01\x02"


def _central_directory(fh, size: int, name: str) -> tuple[int, int, int]:
    """(entries, directory size, directory offset) from the End Of Central Directory record (zip64 too),
    found as :mod:`zipfile` finds it; the offset is corrected for data prepended to the zip."""
    tail = min(size, 22 + 65535)
    fh.seek(size - tail)
    data = fh.read(tail)
    at = len(data) - 22 if data[-22:-18] == _EOCD and data[-2:] == b"\0\0" else data.rfind(_EOCD)
    if at < 0 or len(data) - at < 22:
        raise BadUpload(f"{name}: not a readable zip file (no end of central directory record)")
    _, _, _, _, entries, cd_size, cd_offset, _ = struct.unpack("<4s4H2LH", data[at:at + 22])
    eocd_pos = size - tail + at
    if (entries == 0xFFFF or cd_size == 0xFFFFFFFF or cd_offset == 0xFFFFFFFF) and eocd_pos >= 20:
        fh.seek(eocd_pos - 20)
        loc = fh.read(20)
        if loc[:4] == _EOCD64_LOCATOR:
            _, _, rec_offset, _ = struct.unpack("<4sLQL", loc)
            fh.seek(eocd_pos - 20 - 56)
            rec = fh.read(56)
            if len(rec) == 56 and rec[:4] == _EOCD64:
                _, _, _, _, _, _, _, entries, cd_size, cd_offset = struct.unpack("<4sQ2H2L4Q", rec)
                eocd_pos -= 20 + 56
    if cd_size > eocd_pos:
        raise BadUpload(f"{name}: not a readable zip file (its central directory of {cd_size} bytes is larger "
                        f"than the file)")
    return entries, cd_size, eocd_pos - cd_size


def _check_directory(zpath: Path, max_members: int) -> None:
    """Refuse (413) a zip with more than ``max_members`` entries, from its EOCD count and by walking the
    central directory (without building anything in memory), before :mod:`zipfile` reads it."""
    name = zpath.name
    size = zpath.stat().st_size

    def too_many(n: int | str) -> UploadTooLarge:
        return UploadTooLarge(f"{name}: {n} entries in the zip, more than the limit of {max_members} "
                              f"(files and folders)")

    with open(zpath, "rb") as fh:
        entries, cd_size, cd_start = _central_directory(fh, size, name)
        if entries > max_members:
            raise too_many(entries)
        cap = max(1 << 20, 2048 * max_members)
        if cd_size > cap:
            raise UploadTooLarge(f"{name}: the zip's central directory of {cd_size / 2**20:.3g} MiB is over the "
                                 f"limit of {cap / 2**20:.3g} MiB (2 KiB per allowed member)")
        fh.seek(cd_start)
        count, pos, buf = 0, 0, b""
        while pos < cd_size:
            if len(buf) < 46:
                buf += fh.read(min(1 << 20, cd_size - pos + 46))
                if len(buf) < 46:
                    break
            if buf[:4] != _CENTRAL:
                break                                   # zipfile decides what a broken directory is
            n, m, k = struct.unpack("<3H", buf[28:34])
            step = 46 + n + m + k
            count += 1
            if count > max_members:
                raise too_many(f"more than {count - 1}")
            pos += step
            if step <= len(buf):
                buf = buf[step:]
            else:
                fh.seek(cd_start + pos)
                buf = b""


def _unique(base: str, names: set[str]) -> str:
    if base not in names:
        return base
    stem, dot, ext = base.rpartition(".")
    if not dot or not stem:
        stem, ext = base, ""
    k = 1
    while True:
        cand = f"{stem}_{k}" + (f".{ext}" if ext else "")
        if cand not in names:
            return cand
        k += 1


def _extract_series(zpath: Path, dest: Path, max_bytes: int, max_members: int) -> Path:
    """Extract a zip of one DICOM series into ``dest`` (flat); returns ``dest``."""
    _check_directory(zpath, max_members)
    try:
        zf = zipfile.ZipFile(zpath)
    except (zipfile.BadZipFile, OSError, ValueError, struct.error, EOFError) as exc:
        raise BadUpload(f"{zpath.name}: not a readable zip file ({exc})") from exc
    dest.mkdir()
    total, names = 0, set()
    with zf:
        entries = zf.infolist()
        if len(entries) > max_members:
            raise UploadTooLarge(f"{zpath.name}: {len(entries)} entries in the zip, more than the limit of "
                                 f"{max_members} (files and folders)")
        for m in entries:
            if m.is_dir():
                continue
            base = re.split(r"[\\/]", m.filename)[-1]
            if not base or base.startswith(".") or "__MACOSX" in m.filename:
                continue
            base = _unique(re.sub(r"[^A-Za-z0-9_.-]+", "_", base)[:120], names)
            names.add(base)
            try:
                with zf.open(m) as src, open(dest / base, "xb") as out:
                    total = _copy_limited(src, out, total, max_bytes, f"{zpath.name}: uncompressed content larger "
                                          f"than the limit of {max_bytes / 2**20:.3g} MiB")
            except InputError:
                raise
            except (zipfile.BadZipFile, RuntimeError, NotImplementedError, EOFError, OSError, ValueError,
                    struct.error, zlib_error()) as exc:
                # RuntimeError: encrypted member; NotImplementedError: unknown compression
                raise BadUpload(f"{zpath.name}: cannot extract {m.filename!r} ({exc})") from exc
    if not names:
        raise BadUpload(f"{zpath.name}: the zip holds no files (send a zip of one DICOM series)")
    return dest


def zlib_error():
    import zlib

    return zlib.error


__all__ = ["ACCEPTED", "BadUpload", "NotInline", "Upload", "UploadTooLarge", "safe_filename", "save_upload"]
