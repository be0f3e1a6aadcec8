"""Uploaded NRRD / MetaImage files rewritten so that a reader can only ever see the uploaded bytes.

Both formats may name another file for the data (NRRD ``data file:``, MetaImage ``ElementDataFile``),
and ITK's NrrdIO / MetaIO accept many spellings of those fields (any case, ``datafile``, spaces before
the separator, ``=`` or ``:``, ``\\n`` / ``\\r\\n`` / ``\\r`` line endings, headers of any length).
Matching one spelling is not enough, so an upload is not checked and then handed on: it is **parsed
here** (tolerantly: a key is compared lowercased with whitespace, ``_`` and ``-`` removed), refused
when its data is not inline, and **rewritten** into a new file in the upload's private folder: a header
written by this module from a whitelist of known fields, with values re-emitted from what was parsed
(numbers re-formatted, enumerations from fixed sets), followed by the uploaded data bytes unchanged.
Whatever ITK then parses, the header is one this module wrote and its data is ``LOCAL``.

Refused (:class:`NotInline`, HTTP 422): any NRRD ``data file`` / ``datafile`` field, NRRD ``line skip``
/ ``byte skip`` other than 0, a MetaImage ``ElementDataFile`` other than ``LOCAL`` (or none), a
MetaImage ``HeaderSize`` other than 0, a value a known field cannot hold, a header line longer than
:data:`MAX_LINE`. Dropped: comments, NRRD ``key:=value`` pairs and every field not in the whitelist
(descriptive metadata such as ``content``-like free text in MetaImage, ``Modality``, ``Comment``).
"""
from __future__ import annotations

import re
import shutil
from pathlib import Path

from ..errors import InputError

MAX_LINE = 1 << 20          # one header line (a comment included) at most 1 MiB
_CHUNK = 1 << 20


class NotInline(InputError):
    """The upload's header points at data outside the upload, or cannot be rewritten safely: HTTP 422."""


def norm_key(key: str) -> str:
    return re.sub(r"[\s_\-]+", "", key).lower()


class _Lines:
    """Header lines of a binary file, with ``\\n``, ``\\r\\n`` and ``\\r`` endings (as NrrdIO's
    ``airOneLine``); :meth:`offset` is where the next line (or the data) starts."""

    _END = re.compile(rb"\r\n|\r|\n")

    def __init__(self, fh, name: str) -> None:
        self.fh, self.name = fh, name
        self.buf = b""
        self.i = 0            # index of the next line in buf
        self.pos = 0          # file offset of buf[0]
        self.eof = False

    def _fill(self) -> bool:
        if self.eof:
            return False
        chunk = self.fh.read(_CHUNK)
        if not chunk:
            self.eof = True
            return False
        self.pos += self.i
        self.buf = self.buf[self.i:] + chunk
        self.i = 0
        return True

    def _too_long(self) -> NotInline:
        return NotInline(f"{self.name}: header line longer than {MAX_LINE >> 20} MiB; refused")

    def next(self) -> bytes | None:
        """The next line without its ending; None at the end of the file."""
        while True:
            m = self._END.search(self.buf, self.i)
            # a '\r' as the buffer's last byte may be the first half of '\r\n': read on first
            if m and not (m.group() == b"\r" and m.end() == len(self.buf) and not self.eof):
                line = self.buf[self.i:m.start()]
                self.i = m.end()
                if len(line) > MAX_LINE:
                    raise self._too_long()
                return line
            if len(self.buf) - self.i > MAX_LINE + 2:
                raise self._too_long()
            if not self._fill():
                if m:  # the file ends with '\r'
                    continue
                if self.i >= len(self.buf):
                    return None
                line = self.buf[self.i:]
                self.i = len(self.buf)
                return line

    def offset(self) -> int:
        return self.pos + self.i


def _text(line: bytes) -> str:
    return line.decode("latin-1")


def _copy_rest(src, start: int, out) -> None:
    src.seek(start)
    shutil.copyfileobj(src, out, _CHUNK)


