"""Issue 3 measurements on the synthetic suite: fusion of sequences/views, and the auxiliary mask loss.

    OMP_NUM_THREADS=1 python benchmarks/issue3_synthetic.py --out runs/issue3 [--seeds 0,1,2] [--groups masks]

Each run trains a plugin (efficientnet_lite0, real weights) on a freshly generated task and
records its test AUC/ACC and seconds per epoch. Results are appended to OUT/results.jsonl as they
finish (a re-run skips finished rows) and summarised as mean ± std over seeds in OUT/summary.md.
"""
from __future__ import annotations

import argparse
import csv
import json
import random
import time
from pathlib import Path

import numpy as np

from anymc3d.plugins import LoraSpec
from anymc3d.synthetic import make_task, write_task
from anymc3d.training.run import PreprocessOptions, train_plugin
from anymc3d.training.trainer import TrainConfig

VOL, SLICE, CASES, EPOCHS = 24, 32, 100, 8
# Mask studies, one per --groups name: the rows' group label, the phantoms (cases, train/val/test split,
# lesion knobs), the slice size, which fractions of training cases keep their mask, the data-folder tag.
MASK_STUDIES = {
    # a 3-voxel lesion at the default noise and 64^2 slices (lite0's stride-32 map is 1 x 1 at 32^2, where
    # a 2-3 voxel lesion was at chance); 60 training cases (low data), 20 val, 80 test (tighter AUC)
    "masks": {"group": "masks (lesion_binary r=3, 60 training cases, 80 test)", "cases": 160,
              "splits": (0.375, 0.125, 0.5), "knobs": {"lesion_radius": 3.0, "noise": 10.0}, "slice": 64,
              "fractions": (0.0, 0.1, 0.25, 1.0), "tag": "r3"},
    # the same task with more labels: 200 training cases, masks on none or all of them
    "masks_large": {"group": "masks (lesion_binary r=3, 200 training cases, 80 test)", "cases": 300,
                    "splits": (0.667, 0.067, 0.267), "knobs": {"lesion_radius": 3.0, "noise": 10.0}, "slice": 64,
                    "fractions": (0.0, 1.0), "tag": "r3n300"},
    # the first, inconclusive setting: a faint 2-voxel lesion at 32^2 slices (at chance with or without masks)
    "masks_faint": {"group": "masks (lesion_binary, small/faint lesion, 60 training cases)", "cases": CASES,
                    "splits": (0.6, 0.2, 0.2), "knobs": {"lesion_radius": 2.0, "noise": 20.0}, "slice": SLICE,
                    "fractions": (0.0, 0.1, 0.25, 1.0), "tag": ""},
}
# Fusion studies at a less noisy setting than the first sequences/views groups (20 test cases, 32^2 slices,
# where lite0's final map is 1 x 1): 64^2 slices, 160 cases split 60 / 20 / 80 (80 test cases), and the
# shared-trunk plugin (LoRA on the last stage, no augmentation, trunk activations cached in OUT/cache) so
# that 3 seeds x 5 variants train in minutes on a CPU.
FUSION_STUDIES = {
    "sequences_large": {"group": "sequences (t2_only, 64², 60 train / 80 test, LoRA last stage)", "task": "t2_only",
                        "variants": [(["t1"], ["axial"], "t1 only"), (["t2"], ["axial"], "t2 only"),
                                     (["t1", "t2"], ["axial"], "t1+t2 fused")]},
    "views_large": {"group": "views (elongated, 64², 60 train / 80 test, LoRA last stage)", "task": "elongated",
                    "variants": [(["image"], ["axial"], "axial"),
                                 (["image"], ["axial", "coronal", "sagittal"], "axial+coronal+sagittal")]},
}
FUSION_DATA = {"cases": 160, "splits": (0.375, 0.125, 0.5), "knobs": {}, "slice": 64, "tag": "n160", "last_k": 1,
               "epochs": 15}
GROUPS = ("sequences", "views", *MASK_STUDIES, *FUSION_STUDIES)
# the phantoms (cases, splits, knobs, folder tag) behind each study's rows
STUDY_DATA = {**MASK_STUDIES, **{study: FUSION_DATA for study in FUSION_STUDIES}}


def experiments(seeds, groups=GROUPS):
    for seed in seeds:
        for cols, name in [(["t1"], "t1 only"), (["t2"], "t2 only"), (["t1", "t2"], "t1+t2 fused")]:
            if "sequences" in groups:
                yield {"group": "sequences (t2_only)", "task": "t2_only", "variant": name, "seed": seed, "columns": cols,
                       "views": ["axial"], "mask_fraction": 0.0}
        for views in (["axial"], ["axial", "coronal", "sagittal"]):
            if "views" in groups:
                yield {"group": "views (elongated)", "task": "elongated", "variant": "+".join(views), "seed": seed,
                       "columns": ["image"], "views": views, "mask_fraction": 0.0}
        for study, st in FUSION_STUDIES.items():
            if study in groups:
                for cols, views, name in st["variants"]:
                    yield {"group": st["group"], "study": study, "task": st["task"], "variant": name, "seed": seed,
                           "columns": cols, "views": views, "mask_fraction": 0.0, "slice": FUSION_DATA["slice"],
                           "last_k": FUSION_DATA["last_k"], "epochs": FUSION_DATA["epochs"]}
        for study, st in MASK_STUDIES.items():
            if study in groups:
                for frac in st["fractions"]:
                    yield {"group": st["group"], "study": study, "task": "lesion_binary",
                           "variant": f"masks {int(frac * 100)}%" if frac else "no aux loss", "seed": seed,
                           "columns": ["image"], "views": ["axial"], "mask_fraction": frac, "slice": st["slice"]}


