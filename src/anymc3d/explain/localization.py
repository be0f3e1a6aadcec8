"""Localisation scores of a heatmap against a ground-truth mask, on the input's own voxel grid.

* pointing game: the heatmap's maximum falls inside the mask (optionally within ``tolerance_mm``
  of it). When several voxels share the maximum (plateaus from upsampled coarse maps), the
  maximal voxel nearest to the plateau's centroid is the pointing location, so the result does
  not depend on scan order.
* energy in mask: sum of the (non-negative) heatmap inside the mask / its total sum.
* voxel AUROC: the heatmap as a voxel-wise score for "inside the mask" (rank-based, ties count
  one half), 0.5 for an uninformative map.

All three are invariant to positive rescaling of the heatmap, so normalised and raw maps score
the same. The random baseline is an i.i.d. uniform map on the same grid (seeded per case): its
expected pointing game and energy are the mask's volume fraction, its expected AUROC 0.5.
"""
from __future__ import annotations

import csv
import zlib
from pathlib import Path

import numpy as np
from scipy import ndimage
from scipy.stats import rankdata

from ..errors import InputError
from ..io import read_volume
from ..preprocess.spatial import SpatialRecord, apply_spatial
from ..volume import Volume

SCORES = ("pointing_game", "energy_in_mask", "auroc")


def pointing_location(heat: np.ndarray) -> tuple[int, ...]:
    """Index of the maximum; among tied maxima, the one nearest their centroid."""
    h = np.asarray(heat)
    mx = np.nanmax(h)
    idx = np.argwhere(h >= mx)
    if len(idx) == 1:
        return tuple(int(v) for v in idx[0])
    centroid = idx.mean(axis=0)
    return tuple(int(v) for v in idx[np.argmin(((idx - centroid) ** 2).sum(axis=1))])


def pointing_game(heat: np.ndarray, mask: np.ndarray, tolerance_mm: float = 0.0,
                  spacing: tuple[float, ...] | None = None) -> float:
    m = np.asarray(mask) > 0
    loc = pointing_location(heat)
    if m[loc]:
        return 1.0
    if tolerance_mm <= 0:
        return 0.0
    dist = ndimage.distance_transform_edt(~m, sampling=spacing)
    return float(dist[loc] <= tolerance_mm)


def energy_in_mask(heat: np.ndarray, mask: np.ndarray) -> float:
    h = np.clip(np.asarray(heat, dtype=np.float64), 0, None)
    total = h.sum()
    if total <= 0:
        return float("nan")
    return float(h[np.asarray(mask) > 0].sum() / total)


def voxel_auroc(heat: np.ndarray, mask: np.ndarray) -> float:
    """Mann-Whitney AUROC of heatmap values, mask voxels vs the rest."""
    y = (np.asarray(mask) > 0).ravel()
    n_pos = int(y.sum())
    n_neg = y.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = rankdata(np.asarray(heat, dtype=np.float64).ravel())
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def localization_scores(heat: np.ndarray, mask: np.ndarray, tolerance_mm: float = 0.0,
                        spacing: tuple[float, ...] | None = None) -> dict[str, float]:
    if tuple(np.shape(heat)) != tuple(np.shape(mask)):
        raise ValueError(f"heatmap shape {np.shape(heat)} != mask shape {np.shape(mask)}")
    return {"pointing_game": pointing_game(heat, mask, tolerance_mm, spacing),
            "energy_in_mask": energy_in_mask(heat, mask),
            "auroc": voxel_auroc(heat, mask)}


def random_map(shape: tuple[int, ...], key: str, seed: int = 0) -> np.ndarray:
    """The random-map baseline: i.i.d. uniform values, reproducible per (case key, seed)."""
    rng = np.random.default_rng([seed, zlib.crc32(key.encode())])
    return rng.random(shape, dtype=np.float32)


def summarise(rows: list[dict], prefix: str = "") -> dict[str, float | None]:
    """Mean (over rows with a finite value) of each score; keys ``prefix + score``."""
    out: dict[str, float | None] = {}
    for s in SCORES:
        vals = [r[prefix + s] for r in rows if r.get(prefix + s) is not None and np.isfinite(r[prefix + s])]
        out[s] = float(np.mean(vals)) if vals else None
    return out