# ------------------------------------------------------------------------------------------ NRRD
#: normalised key -> the spelling written (NrrdIO's canonical field names)
NRRD_FIELDS = {
    "type": "type", "dimension": "dimension", "spacedimension": "space dimension", "space": "space",
    "sizes": "sizes", "spacings": "spacings", "thicknesses": "thicknesses", "axismins": "axis mins",
    "axismaxs": "axis maxs", "spacedirections": "space directions", "centers": "centers",
    "centerings": "centers", "kinds": "kinds", "labels": "labels", "units": "units",
    "spaceunits": "space units", "spaceorigin": "space origin", "measurementframe": "measurement frame",
    "endian": "endian", "encoding": "encoding", "blocksize": "block size", "min": "min", "max": "max",
    "oldmin": "old min", "oldmax": "old max", "sampleunits": "sample units", "content": "content",
}
_NRRD_DATAFILE = {"datafile"}
_NRRD_SKIPS = {"lineskip": "line skip", "byteskip": "byte skip"}
_NRRD_MAGIC = re.compile(rb"NRRD000[1-9]")


def rewrite_nrrd(src: Path, dst: Path, name: str | None = None) -> list[str]:
    """Write ``dst``: ``src``'s NRRD with a whitelisted header and the data inline. Returns the dropped
    field names (for tests and logs)."""
    name = name or src.name
    dropped: list[str] = []
    kept: dict[str, str] = {}
    with open(src, "rb") as fh:
        lines = _Lines(fh, name)
        magic = lines.next()
        if magic is None or not _NRRD_MAGIC.fullmatch(magic.strip()):
            raise NotInline(f"{name}: not an NRRD file (the first line must be NRRD0001 ... NRRD0005)")
        while True:
            raw = lines.next()
            if raw is None:
                raise NotInline(f"{name}: NRRD header without the blank line that starts the data; upload an "
                                f"NRRD with the data in the file (attached header), or NIfTI")
            if raw == b"":
                break                                   # the blank line: the data follows
            text = _text(raw)
            if text.lstrip().startswith("#") or not text.strip():
                continue
            colon = text.find(":")
            if colon < 0:
                dropped.append(text.strip()[:40])
                continue
            key, value = text[:colon], text[colon + 1:]
            nk = norm_key(key)
            if value.startswith("="):                  # key:=value pair: metadata, never used for reading
                if nk in _NRRD_DATAFILE:
                    raise _nrrd_datafile(name)
                dropped.append(key.strip()[:40])
                continue
            if nk in _NRRD_DATAFILE or nk.startswith("datafile"):
                raise _nrrd_datafile(name)
            if nk in _NRRD_SKIPS:
                _only_zero(name, f"NRRD '{_NRRD_SKIPS[nk]}'", value, "an NRRD whose data starts right after the header")
                continue
            if _dropped(nk, NRRD_FIELDS, key, dropped):
                continue
            value = value.strip()
            if any(ord(c) < 32 for c in value):
                raise NotInline(f"{name}: NRRD field {NRRD_FIELDS[nk]!r} holds control characters; refused")
            out_key = NRRD_FIELDS[nk]
            if out_key in kept:
                raise NotInline(f"{name}: NRRD field {out_key!r} given twice; refused")
            kept[out_key] = value
        start = lines.offset()
        for need in ("type", "dimension", "sizes", "encoding"):
            if need not in kept:
                raise NotInline(f"{name}: NRRD header has no {need!r} field")
        header = _text(magic.strip()) + "\n" + "".join(f"{k}: {v}\n" for k, v in kept.items()) + "\n"
        with open(dst, "xb") as out:
            out.write(header.encode("latin-1"))
            _copy_rest(fh, start, out)
    return dropped


def _only_zero(name: str, field: str, value: str, upload: str) -> None:
    """A header field that offsets the data (NRRD line/byte skip, MetaImage HeaderSize): only 0 is served."""
    if value.strip() not in ("0", ""):
        raise NotInline(f"{name}: {field} = {value.strip()[:20]} is not supported by the service; upload {upload}")


def _dropped(nk: str, fields: dict, key: str, dropped: list[str]) -> bool:
    """True (and the key recorded in ``dropped``) when a header key is outside the format's whitelist."""
    if nk in fields:
        return False
    dropped.append(key.strip()[:40])
    return True


