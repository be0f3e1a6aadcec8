"""Fuzz the service's upload path (issue 27): mutated NRRD / MetaImage headers and zips through
``save_upload`` (allow-list, header rewrite, zip directory checks, extraction) and the reader the service
then calls, with the service's reader options.

    OMP_NUM_THREADS=1 python benchmarks/fuzz/run.py --serve-uploads --cases 10000 [--seed 0] [--out f.json]

Seed kinds: NRRD (raw, gzip, CRLF / CR-only, long comment padding, ``data file`` in several spellings),
MetaImage (raw, compressed, ``ElementDataFile`` spellings, a value injection, ``HeaderSize``), zips (a
DICOM series, folders, duplicate names, a zip64 end record, a lying member count). Several seeds name
sentinel files in a folder outside the upload. Every case must end refused (``InputError``) or read;
any other exception is a crash (traceback kept). Reads outside the upload are caught two ways: inotify
``IN_OPEN | IN_ACCESS`` watches on the sentinel folder and on the seeds' folder (C++ readers included),
and a ``sys.addaudithook`` ``open`` audit of every Python-level open outside the upload folder.
"""
from __future__ import annotations

import ctypes
import io
import json
import os
import resource
import struct
import sys
import tempfile
import time
import traceback
import zipfile
from collections import Counter
from pathlib import Path

HERE = Path(__file__).resolve()
sys.path.insert(0, str(HERE.parents[2] / "tests"))

IN_ACCESS, IN_OPEN = 0x1, 0x20


class Inotify:
    """Counts IN_OPEN / IN_ACCESS events on watched folders (Linux); ``drain()`` returns the names seen."""

    def __init__(self, folders) -> None:
        self.libc = ctypes.CDLL(None, use_errno=True)
        self.fd = self.libc.inotify_init1(os.O_NONBLOCK)
        if self.fd < 0:
            raise OSError(ctypes.get_errno(), "inotify_init1")
        self.wd = {}
        for f in folders:
            wd = self.libc.inotify_add_watch(self.fd, str(f).encode(), IN_OPEN | IN_ACCESS)
            self.wd[wd] = Path(f)

    def drain(self) -> list[str]:
        names = []
        while True:
            try:
                data = os.read(self.fd, 65536)
            except BlockingIOError:
                return names
            i = 0
            while i + 16 <= len(data):
                wd, mask, _, n = struct.unpack_from("iIII", data, i)
                name = data[i + 16:i + 16 + n].rstrip(b"\0").decode(errors="replace")
                names.append(str(self.wd.get(wd, "?")) + "/" + name)
                i += 16 + n


