"""``anymc3d explain PLUGIN IMAGE... --out DIR [--masks MASK...]`` and ``predict --heatmaps``.

IMAGE is a file, a folder (of image files, or one DICOM series) or a manifest CSV (its mask
column supplies masks). Per case: ``<id>_heatmap.nii.gz`` (binary) or ``<id>_<label>_heatmap.nii.gz``
(one per label), with the input's shape and affine, and a PNG figure beside it. With masks:
``localization.json`` / ``localization.csv`` with pointing game, energy in mask and voxel AUROC,
and the same scores for a random map.
"""
from __future__ import annotations

import argparse
import csv
import time
from pathlib import Path

import numpy as np

from ..cli_args import add_device_args, add_weights_arg
from ..errors import InputError


def register(subparsers) -> dict:
    x = subparsers.add_parser("explain", help="3D heatmaps in the input's space (+ localisation scores given masks)",
                              description="Write per-volume heatmaps (NIfTI with the input's shape and affine, and a "
                                          "PNG figure); given masks, localisation scores against them with a random-map "
                                          "baseline (localization.json).")
    x.add_argument("plugin")
    x.add_argument("images", nargs="+", help="files, folders (of images, or one DICOM series) or a manifest CSV")
    x.add_argument("--out", required=True, type=Path)
    x.add_argument("--masks", nargs="+", help="one mask per image (same order), or a folder with <id>_mask.* / <id>.*")
    x.add_argument("--labels", help="comma list of labels to explain (default: the positive label for binary "
                                    "tasks, every label otherwise)")
    x.add_argument("--method", choices=["auto", "attention", "gradcam"], default="auto",
                   help="auto: attention for ViT backbones, Grad-CAM for CNNs")
    x.add_argument("--cam-layers", default="auto", help="CNN Grad-CAM layers: last, s16, s8 joined by + (auto)")
    x.add_argument("--smooth-mm", type=float, default=0.0,
                   help="Gaussian smoothing of the final map, sigma in mm (default 0: none)")
    x.add_argument("--split", help="manifest rows of this split only (train, val, test)")
    x.add_argument("--positives-only", action="store_true", help="manifest rows with a positive label only")
    x.add_argument("--top-k", type=int, default=6, help="slices shown in the figure")
    x.add_argument("--no-figure", action="store_true")
    x.add_argument("--tolerance-mm", type=float, default=0.0, help="pointing-game tolerance around the mask (mm)")
    x.add_argument("--seed", type=int, default=0, help="seed of the random-map baseline")
    add_weights_arg(x)
    add_device_args(x)
    return {"explain": cmd_explain}


# ---------------------------------------------------------------------------------------------- inputs
def expand_items(images: list[str], spec, split: str | None = None, positives_only: bool = False):
    """-> list of (case id or None, item, mask or None, known label array or None), from the one expander."""
    from ..inputs import expand_inputs

    return [(it.id, it.item, it.mask, it.label) for it in
            expand_inputs(images, spec.inputs, split=split, positives_only=positives_only, task_type=spec.task_type)]


def _attach_masks(items, masks: list[str] | None, ids: list[str]):
    from ..inputs import is_image_file

    if not masks:
        return items
    if len(masks) == 1 and Path(masks[0]).is_dir():
        folder = Path(masks[0])
        out = []
        for (cid, item, m, lab), i in zip(items, ids):
            cands = [f for f in sorted(folder.iterdir()) if is_image_file(f)
                     and (f.name.startswith(f"{i}_mask.") or f.name.split(".")[0] == i)]
            out.append((cid, item, cands[0] if cands else m, lab))
        return out
    if len(masks) != len(items):
        raise InputError(f"--masks: {len(masks)} mask(s) for {len(items)} image(s); give one per image "
                         f"(same order) or a folder")
    for m in masks:
        if not Path(m).exists():
            raise InputError(f"{m}: mask not found")
    return [(cid, item, Path(m), lab) for (cid, item, _, lab), m in zip(items, masks)]


def _score_labels(explainer, hm, known_label) -> list[str]:
    """Which label's map is scored against the mask: binary -> positive; else true (or predicted) labels."""
    spec = explainer.spec
    names = spec.label_names
    if spec.task_type == "binary":
        wanted = [names[1]]
    elif known_label is not None:
        lab = np.asarray(known_label).ravel()
        wanted = [names[int(lab[0])]] if spec.task_type == "multiclass" else [n for n, v in zip(names, lab) if v]
    elif spec.task_type == "multiclass":
        wanted = [max(hm.probabilities, key=hm.probabilities.get)]
    else:
        wanted = [n for n in names if hm.probabilities[n] > spec.threshold]
    return [w for w in wanted if w in hm.labels]