def _nrrd_datafile(name: str) -> NotInline:
    return NotInline(f"{name}: NRRD header names a separate data file; upload an NRRD with the data in the "
                     f"file (attached header), or NIfTI")


# ------------------------------------------------------------------------------------------ MetaImage
_NUM = r"[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?"
_INT = re.compile(r"[+-]?\d+")
_NUMBER = re.compile(_NUM)
_ELEMENT_TYPES = {f"MET_{t}" for t in (
    "CHAR", "UCHAR", "SHORT", "USHORT", "INT", "UINT", "LONG", "ULONG", "LONG_LONG", "ULONG_LONG", "FLOAT",
    "DOUBLE", "CHAR_ARRAY", "UCHAR_ARRAY", "SHORT_ARRAY", "USHORT_ARRAY", "INT_ARRAY", "UINT_ARRAY",
    "LONG_ARRAY", "ULONG_ARRAY", "LONG_LONG_ARRAY", "ULONG_LONG_ARRAY", "FLOAT_ARRAY", "DOUBLE_ARRAY")}
#: normalised key -> (the name written, kind); kinds: ints/floats of NDims values, matrix of NDims², ...
MHA_FIELDS = {
    "objecttype": ("ObjectType", "skip"),
    "ndims": ("NDims", "ndims"),
    "binarydata": ("BinaryData", "bool"),
    "binarydatabyteordermsb": ("BinaryDataByteOrderMSB", "bool"),
    "elementbyteordermsb": ("ElementByteOrderMSB", "bool"),
    "compresseddata": ("CompressedData", "bool"),
    "compresseddatasize": ("CompressedDataSize", "count"),
    "transformmatrix": ("TransformMatrix", "matrix"),
    "rotation": ("TransformMatrix", "matrix"),
    "orientation": ("TransformMatrix", "matrix"),
    "offset": ("Offset", "floats"),
    "position": ("Offset", "floats"),
    "origin": ("Offset", "floats"),
    "centerofrotation": ("CenterOfRotation", "floats"),
    "anatomicalorientation": ("AnatomicalOrientation", "orient"),
    "elementspacing": ("ElementSpacing", "floats"),
    "elementsize": ("ElementSize", "floats"),
    "dimsize": ("DimSize", "ints"),
    "elementnumberofchannels": ("ElementNumberOfChannels", "count"),
    "elementtype": ("ElementType", "etype"),
}
_MHA_ORDER = ["NDims", "BinaryData", "BinaryDataByteOrderMSB", "ElementByteOrderMSB", "CompressedData",
              "CompressedDataSize", "TransformMatrix", "Offset", "CenterOfRotation", "AnatomicalOrientation",
              "ElementSpacing", "ElementSize", "DimSize", "ElementNumberOfChannels", "ElementType"]


def _fmt_float(v: float) -> str:
    return repr(float(v))


def _mha_value(name: str, field: str, kind: str, value: str, ndims: int | None) -> str:
    parts = value.split()

    def bad(why: str) -> NotInline:
        return NotInline(f"{name}: MetaImage {field} = {value.strip()[:40]!r}: {why}; refused")

    if kind == "bool":
        if len(parts) != 1 or parts[0].lower() not in ("true", "false", "t", "f", "1", "0"):
            raise bad("expected True or False")
        return "True" if parts[0].lower() in ("true", "t", "1") else "False"
    if kind == "count":
        if len(parts) != 1 or not _INT.fullmatch(parts[0]) or int(parts[0]) < 0:
            raise bad("expected one non-negative integer")
        return str(int(parts[0]))
    if kind == "etype":
        if len(parts) != 1 or parts[0].upper() not in _ELEMENT_TYPES:
            raise bad("unknown element type")
        return parts[0].upper()
    if kind == "orient":
        if len(parts) != 1 or not re.fullmatch(r"[A-Za-z?]{1,8}", parts[0]):
            raise bad("expected orientation letters such as RAI")
        return parts[0].upper()
    assert ndims is not None
    want = ndims * ndims if kind == "matrix" else ndims
    if len(parts) != want:
        raise bad(f"expected {want} values for NDims = {ndims}")
    if kind == "ints":
        if not all(_INT.fullmatch(p) and int(p) >= 1 for p in parts):
            raise bad("expected positive integers")
        return " ".join(str(int(p)) for p in parts)
    if not all(_NUMBER.fullmatch(p) for p in parts):
        raise bad("expected numbers")
    vals = [float(p) for p in parts]
    if not all(abs(v) < float("inf") for v in vals):
        raise bad("not finite")
    return " ".join(_fmt_float(v) for v in vals)