def _sd(a: np.ndarray) -> float:
    """Sample standard deviation over seeds (ddof=1, as anymc3d bench); NaN for one seed."""
    return float(a.std(ddof=1)) if len(a) > 1 else float("nan")


def make_data(e: dict, root: Path) -> Path:
    knobs, n, splits, tag = {"size": VOL}, CASES, (0.6, 0.2, 0.2), ""
    if "study" in e:
        st = STUDY_DATA[e["study"]]
        knobs.update(st["knobs"])
        n, splits, tag = st["cases"], st["splits"], st["tag"]
    ds = make_task(e["task"], n, seed=e["seed"], **knobs)
    d = root / f"{e['task']}{tag}_s{e['seed']}_m{e['mask_fraction']}"
    manifest = write_task(ds, d, splits=splits, seed=e["seed"])
    rows = list(csv.DictReader(open(manifest)))
    rng = random.Random(e["seed"])
    train_ids = [r["id"] for r in rows if r["split"] == "train"]
    keep = set(rng.sample(train_ids, int(round(e["mask_fraction"] * len(train_ids)))))
    for r in rows:
        if r["id"] not in keep:
            r["mask"] = ""
    with open(manifest, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return manifest


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", type=Path, default=Path("runs/issue3"))
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--groups", default="sequences,views,masks",
                   help=f"comma list of {', '.join(GROUPS)} (masks_faint: the first, at-chance setting)")
    a = p.parse_args()
    groups = [g for g in a.groups.split(",") if g]
    if any(g not in GROUPS for g in groups):
        p.error(f"--groups: choose from {', '.join(GROUPS)}")
    a.out.mkdir(parents=True, exist_ok=True)
    res_path = a.out / "results.jsonl"
    done = {json.dumps({k: r[k] for k in ("group", "variant", "seed")}) for r in map(json.loads, res_path.open())} \
        if res_path.exists() else set()
    for e in experiments([int(s) for s in a.seeds.split(",")], groups):
        key = json.dumps({k: e[k] for k in ("group", "variant", "seed")})
        if key in done:
            continue
        manifest = make_data(e, a.out / "data")
        t0 = time.time()
        shared_trunk = e.get("last_k") is not None  # frozen trunk, no augmentation: activations cached
        m = train_plugin(manifest, "efficientnet_lite0", a.out / "plugins" / f"{abs(hash(key)) % 10**8}",
                         preprocess=PreprocessOptions(views=e["views"], size=e.get("slice", SLICE),
                                                      intensity="mri" if e["task"] == "t2_only" else "ct",
                                                      windows=None if e["task"] == "t2_only" else "abdomen"),
                         lora=LoraSpec(last_k=e.get("last_k")),
                         config=TrainConfig(epochs=e.get("epochs", EPOCHS), batch_size=8, seed=e["seed"],
                                            progress=False, seg_weight=0.5 if e["mask_fraction"] else 0.0,
                                            augment=not shared_trunk,
                                            cache_dir=str(a.out / "cache") if shared_trunk else None),
                         data_kwargs={"image_columns": e["columns"]}, log=lambda *_: None)
        row = {**{k: e[k] for k in ("group", "variant", "seed", "task", "views", "columns", "mask_fraction")},
               "auc": m["auc"], "acc": m["acc"], "n_test": m["n"], "n_train": m["n_train"],
               "n_train_with_mask": m["n_train_with_mask"], "seg_decoder_params": m["seg_decoder_params"],
               "s_per_epoch": m["train_wall_s"] / max(1, m["epochs_run"]), "trainable_params": m["trainable_params"],
               "slice": e.get("slice", SLICE), "last_k": e.get("last_k"), "epochs": e.get("epochs", EPOCHS),
               "wall_s": round(time.time() - t0, 1)}
        with res_path.open("a") as fh:
            fh.write(json.dumps(row) + "\n")
        print(json.dumps(row), flush=True)
    rows = [json.loads(line) for line in res_path.open()]
    lines = ["| group | variant | test AUC (mean ± std) | test ACC | seeds | s/epoch | trainable |", "|---|---|---|---|---|---|---|"]
    seen = []
    for r in rows:
        if (r["group"], r["variant"]) not in seen:
            seen.append((r["group"], r["variant"]))
    for g, v in seen:
        rs = [r for r in rows if r["group"] == g and r["variant"] == v]
        auc = np.array([r["auc"] for r in rs], dtype=float)
        acc = np.array([r["acc"] for r in rs], dtype=float)
        lines.append(f"| {g} | {v} | {auc.mean():.3f} ± {_sd(auc):.3f} | {acc.mean():.3f} ± {_sd(acc):.3f} | {len(rs)} | "
                     f"{np.mean([r['s_per_epoch'] for r in rs]):.1f} | {rs[0]['trainable_params']:,} |")
    (a.out / "summary.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