def load_mask(path_or_volume, record: SpatialRecord) -> np.ndarray:
    """A mask on the input's grid (shape and affine must match the image): bool (X, Y, Z)."""
    vol = path_or_volume if isinstance(path_or_volume, Volume) else read_volume(path_or_volume)
    arr = np.asarray(vol.array)
    if arr.ndim == 4 and arr.shape[0] == 1:
        arr = arr[0]
    if tuple(arr.shape) != tuple(record.input_shape):
        raise InputError(f"{vol.source}: mask shape {tuple(arr.shape)} does not match image "
                         f"{record.input_path} shape {tuple(record.input_shape)}")
    if not np.allclose(np.asarray(vol.affine), record.input_affine, rtol=0, atol=1e-3):
        raise InputError(f"{vol.source}: mask affine differs from image {record.input_path}")
    return arr > 0


def canonical_mask(mask: np.ndarray, record: SpatialRecord) -> np.ndarray:
    """An input-grid mask on the canonical grid (nearest neighbour), for figures."""
    return apply_spatial(mask.astype(np.uint8), record, order=0) > 0


# ------------------------------------------------------------------------- one case, one table
def score_labels(explainer, hm, known_label) -> list[str]:
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
        raw = hm.raw_probabilities or hm.probabilities  # the stored threshold is on the raw scale
        wanted = [n for n in names if raw[n] > spec.threshold]
    return [w for w in wanted if w in hm.labels]


def score_case(explainer, hm, mask: np.ndarray, case_id: str, known_label=None, tolerance_mm: float = 0.0,
               seed: int = 0) -> list[dict] | None:
    """One explained case against its mask: a row per scored label (its scores, the random map's, the
    mask fraction, the probability); ``None`` for an empty mask (nothing to point at)."""
    if not mask.any():
        return None
    spacing = tuple(float(v) for v in np.sqrt((np.asarray(hm.affine)[:3, :3] ** 2).sum(axis=0)))
    rnd = localization_scores(random_map(mask.shape, case_id, seed), mask, tolerance_mm, spacing)
    rows = []
    for lab in score_labels(explainer, hm, known_label):
        sc = localization_scores(hm.maps[lab], mask, tolerance_mm, spacing)
        rows.append({"id": case_id, "label": lab, **sc, **{f"random_{k}": v for k, v in rnd.items()},
                     "mask_fraction": float(mask.mean()), "probability": hm.probabilities.get(lab)})
    return rows


def localization_table(explainer, rows: list[dict], skipped: list[str], out: Path, tolerance_mm: float = 0.0,
                       seed: int = 0) -> dict:
    """Write ``out/localization.json`` (means, the random baseline, every row) and ``localization.csv``
    from the rows of :func:`score_case`; returns the JSON's content. ``explain`` and ``predict
    --heatmaps`` (whose rows come from every rank's per-volume JSON) both write it."""
    from ..io import atomic_write, write_json

    loc = {"method": explainer.method, "cam_layers": explainer.resolved_cam_layers, "smooth_mm": explainer.smooth_mm,
           "backbone": explainer.spec.backbone, "task": explainer.spec.task, "n_scored": len(rows),
           "n_cases": len({r["id"] for r in rows}), "skipped_empty_mask": skipped, "tolerance_mm": tolerance_mm,
           "random_seed": seed, "mean": summarise(rows), "random": summarise(rows, "random_"),
           "mean_mask_fraction": float(np.mean([r["mask_fraction"] for r in rows])) if rows else None,
           "cases": rows}
    write_json(loc, Path(out) / "localization.json", default=float)
    with atomic_write(Path(out) / "localization.csv") as tmp:
        with open(tmp, "w", newline="", encoding="utf-8") as fh:
            cols = ["id", "label", *SCORES, *[f"random_{s}" for s in SCORES], "mask_fraction", "probability"]
            w = csv.DictWriter(fh, fieldnames=cols, extrasaction="ignore")
            w.writeheader()
            w.writerows(rows)
    return loc
