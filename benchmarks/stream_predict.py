"""Issue 28: streaming prediction against the code before it, side by side, and their probabilities.

    OMP_NUM_THREADS=1 python benchmarks/stream_predict.py PLUGIN $ADRENAL --baseline-src OLD/src \
        [--n 300] [--workers 1] [--rounds 2] [--work runs/stream] [--out runs/stream.json]

Writes the first ``--n`` test volumes of a MedMNIST 3D file as NIfTI files (once, under ``--work``),
then runs ``anymc3d predict PLUGIN FOLDER --out ... --workers N --engine torch --overwrite`` with this
checkout and with ``--baseline-src`` (an older checkout's ``src``, e.g. ``git archive <commit> src |
tar -x -C OLD``), alternating, ``--rounds`` times each; reports the best wall time of each, their ratio,
and the largest difference between the two runs' probabilities (``--engine torch`` on both: the same
arithmetic, so what differs is the streaming). A third run, this checkout with ``--engine auto``, shows
what the frozen-pass engine adds on top (its probabilities within the engine's tolerance).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np

HERE = Path(__file__).resolve().parents[1] / "src"


def write_volumes(data: Path, n: int, folder: Path) -> None:
    if len(list(folder.glob("*.nii.gz"))) == n:
        return
    folder.mkdir(parents=True, exist_ok=True)
    x = np.load(data)["test_images"][:n]
    for i, a in enumerate(x):
        nib.save(nib.Nifti1Image(a.astype(np.float32), np.eye(4)), str(folder / f"t{i:04d}.nii.gz"))


def run(src: Path, plugin: str, folder: Path, out: Path, workers: int, engine: str = "torch") -> float:
    env = dict(os.environ, PYTHONPATH=str(src), TQDM_DISABLE="1")
    cmd = [sys.executable, "-m", "anymc3d", "predict", plugin, str(folder), "--out", str(out), "--workers",
           str(workers), "--device", "cpu", "--engine", engine, "--overwrite"]
    t0 = time.perf_counter()
    subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t0


def probabilities(out: Path) -> np.ndarray:
    """Every volume's probabilities at full precision (its JSON; the CSV rounds to 6 decimals)."""
    rows = [json.loads(p.read_text()) for p in sorted(out.glob("*.json"))]
    names = list(rows[0]["probabilities"])
    return np.array([[r["probabilities"][n] for n in names] for r in rows])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("plugin")
    ap.add_argument("data", type=Path)
    ap.add_argument("--baseline-src", type=Path, required=True)
    ap.add_argument("--n", type=int, default=300)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--work", type=Path, default=Path("runs/stream"))
    ap.add_argument("--out", type=Path, default=Path("runs/stream.json"))
    a = ap.parse_args()
    folder = a.work / "volumes"
    write_volumes(a.data, a.n, folder)
    times = {"baseline": [], "streaming": [], "streaming_engine_auto": []}
    for _ in range(a.rounds):
        times["baseline"].append(run(a.baseline_src.resolve(), a.plugin, folder, a.work / "baseline", a.workers))
        times["streaming"].append(run(HERE, a.plugin, folder, a.work / "streaming", a.workers))
        times["streaming_engine_auto"].append(run(HERE, a.plugin, folder, a.work / "auto", a.workers, "auto"))
    base = probabilities(a.work / "baseline")
    best = {k: min(v) for k, v in times.items()}
    res = {"n": a.n, "workers": a.workers, "seconds": times, "best_s": best,
           "speedup": best["baseline"] / best["streaming"],
           "speedup_engine_auto": best["baseline"] / best["streaming_engine_auto"],
           "max_abs_prob_diff": float(np.abs(base - probabilities(a.work / "streaming")).max()),
           "max_abs_prob_diff_engine_auto": float(np.abs(base - probabilities(a.work / "auto")).max()),
           "omp_num_threads": os.environ.get("OMP_NUM_THREADS")}
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(res, indent=2))
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