def rewrite_mha(src: Path, dst: Path, name: str | None = None) -> list[str]:
    """Write ``dst``: ``src``'s MetaImage with a whitelisted header ending ``ElementDataFile = LOCAL``,
    followed by the uploaded data bytes. Returns the dropped field names."""
    name = name or src.name
    dropped: list[str] = []
    raw_fields: dict[str, tuple[str, str]] = {}   # written name -> (kind, raw value)
    with open(src, "rb") as fh:
        lines = _Lines(fh, name)
        while True:
            raw = lines.next()
            if raw is None:
                raise NotInline(f"{name}: MetaImage header without an 'ElementDataFile = LOCAL' line; upload an "
                                f".mha with the data in the file, or NIfTI")
            text = _text(raw)
            m = re.search(r"[=:]", text)
            if m is None:
                if text.strip():
                    dropped.append(text.strip()[:40])
                continue
            key, value = text[:m.start()], text[m.end():]
            nk = norm_key(key)
            if "datafile" in nk:
                if nk != "elementdatafile" or value.strip().lower() != "local":
                    raise NotInline(f"{name}: MetaImage header names a separate data file "
                                    f"({key.strip()[:40]} = {value.strip()[:60]}); upload an .mha with "
                                    f"ElementDataFile = LOCAL, or NIfTI")
                break                                    # ElementDataFile = LOCAL: the data follows
            if nk == "headersize":
                _only_zero(name, "MetaImage 'HeaderSize'", value, "an .mha whose data follows ElementDataFile = LOCAL")
                continue
            if _dropped(nk, MHA_FIELDS, key, dropped):
                continue
            field, kind = MHA_FIELDS[nk]
            if kind == "skip":
                continue
            if field in raw_fields:
                raise NotInline(f"{name}: MetaImage field {field} given twice; refused")
            raw_fields[field] = (kind, value)
        start = lines.offset()
        for need in ("NDims", "DimSize", "ElementType"):
            if need not in raw_fields:
                raise NotInline(f"{name}: MetaImage header has no {need} field")
        nd_raw = raw_fields["NDims"][1].split()
        if len(nd_raw) != 1 or not _INT.fullmatch(nd_raw[0]) or not 1 <= int(nd_raw[0]) <= 8:
            raise NotInline(f"{name}: MetaImage NDims = {raw_fields['NDims'][1].strip()[:20]!r}: expected 1 to 8; refused")
        ndims = int(nd_raw[0])
        values = {"NDims": str(ndims)}
        for field, (kind, value) in raw_fields.items():
            if field != "NDims":
                values[field] = _mha_value(name, field, kind, value, ndims)
        header = "ObjectType = Image\n" + "".join(f"{f} = {values[f]}\n" for f in _MHA_ORDER if f in values)
        header += "ElementDataFile = LOCAL\n"
        with open(dst, "xb") as out:
            out.write(header.encode("ascii"))
            _copy_rest(fh, start, out)
    return dropped


def rewrite_inline(path: Path) -> Path:
    """Replace the upload ``path`` (.nrrd / .mha) by its rewritten form (same name, same folder)."""
    low = path.name.lower()
    rewrite = rewrite_nrrd if low.endswith(".nrrd") else rewrite_mha if low.endswith(".mha") else None
    if rewrite is None:
        return path
    original = path.with_name(path.name + ".upload")
    path.rename(original)
    try:
        rewrite(original, path, path.name)
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    finally:
        original.unlink(missing_ok=True)
    return path