# ---------------------------------------------------------------------------------------------- run
def run_explain(explainer, items, out: Path, labels: list[str] | None = None, figure: bool = True, top_k: int = 6,
                tolerance_mm: float = 0.0, seed: int = 0, log=print) -> dict:
    """Explain every item, write maps/figures, and (given masks) localisation tables. Returns the summary."""
    from ..predict import case_id_from
    from .localization import SCORES, load_mask, localization_scores, random_map, summarise

    out.mkdir(parents=True, exist_ok=True)
    cases, rows, skipped = [], [], []
    for cid, item, mask_path, known in items:
        case_id = cid or case_id_from(item)
        hm = explainer.explain(item, case_id=case_id, labels=labels)
        mask = load_mask(mask_path, hm.record) if mask_path is not None else None
        files = explainer.write(hm, out, figure=figure, top_k=top_k, mask=mask)
        entry = {"id": case_id, "source": hm.source, "method": hm.method, "labels": hm.labels,
                 "probabilities": hm.probabilities, "files": [p.name for p in files],
                 "shape": list(hm.record.input_shape), "seconds": round(hm.seconds, 3)}
        msg = ""
        if mask is not None:
            entry["mask"] = str(mask_path)
            if not mask.any():
                skipped.append(case_id)
                msg = "  (empty mask: not scored)"
            else:
                spacing = tuple(float(v) for v in np.sqrt((hm.affine[:3, :3] ** 2).sum(axis=0)))
                rnd = localization_scores(random_map(mask.shape, case_id, seed), mask, tolerance_mm, spacing)
                for lab in _score_labels(explainer, hm, known):
                    sc = localization_scores(hm.maps[lab], mask, tolerance_mm, spacing)
                    row = {"id": case_id, "label": lab, **sc, **{f"random_{k}": v for k, v in rnd.items()},
                           "mask_fraction": float(mask.mean()), "probability": hm.probabilities.get(lab)}
                    rows.append(row)
                    msg += (f"  [{lab}: pointing {sc['pointing_game']:.0f}, energy {sc['energy_in_mask']:.3f}, "
                            f"AUROC {sc['auroc']:.3f}]")
                entry["scores"] = [r for r in rows if r["id"] == case_id]
        cases.append(entry)
        log(f"{case_id}: {', '.join(p.name for p in files if p.suffix != '.png')}{msg}  {hm.seconds:.2f} s")

    summary = {"plugin": getattr(explainer, "source", ""), "backbone": explainer.spec.backbone,
               "method": explainer.method, "cases": cases}
    _write_json(summary, out / "explain.json")
    if rows or skipped:
        loc = {"method": explainer.method, "cam_layers": explainer.resolved_cam_layers,
               "smooth_mm": explainer.smooth_mm,
               "backbone": explainer.spec.backbone, "task": explainer.spec.task, "n_scored": len(rows),
               "n_cases": len({r["id"] for r in rows}), "skipped_empty_mask": skipped, "tolerance_mm": tolerance_mm,
               "random_seed": seed, "mean": summarise(rows), "random": summarise(rows, "random_"),
               "mean_mask_fraction": float(np.mean([r["mask_fraction"] for r in rows])) if rows else None,
               "cases": rows}
        _write_json(loc, out / "localization.json")
        from ..io import atomic_write

        with atomic_write(out / "localization.csv") as tmp:
            with open(tmp, "w", newline="") as fh:
                cols = ["id", "label", *SCORES, *[f"random_{s}" for s in SCORES], "mask_fraction", "probability"]
                w = csv.DictWriter(fh, fieldnames=cols, extrasaction="ignore")
                w.writeheader()
                w.writerows(rows)
        summary["localization"] = {k: loc[k] for k in ("n_scored", "mean", "random")}
        if rows:
            m, r = loc["mean"], loc["random"]
            log(f"localisation over {len(rows)} map(s) ({explainer.method}): pointing game {m['pointing_game']:.3f} "
                f"(random {r['pointing_game']:.3f}), energy in mask {m['energy_in_mask']:.3f} "
                f"(random {r['energy_in_mask']:.3f}), voxel AUROC {m['auroc']:.3f} (random {r['auroc']:.3f})")
    return summary


def _write_json(obj, path: Path) -> None:
    from ..io import write_json

    write_json(obj, path, default=float)


def cmd_explain(a: argparse.Namespace) -> int:
    from ..predict import case_id_from, load
    from .heatmap import Explainer

    predictor = load(a.plugin, weights=a.weights, device=a.device)
    explainer = Explainer(predictor, method=a.method, cam_layers=a.cam_layers, smooth_mm=a.smooth_mm)
    explainer.source = str(a.plugin)
    labels = [t.strip() for t in a.labels.split(",") if t.strip()] if a.labels else None
    if labels:
        explainer._label_targets(labels)  # unknown label: fail before any work
    items = expand_items(a.images, predictor.spec, a.split, a.positives_only)
    items = _attach_masks(items, a.masks, [cid or case_id_from(it) for cid, it, _, _ in items])
    t0 = time.perf_counter()
    run_explain(explainer, items, a.out, labels, figure=not a.no_figure, top_k=a.top_k,
                tolerance_mm=a.tolerance_mm, seed=a.seed)
    print(f"wrote heatmaps for {len(items)} volume(s) to {a.out} in {time.perf_counter() - t0:.1f} s")
    return 0


def write_heatmaps(predictor, items, out: Path, method: str = "auto", log=print) -> dict:
    """``predict --heatmaps``: heatmaps (NIfTI + PNG) next to the prediction JSONs; items as in cmd_predict."""
    from ..predict import case_id_from
    from .heatmap import Explainer

    explainer = Explainer(predictor, method=method)
    explainer.source = getattr(predictor, "source", "")
    expanded = []
    for cid, item in items:
        mask = getattr(item, "mask", None)
        expanded.append((cid or case_id_from(item), item, mask, None))
    return run_explain(explainer, expanded, out, log=log)