def seeds(root: Path, outside: Path) -> dict[str, tuple[str, bytes]]:
    """kind -> (upload file name, bytes)."""
    import numpy as np
    import SimpleITK as sitk

    from badinput_corpus import dicom_series

    secret = outside / "secret.raw"
    secret.write_bytes((b"SENTINEL" * 180)[:1440])
    s = str(secret)
    raw = bytes(np.arange(1440, dtype=np.uint8))
    nb = "type: uchar\ndimension: 3\nsizes: 12 12 10\nencoding: raw\n"
    mb = "ObjectType = Image\nNDims = 3\nDimSize = 12 12 10\nElementType = MET_UCHAR\n"
    out = {
        "nrrd_raw": ("a.nrrd", f"NRRD0004\n{nb}spacings: 1 1 2\n\n".encode() + raw),
        "nrrd_crlf": ("a.nrrd", f"NRRD0004\n{nb}\n".replace("\n", "\r\n").encode() + raw),
        "nrrd_cr": ("a.nrrd", f"NRRD0004\n{nb}\n".replace("\n", "\r").encode() + raw),
        "nrrd_long": ("a.nrrd", ("NRRD0004\n" + "# pad\n" * 12000 + nb + "\n").encode() + raw),
        "nrrd_datafile": ("a.nrrd", f"NRRD0004\n{nb}data file: {s}\n\n".encode()),
        "nrrd_datafile2": ("a.nrrd", f"NRRD0004\n{nb}DataFile:{s}\n\n".encode()),
        "nrrd_list": ("a.nrrd", f"NRRD0005\n{nb}data file: LIST\n{s}\n".encode()),
        "mha_raw": ("a.mha", f"{mb}ElementSpacing = 1 1 2\nElementDataFile = LOCAL\n".encode() + raw),
        "mha_crlf": ("a.mha", f"{mb}ElementDataFile = LOCAL\n".replace("\n", "\r\n").encode() + raw),
        "mha_datafile": ("a.mha", f"{mb}ElementDataFile = {s}\n".encode()),
        "mha_datafile2": ("a.mha", f"{mb}  elementdatafile: {s}\n".encode()),
        "mha_inject": ("a.mha", mb.replace("10\n", f"10 ElementDataFile = {s}\n").encode() + b"ElementDataFile = LOCAL\n" + raw),
        "mha_headersize": ("a.mha", f"{mb}HeaderSize = -1\nElementDataFile = LOCAL\n".encode() + raw),
    }
    rng = np.random.default_rng(0)
    img = sitk.GetImageFromArray(rng.random((10, 12, 12)).astype(np.float32))
    img.SetSpacing((0.8, 0.9, 2.0))
    for comp in (False, True):
        for suf in ("nrrd", "mha"):
            p = root / f"sitk{int(comp)}.{suf}"
            sitk.WriteImage(img, str(p), useCompression=comp)
            out[f"{suf}_sitk{'_gz' if comp else ''}"] = (p.name, p.read_bytes())
    series = dicom_series(root / "ct", n=6)

    def z(files: dict[str, bytes]) -> bytes:
        b = io.BytesIO()
        with zipfile.ZipFile(b, "w", zipfile.ZIP_DEFLATED) as zf:
            for n, d in files.items():
                zf.writestr(n, d)
        return b.getvalue()

    dcm = {f"s/{p.name}": p.read_bytes() for p in sorted(series.iterdir())}
    out["zip_dicom"] = ("ct.zip", z(dcm))
    out["zip_dirs"] = ("ct.zip", z({**{f"d{i}/": b"" for i in range(5)}, **dcm}))
    out["zip_dups"] = ("ct.zip", z({f"{i}/{n.split('/')[-1]}": d for i, (n, d) in enumerate(list(dcm.items()) * 3)}))
    one = z(dcm)
    at = one.rfind(b"PK\x05\x06")
    sig, d1, d2, n1, n2, size, off, com = struct.unpack("<4s4H2LH", one[at:at + 22])
    rec = struct.pack("<4sQ2H2L4Q", b"PK\x06\x06", 44, 45, 45, 0, 0, n1, n1, size, off)
    loc = struct.pack("<4sLQL", b"PK\x06\x07", 0, at, 1)
    out["zip64"] = ("ct.zip", one[:at] + rec + loc + struct.pack("<4s4H2LH", sig, d1, d2, 0xFFFF, 0xFFFF,
                                                                    0xFFFFFFFF, 0xFFFFFFFF, com))
    out["zip_lying_count"] = ("ct.zip", one[:at] + struct.pack("<4s4H2LH", sig, d1, d2, 1, 1, size, off, com))
    return out


