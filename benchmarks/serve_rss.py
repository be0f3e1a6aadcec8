"""Peak RSS per request of ``anymc3d serve`` for the worst case of each upload kind (issue 27).

    OMP_NUM_THREADS=1 python benchmarks/serve_rss.py [--out rss.json]

One subprocess per case: it builds a tiny store and the app (TestClient, random weights), sends one
warm-up request, records ``ru_maxrss``, sends the case's request and reports the status and the growth
of the peak RSS (MiB) caused by that one request. Cases: the largest refused upload of each kind
(NRRD / MHA headers naming other files behind 64+ KiB of padding, a header line of just under 1 MiB,
zips with too many members by count / by directory walk / zip64, a zip bomb (512 MiB of zeros against a 256 MiB limit), a slow-header MHA with a
huge declared size) and accepted volumes (NRRD / MHA / NIfTI at 128³ float32, with heatmaps).
"""
from __future__ import annotations

import argparse
import io
import json
import os
import struct
import subprocess
import sys
import zipfile
from pathlib import Path

HERE = Path(__file__).resolve()

CASES = ["nrrd_datafile_long", "mha_datafile_long", "nrrd_line_1mib", "mha_huge_dims", "zip_members",
         "zip_lying_count", "zip64_count", "zip_bomb", "nrrd_128", "mha_128_gz", "nifti_128_heatmaps"]


def _zip(files: dict[str, bytes], method=zipfile.ZIP_STORED) -> bytes:
    b = io.BytesIO()
    with zipfile.ZipFile(b, "w", method) as z:
        for n, d in files.items():
            z.writestr(n, d)
    return b.getvalue()


def build(case: str, work: Path) -> tuple[str, bytes, dict]:
    import numpy as np

    s = "/etc/hostname"
    nb = "type: float\ndimension: 3\nsizes: 128 128 128\nendian: little\nencoding: raw\n"
    mb = "ObjectType = Image\nNDims = 3\nDimSize = 128 128 128\nElementType = MET_FLOAT\n"
    vol = np.random.default_rng(0).random((128, 128, 128)).astype(np.float32)
    if case == "nrrd_datafile_long":
        return "a.nrrd", ("NRRD0004\n" + "# pad\n" * 200000 + nb + f"data file: {s}\n\n").encode(), {}
    if case == "mha_datafile_long":
        return "a.mha", ("ObjectType = Image\n" + "Comment = pad\n" * 100000 + mb.split("\n", 1)[1]
                         + f"ElementDataFile = {s}\n").encode(), {}
    if case == "nrrd_line_1mib":
        return "a.nrrd", ("NRRD0004\n#" + "x" * ((1 << 20) - 10) + "\n" + nb + "\n").encode() + vol.tobytes(), {}
    if case == "mha_huge_dims":
        return "a.mha", "ObjectType = Image\nNDims = 3\nDimSize = 4096 4096 4096\nElementType = MET_DOUBLE\n" \
                        "ElementDataFile = LOCAL\n".encode() + bytes(1 << 20), {}
    if case == "zip_members":
        return "a.zip", _zip({f"{i}.dcm": b"" for i in range(20001)}), {}
    if case in ("zip_lying_count", "zip64_count"):
        data = _zip({f"{i}.dcm": b"" for i in range(20001)})
        at = data.rfind(b"PK\x05\x06")
        sig, d1, d2, n1, _, size, off, com = struct.unpack("<4s4H2LH", data[at:at + 22])
        if case == "zip_lying_count":
            return "a.zip", data[:at] + struct.pack("<4s4H2LH", sig, d1, d2, 1, 1, size, off, com), {}
        rec = struct.pack("<4sQ2H2L4Q", b"PK\x06\x06", 44, 45, 45, 0, 0, 1, 1, size, off)
        loc = struct.pack("<4sLQL", b"PK\x06\x07", 0, at, 1)
        return "a.zip", data[:at] + rec + loc + struct.pack("<4s4H2LH", sig, d1, d2, 0xFFFF, 0xFFFF, 0xFFFFFFFF,
                                                             0xFFFFFFFF, com), {}
    if case == "zip_bomb":  # 512 MiB of zeros (limit: 256 MiB uncompressed), written in 1 MiB chunks
        b = io.BytesIO()
        with zipfile.ZipFile(b, "w", zipfile.ZIP_DEFLATED) as z, z.open("a.dcm", "w") as f:
            for _ in range(512):
                f.write(bytes(1 << 20))
        return "a.zip", b.getvalue(), {}
    if case == "nrrd_128":
        return "a.nrrd", f"NRRD0004\n{nb}\n".encode() + vol.tobytes(), {}
    if case == "mha_128_gz":
        import SimpleITK as sitk

        p = work / "a.mha"
        sitk.WriteImage(sitk.GetImageFromArray(vol), str(p), useCompression=True)
        return "a.mha", p.read_bytes(), {}
    if case == "nifti_128_heatmaps":
        import nibabel as nib

        p = work / "a.nii.gz"
        nib.save(nib.Nifti1Image(vol, np.eye(4)), str(p))
        return "a.nii.gz", p.read_bytes(), {"heatmaps": "true", "tasks": "lesion"}
    raise ValueError(case)


def child(case: str) -> dict:
    import resource
    import tempfile

    import torch

    torch.set_num_threads(1)
    sys.path.insert(0, str(HERE.parents[1] / "tests"))
    from fastapi.testclient import TestClient
    from test_serve import build_store, serve_config, write_scan

    from anymc3d.serve import create_app

    work = Path(tempfile.mkdtemp(prefix="anymc3d-rss-"))
    store = build_store(work)
    name, body, params = build(case, work)
    with TestClient(create_app(serve_config(store, max_upload_mb=1024, max_zip_members=10000,
                                            max_unzipped_mb=256))) as c:
        warm = write_scan(work / "w.nii.gz")
        assert c.post("/v1/predict", params={"heatmaps": "true", "tasks": "lesion"},
                      files={"file": ("w.nii.gz", warm.read_bytes())}).status_code == 200
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        r = c.post("/v1/predict", params=params or None, files={"file": (name, body, "application/octet-stream")})
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"case": case, "upload_mib": round(len(body) / 2**20, 2), "status": r.status_code,
            "detail": (r.json().get("detail", "") if r.status_code != 200 else "")[:90],
            "peak_rss_growth_mib": round((after - before) / 1024, 1), "peak_rss_mib": round(after / 1024, 1)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path)
    ap.add_argument("--case", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.case:
        print(json.dumps(child(a.case)))
        return 0
    rows = []
    for case in CASES:
        p = subprocess.run([sys.executable, str(HERE), "--case", case], capture_output=True, text=True,
                           env={**os.environ, "OMP_NUM_THREADS": "1"})
        line = p.stdout.strip().splitlines()[-1] if p.stdout.strip() else ""
        rows.append(json.loads(line) if line.startswith("{") else {"case": case, "error": p.stderr[-400:]})
        print(json.dumps(rows[-1]), flush=True)
    if a.out:
        a.out.write_text(json.dumps(rows, indent=2))
    return 0 if all("error" not in r and r["status"] < 500 for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
