"""The dataset fingerprint (``fingerprint.json``): what the plan needs to know about the data.

Per input: shape and spacing statistics over (a sample of) the volumes, the intensity type (CT in
Hounsfield units, MRI / other scalar, binary, uint8), and which inputs and masks exist; per task:
the cases per split and the label balance. Like nnU-Net's fingerprint, it is computed once from
the data and the plan is derived from it; it never looks at test labels beyond counting them.
"""
from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np

from ..data import TaskData
from ..io import read_volume
from ..volume import Volume

#: volumes read per input for the shape / spacing / intensity statistics (a seeded sample when more)
SAMPLE = 64


def intensity_kind(values: np.ndarray, dtype: str) -> str:
    """``ct`` (Hounsfield units), ``binary``, ``uint8`` or ``mri`` (any other scalar image)."""
    v = values[np.isfinite(values)]
    if v.size == 0:
        return "mri"
    uniq = np.unique(v[: 200_000])
    if len(uniq) <= 2 and set(np.round(uniq, 6)).issubset({0.0, 1.0}):
        return "binary"
    lo, hi = float(np.percentile(v, 0.5)), float(np.percentile(v, 99.5))
    if lo < -500 and hi > 300 and float(v.min()) >= -3100:
        return "ct"
    integer = bool(np.all(np.mod(uniq[:5000], 1) == 0))
    if integer and float(v.min()) >= 0 and float(v.max()) <= 255 and (dtype == "uint8" or float(v.max()) > 1):
        return "uint8"
    return "mri"


def _stats(x: list[float]) -> dict:
    a = np.asarray(x, dtype=float)
    return {"min": float(a.min()), "median": float(np.median(a)), "max": float(a.max())}


def _volume(item) -> Volume:
    return item if isinstance(item, Volume) else read_volume(item)


def fingerprint(task: TaskData, sample: int = SAMPLE, seed: int = 0) -> dict:
    """The fingerprint of ``task`` (JSON-ready)."""
    labelled = [c for c in task.cases if c.label is not None]
    splits = Counter(c.split or "unassigned" for c in labelled)
    train = [c for c in labelled if c.split in ("train", None, "", "unassigned")] or labelled
    y = np.stack([c.label for c in train])
    if task.task_type == "multilabel":
        balance = {n: float(v) for n, v in zip(task.label_names, y.reshape(len(y), -1).mean(axis=0))}
    else:
        counts = np.bincount(y.reshape(-1).astype(int), minlength=len(task.label_names))
        balance = {n: int(v) for n, v in zip(task.label_names, counts)}
    rng = np.random.default_rng(seed)
    inputs = {}
    for name in task.inputs:
        have = [c for c in task.cases if c.images.get(name) is not None]
        pick = have if len(have) <= sample else [have[i] for i in sorted(rng.choice(len(have), sample, replace=False))]
        shapes, spacings, kinds, channels, vals = [], [], Counter(), Counter(), []
        for c in pick:
            vol = _volume(c.images[name])
            arr = np.asarray(vol.array)
            shapes.append(vol.spatial_shape)
            spacings.append(vol.spacing)
            channels[int(arr.shape[0]) if arr.ndim == 4 else 1] += 1
            flat = arr.reshape(-1)
            vals.append(flat[rng.choice(flat.size, min(flat.size, 20_000), replace=False)].astype(np.float64))
            kinds[intensity_kind(flat[:: max(1, flat.size // 200_000)].astype(np.float64), str(arr.dtype))] += 1
        sh = np.asarray(shapes, dtype=float)
        sp = np.asarray(spacings, dtype=float)
        allv = np.concatenate(vals) if vals else np.zeros(1)
        inputs[name] = {
            "n_volumes": len(have), "n_sampled": len(pick),
            "shape": {ax: _stats(sh[:, i]) for i, ax in enumerate("xyz")},
            "spacing_mm": {ax: _stats(sp[:, i]) for i, ax in enumerate("xyz")},
            "anisotropy": float(np.median(sp.max(axis=1) / np.maximum(sp.min(axis=1), 1e-6))),
            "intensity": kinds.most_common(1)[0][0],
            "intensity_percentiles": {p: float(np.percentile(allv, p)) for p in (0.5, 50, 99.5)},
            "channels": channels.most_common(1)[0][0],
        }
    return {
        "source": str(task.source), "task": task.name, "task_type": task.task_type, "label_names": task.label_names,
        "n_cases": len(task.cases), "n_labelled": len(labelled), "splits": dict(sorted(splits.items())),
        "label_balance": balance, "inputs": inputs, "data_intensity_preset": task.intensity,
        "masks": int(sum(c.mask is not None for c in task.cases)),
    }


def slices_per_view(fp: dict, input_name: str | None = None, max_slices: int | None = None) -> dict[str, int]:
    """Median number of slices of each view (axial = z, coronal = y, sagittal = x) of an input."""
    inp = fp["inputs"][input_name or next(iter(fp["inputs"]))]
    n = {"axial": inp["shape"]["z"]["median"], "coronal": inp["shape"]["y"]["median"],
         "sagittal": inp["shape"]["x"]["median"]}
    return {v: int(min(k, max_slices) if max_slices else k) for v, k in n.items()}


def in_plane_size(fp: dict, input_name: str | None = None) -> float:
    """Median in-plane side (of the axial slices) of an input, in voxels."""
    inp = fp["inputs"][input_name or next(iter(fp["inputs"]))]
    return float(max(inp["shape"]["x"]["median"], inp["shape"]["y"]["median"]))


def write_fingerprint(fp: dict, path: str | Path) -> Path:
    from ..io import write_json

    write_json(fp, Path(path))
    return Path(path)