def main(cases: int = 10000, seed_: int = 0, out: Path | None = None) -> int:
    import numpy as np
    import torch
    from hypothesis import HealthCheck, given, seed, settings
    from hypothesis import strategies as st

    import badinput_corpus as bc
    from anymc3d.errors import InputError
    from anymc3d.io import options, read_volume
    from anymc3d.serve.config import SERVE_MAX_VOXELS, ServeConfig  # noqa: F401
    from anymc3d.serve.uploads import save_upload

    torch.set_num_threads(1)
    t0 = time.time()
    work = Path(tempfile.mkdtemp(prefix="anymc3d-fuzz-serve-"))
    outside, seed_dir, uploads = work / "outside", work / "seeds", work / "uploads"
    for d in (outside, seed_dir, uploads):
        d.mkdir()
    kinds = seeds(seed_dir, outside)
    sentinel = (outside / "secret.raw").read_bytes()
    watch = Inotify([outside, seed_dir, seed_dir / "ct"])
    upload_folder: list[Path] = []
    py_outside: list[str] = []
    # the monitor works: an unguarded ITK read of a seed that names the sentinel is seen
    import SimpleITK as sitk

    probe = work / "probe.nrrd"
    probe.write_bytes(kinds["nrrd_datafile"][1])
    watch.drain()
    try:
        sitk.ReadImage(str(probe))
    except RuntimeError:
        pass
    assert watch.drain(), "inotify saw no read of the sentinel by an unguarded reader"

    def audit(event, args):
        if event == "open" and upload_folder and isinstance(args[0], (str, bytes, os.PathLike)):
            p = os.fsdecode(args[0])
            if p.startswith((str(outside), str(seed_dir))):
                py_outside.append(p)

    sys.addaudithook(audit)
    options.set_reader_options(max_voxels=SERVE_MAX_VOXELS, channels=(1, 3))
    counts = {k: Counter() for k in kinds}
    problems: list[dict] = []
    outside_reads: list[dict] = []
    devnull = open(os.devnull, "w")
    stderr, sys.stderr = sys.stderr, devnull
    per_kind = max(1, cases // len(kinds))
    quota = {k: per_kind for k in kinds}
    quota[next(iter(kinds))] += cases - per_kind * len(kinds)
    try:
        for ki, (kind, (fname, data0)) in enumerate(kinds.items()):
            done = 0
            round_ = 0
            while done < quota[kind]:
                @seed(seed_ * 1000 + round_ * 100 + ki)
                @settings(max_examples=quota[kind] - done, deadline=None, database=None,
                          suppress_health_check=list(HealthCheck))
                @given(ops=bc.ops_strategy())
                def one(ops):
                    nonlocal done
                    done += 1
                    header = 512 if fname.endswith(".zip") else 4096
                    data = bc.mutate(data0, ops, header, text=not fname.endswith(".zip"))
                    watch.drain()
                    up = None
                    outcome = "accepted"
                    try:
                        up = save_upload(io.BytesIO(data), fname, 2**26, 2**26, 10000, parent=uploads)
                        upload_folder[:] = [up.folder]
                        entries = list(up.folder.iterdir())
                        if len(entries) != 1:
                            raise AssertionError(f"upload folder holds {[e.name for e in entries]}")
                        vol = read_volume(str(up.path), content_warnings=False)
                        if sentinel[:32] in np.ascontiguousarray(vol.array).astype(np.uint8).tobytes():
                            outside_reads.append({"kind": kind, "how": "sentinel bytes in the volume", "ops": repr(ops)[:300]})
                    except InputError:
                        outcome = "refused"
                    except Exception as exc:
                        outcome = "crash"
                        tb = traceback.format_exception(exc)
                        problems.append({"kind": kind, "error": f"{type(exc).__name__}: {str(exc)[:300]}",
                                         "where": tb[-2][:300], "ops": repr(ops)[:300]})
                    finally:
                        upload_folder.clear()
                        if up is not None:
                            up.discard()
                    seen = watch.drain() + py_outside[:]
                    py_outside.clear()
                    if seen:
                        outside_reads.append({"kind": kind, "how": "opened " + ", ".join(sorted(set(seen)))[:300],
                                              "ops": repr(ops)[:300]})
                    counts[kind][outcome] += 1

                before = done
                one()
                round_ += 1
                if done == before:
                    break
    finally:
        sys.stderr = stderr
    leftovers = list(uploads.iterdir())
    summary = {
        "cases": sum(sum(c.values()) for c in counts.values()),
        "refused": sum(c["refused"] for c in counts.values()),
        "accepted": sum(c["accepted"] for c in counts.values()),
        "crashes": sum(c["crash"] for c in counts.values()),
        "outside_reads": len(outside_reads),
        "upload_folders_left": len(leftovers),
        "per_kind": {k: dict(c) for k, c in counts.items()},
        "problems": problems[:30], "outside_read_cases": outside_reads[:30],
        "seed": seed_, "wall_s": round(time.time() - t0, 1),
        "maxrss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }
    text = json.dumps(summary, indent=2)
    print(text)
    if out:
        Path(out).write_text(text)
    ok = summary["crashes"] == 0 and summary["outside_reads"] == 0 and not leftovers
    return 0 if ok else 1


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", type=int, default=10000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path)
    a = ap.parse_args()
    sys.exit(main(a.cases, a.seed, a.out))
