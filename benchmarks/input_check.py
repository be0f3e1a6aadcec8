"""Issue 28: the cost of ``predict --out``'s input check, reading headers only against reading every
voxel (the check before this change), side by side on the same files.

    OMP_NUM_THREADS=1 python benchmarks/input_check.py ../shared/data/medmnist3d/adrenalmnist3d_64.npz \
        [--n 298] [--work runs/input_check] [--rounds 3] [--out runs/input_check.json]

Writes the first ``--n`` test volumes as .nii.gz files (once, under ``--work``), then, alternating,
``--rounds`` times each: every file read whole (``read_volume``) or from its header
(``read_volume(..., header_only=True)``), and its preprocessing planned (``plan_volume``, the
allocation guards) as the check does. Prints the best wall time of each and their ratio, and checks
that both give every volume the same spatial record.

``--dicom-series 512,512,200``: instead, one CT-sized DICOM series folder of that shape (int16,
SimpleITK's writer, one file per slice) is written once and checked both ways.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import nibabel as nib
import numpy as np

from anymc3d.io import read_volume
from anymc3d.preprocess import PreprocessSpec, plan_volume


def write_volumes(data: Path, n: int, folder: Path) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    x = np.load(data)["test_images"][:n]
    paths = [folder / f"t{i:04d}.nii.gz" for i in range(len(x))]
    for p, a in zip(paths, x):
        if not p.exists():
            nib.save(nib.Nifti1Image(a.astype(np.float32), np.eye(4)), str(p))
    return paths


def write_dicom_series(shape: tuple[int, int, int], folder: Path) -> list[Path]:
    import SimpleITK as sitk

    from anymc3d.io.readers import _keep_locale

    if not folder.is_dir():
        folder.mkdir(parents=True)
        rng = np.random.default_rng(0)
        img = sitk.GetImageFromArray(rng.integers(-1000, 1000, size=shape[::-1], dtype=np.int16))
        img.SetSpacing((0.7, 0.7, 1.5))
        writer = sitk.ImageFileWriter()
        writer.KeepOriginalImageUIDOn()
        for k in range(shape[2]):
            sl = img[:, :, k]
            sl.SetMetaData("0020|000e", "1.2.826.0.1.3680043.2.1125.1.4242")
            sl.SetMetaData("0008|0060", "CT")
            sl.SetMetaData("0020|0037", "1\\0\\0\\0\\1\\0")
            sl.SetMetaData("0020|0032", "\\".join(map(str, img.TransformIndexToPhysicalPoint((0, 0, k)))))
            sl.SetMetaData("0020|0013", str(k + 1))
            writer.SetFileName(str(folder / f"slice{k:04d}.dcm"))
            with _keep_locale():
                writer.Execute(sl)
    return [folder]


def check(paths: list[Path], spec: PreprocessSpec, header_only: bool) -> tuple[float, list]:
    t0 = time.perf_counter()
    records = [plan_volume(read_volume(p, header_only=header_only), spec) for p in paths]
    return time.perf_counter() - t0, [(r.canonical_shape, np.asarray(r.input_affine).round(6).tolist()) for r in records]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("data", type=Path)
    ap.add_argument("--n", type=int, default=298)
    ap.add_argument("--work", type=Path, default=Path("runs/input_check"))
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--dicom-series", default=None, help="X,Y,Z: check one DICOM series of that shape instead")
    a = ap.parse_args()
    if a.dicom_series:
        shape = tuple(int(v) for v in a.dicom_series.split(","))
        paths = write_dicom_series(shape, a.work / ("dicom_" + "x".join(map(str, shape))))
    else:
        paths = write_volumes(a.data, a.n, a.work / "volumes")
    spec = PreprocessSpec(views=["axial", "coronal", "sagittal"], size=224)
    best = {"full": float("inf"), "header": float("inf")}
    recs = {}
    for _ in range(a.rounds):
        for name, header_only in (("full", False), ("header", True)):
            secs, recs[name] = check(paths, spec, header_only)
            best[name] = min(best[name], secs)
    res = {"volumes": len(paths), "shape": list(shape) if a.dicom_series else list(np.load(a.data)["test_images"].shape[1:]),
           "full_read_s": round(best["full"], 3), "header_only_s": round(best["header"], 3),
           "ratio": round(best["full"] / best["header"], 1), "same_records": recs["full"] == recs["header"]}
    print(json.dumps(res, indent=1))
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
