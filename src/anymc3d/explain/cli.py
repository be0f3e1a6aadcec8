"""``anymc3d explain PLUGIN IMAGE... --out DIR [--masks MASK...]`` (``predict --heatmaps``: ``anymc3d.batch_predict``).

IMAGE is a file, a folder (of image files, or one DICOM series) or a manifest CSV (its mask
column supplies masks). Per case: ``<id>_heatmap.nii.gz`` (binary) or ``<id>_<label>_heatmap.nii.gz``
(one per label), with the input's shape and affine, and a PNG figure beside it. With masks:
``localization.json`` / ``localization.csv`` with pointing game, energy in mask and voxel AUROC,
and the same scores for a random map.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

from ..cli_args import add_device_args, add_weights_arg
from ..errors import InputError


HELP = "3D heatmaps in the input's space (+ localisation scores given masks)"
DESCRIPTION = ("Write per-volume heatmaps (NIfTI with the input's shape and affine, and a PNG figure); given masks, "
               "localisation scores against them with a random-map baseline (localization.json).")


def register(subparsers) -> dict:
    x = subparsers.add_parser("explain", help=HELP, description=DESCRIPTION)
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


# ---------------------------------------------------------------------------------------------- run
def run_explain(explainer, items, out: Path, labels: list[str] | None = None, figure: bool = True, top_k: int = 6,
                tolerance_mm: float = 0.0, seed: int = 0, log=print) -> dict:
    """Explain every item, write maps/figures, and (given masks) localisation tables. Returns the summary."""
    from ..predict import case_id_from
    from .localization import load_mask, localization_table, score_case

    out.mkdir(parents=True, exist_ok=True)
    cases, rows, skipped = [], [], []
    for cid, item, mask_path, known in items:
        case_id = cid or case_id_from(item)
        hm = explainer.explain(item, case_id=case_id, labels=labels)
        mask = load_mask(mask_path, hm.record) if mask_path is not None else None
        files = explainer.write(hm, out, figure=figure, top_k=top_k, mask=mask)
        entry = {"id": case_id, "source": hm.source, "method": hm.method, "labels": hm.labels,
                 "probabilities": hm.probabilities, "raw_probabilities": hm.raw_probabilities,
                 "files": [p.name for p in files],
                 "shape": list(hm.record.input_shape), "seconds": round(hm.seconds, 3)}
        msg = ""
        if mask is not None:
            entry["mask"] = str(mask_path)
            scores = score_case(explainer, hm, mask, case_id, known, tolerance_mm, seed)
            if scores is None:
                skipped.append(case_id)
                msg = "  (empty mask: not scored)"
            else:
                rows.extend(scores)
                msg = "".join(f"  [{r['label']}: pointing {r['pointing_game']:.0f}, energy {r['energy_in_mask']:.3f}, "
                              f"AUROC {r['auroc']:.3f}]" for r in scores)
                entry["scores"] = scores
        cases.append(entry)
        log(f"{case_id}: {', '.join(p.name for p in files if p.suffix != '.png')}{msg}  {hm.seconds:.2f} s")

    summary = {"plugin": getattr(explainer, "source", ""), "backbone": explainer.spec.backbone,
               "method": explainer.method, "cases": cases}
    _write_json(summary, out / "explain.json")
    if rows or skipped:
        loc = localization_table(explainer, rows, skipped, out, tolerance_mm, seed)
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
