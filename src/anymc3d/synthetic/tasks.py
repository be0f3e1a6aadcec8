"""Labelled synthetic tasks built from the phantoms, and writing them to NIfTI + manifest CSV.

Public API: :data:`TASKS`, :func:`make_task`, :func:`write_task`, :class:`SyntheticDataset`.
See ``docs/synthetic.md`` for what each task is and what its knobs do.
"""
from __future__ import annotations

import csv
import inspect
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from ..errors import InputError
from ..io import atomic_write
from .phantoms import (
    ANATOMY_LABELS,
    DEFAULT_CT_CONTRAST,
    LESION_ORGANS,
    Grid,
    Lesion,
    finish_ct,
    finish_mri,
    lesion_semi_vox,
    paint,
    place_lesion,
    render_anatomy_weights,
    render_lesion,
    sample_anatomy,
    smooth_field,
)

DEFAULT_SIZE = 40
MIN_SIZE = 16


@dataclass
class SyntheticDataset:
    """An in-memory labelled dataset.

    ``images[key][i]`` is case i's float32 (X, Y, Z) array for image ``key`` ("image", or "t1"/"t2");
    ``masks[i]`` the uint8 lesion mask (all zero when the case has no lesion); ``labels`` is (N,) int
    (binary 0/1 or class index into ``label_names``) or (N, K) uint8 {0,1} for multilabel.
    """

    task: str
    images: dict[str, list[np.ndarray]]
    labels: np.ndarray
    label_names: list[str]
    task_type: str
    masks: list[np.ndarray]
    affine: np.ndarray
    intensity: str
    ids: list[str] = field(default_factory=list)
    anatomy: list[np.ndarray] = field(default_factory=list)  # uint8 organ label maps (ANATOMY_LABELS)
    meta: list[dict[str, Any]] = field(default_factory=list)  # per case: lesions (organ, centre, axes)
    knobs: dict[str, Any] = field(default_factory=dict)
    seed: int = 0

    def __len__(self) -> int:
        return int(len(self.masks))

    @property
    def image_keys(self) -> list[str]:
        return list(self.images.keys())

    @property
    def spacing(self) -> tuple[float, float, float]:
        return tuple(float(s) for s in np.sqrt((self.affine[:3, :3] ** 2).sum(axis=0)))  # type: ignore[return-value]

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(int(s) for s in self.masks[0].shape)  # type: ignore[return-value]


# ---------------------------------------------------------------------------------------------
# knob parsing
# ---------------------------------------------------------------------------------------------
def _triple(name: str, value, cast, what: str) -> tuple:
    """``value`` as 3 numbers of type ``cast`` (a scalar is repeated); InputError naming ``what`` if not."""
    if np.isscalar(value):
        value = (value, value, value)
    try:
        return tuple(cast(v) for v in value)
    except (TypeError, ValueError):
        raise InputError(f"synthetic: {name} must be {what}, got {value!r}") from None


def _size3(size) -> tuple[int, int, int]:
    s = _triple("size", size, int, "an int or 3 ints")
    if len(s) != 3 or min(s) < MIN_SIZE:
        raise InputError(f"synthetic: size must be an int or 3 ints, each >= {MIN_SIZE}; got {size!r}")
    return s  # type: ignore[return-value]


def _spacing3(spacing) -> tuple[float, float, float]:
    s = _triple("spacing", spacing, float, "a float or 3 floats")
    if len(s) != 3 or not all(np.isfinite(v) and v > 0 for v in s):
        raise InputError(f"synthetic: spacing must be 3 positive numbers, got {spacing!r}")
    return s  # type: ignore[return-value]


def _prob(name: str, p: float) -> float:
    p = float(p)
    if not 0.0 <= p <= 1.0:
        raise InputError(f"synthetic: {name} must be in [0, 1], got {p}")
    return p


def _binary_lesions(size, spacing, seed: int, n_cases: int, prevalence, lesion_radius, lesion_radius_mm):
    """The start of every binary lesion task: its grid, its random generator, balanced labels at
    ``prevalence`` (drawn first) and the lesion radius in mm."""
    grid = Grid(_size3(size), _spacing3(spacing))
    rng = np.random.default_rng(seed)
    labels = _balanced_binary(rng, n_cases, _prob("prevalence", prevalence))
    return grid, rng, labels, _radius_mm(grid, lesion_radius, lesion_radius_mm)


def _radius_mm(grid: Grid, lesion_radius: float, lesion_radius_mm: float | None) -> float:
    r = float(lesion_radius_mm) if lesion_radius_mm is not None else float(lesion_radius) * grid.spacing[0]
    if not r > 0:
        raise InputError(f"synthetic: lesion radius must be > 0, got {r}")
    return r


def _balanced_binary(rng: np.random.Generator, n: int, p: float) -> np.ndarray:
    n_pos = int(round(n * p))
    return rng.permutation(np.r_[np.ones(n_pos, np.int64), np.zeros(n - n_pos, np.int64)])


def _case_rngs(rng: np.random.Generator, n: int) -> list[np.random.Generator]:
    seeds = rng.integers(0, np.iinfo(np.int64).max, size=n, dtype=np.int64)
    return [np.random.default_rng(int(s)) for s in seeds]


def _ids(n: int) -> list[str]:
    w = max(4, len(str(n - 1)))
    return [f"case_{i:0{w}d}" for i in range(n)]


# ---------------------------------------------------------------------------------------------
# one case
# ---------------------------------------------------------------------------------------------
@dataclass
class _LesionSpec:
    organ: str
    kind: str
    radius_mm: float
    contrast: dict[str, float]
    stretch: tuple[float, float, float] = (1.0, 1.0, 1.0)
    edge_vox: float = 0.6


def _make_case(
    rng: np.random.Generator,
    grid: Grid,
    specs: Sequence[_LesionSpec],
    channels: dict[str, str],
    *,
    noise: float,
    texture: float,
    texture_sigma: float,
    radius_jitter: float,
    anatomy_jitter: float,
    bias: float = 0.0,
) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray, list[Lesion]]:
    anat = render_anatomy_weights(sample_anatomy(rng, grid, anatomy_jitter))
    lesions: list[Lesion] = []
    for sp in specs:
        r = sp.radius_mm * (1.0 + radius_jitter * rng.uniform(-1.0, 1.0))
        semi = lesion_semi_vox(grid, r, sp.stretch)
        centre = place_lesion(rng, anat, sp.organ, semi, lesions)
        lesions.append(Lesion(sp.organ, sp.kind, centre, semi, dict(sp.contrast), sp.edge_vox))
    mask = np.zeros(grid.shape, dtype=np.uint8)
    images: dict[str, np.ndarray] = {}
    for j, (key, ch) in enumerate(channels.items()):
        img = paint(anat, ch)
        m = mask if j == 0 else np.zeros_like(mask)
        for les in lesions:
            render_lesion(img, m, anat, les, ch)
        tex = smooth_field(rng, grid.shape, texture_sigma) if texture > 0 else None
        if ch == "ct":
            img = finish_ct(img, anat, rng, noise, texture, tex)
        else:
            img = finish_mri(img, anat, rng, noise, texture, tex, bias)
        images[key] = img.astype(np.float32, copy=False)
    return images, mask, anat.labels, lesions


def _assemble(
    task: str,
    task_type: str,
    label_names: list[str],
    labels: np.ndarray,
    case_specs: list[list[_LesionSpec]],
    channels: dict[str, str],
    grid: Grid,
    rng: np.random.Generator,
    intensity: str,
    knobs: dict[str, Any],
    seed: int,
    **render_kw,
) -> SyntheticDataset:
    n = len(case_specs)
    images: dict[str, list[np.ndarray]] = {k: [] for k in channels}
    masks, anatomy, meta = [], [], []
    for crng, specs in zip(_case_rngs(rng, n), case_specs):
        imgs, mask, lab, lesions = _make_case(crng, grid, specs, channels, **render_kw)
        for k in channels:
            images[k].append(imgs[k])
        masks.append(mask)
        anatomy.append(lab)
        meta.append({"lesions": [les.to_dict() for les in lesions]})
    return SyntheticDataset(
        task=task, images=images, labels=labels, label_names=label_names, task_type=task_type,
        masks=masks, affine=grid.affine, intensity=intensity, ids=_ids(n), anatomy=anatomy,
        meta=meta, knobs=knobs, seed=int(seed),
    )


def _ct_spec(organ: str, radius_mm: float, contrast: float | None, **kw) -> _LesionSpec:
    c = DEFAULT_CT_CONTRAST[organ] if contrast is None else float(contrast)
    if c == 0.0:
        raise InputError("synthetic: contrast 0 makes the lesion invisible; use a non-zero HU difference")
    return _LesionSpec(organ, "hypodense" if c < 0 else "hyperdense", radius_mm, {"ct": c}, **kw)


def _ct_render_kw(noise, texture, texture_sigma, radius_jitter, anatomy_jitter) -> dict[str, Any]:
    if noise < 0 or texture < 0 or texture_sigma <= 0 or radius_jitter < 0 or radius_jitter >= 1:
        raise InputError("synthetic: noise/texture must be >= 0, texture_sigma > 0, 0 <= radius_jitter < 1")
    return dict(noise=float(noise), texture=float(texture), texture_sigma=float(texture_sigma),
                radius_jitter=float(radius_jitter), anatomy_jitter=float(anatomy_jitter))


# ---------------------------------------------------------------------------------------------
# tasks
# ---------------------------------------------------------------------------------------------
def lesion_binary(
    n_cases: int, seed: int = 0, *, size=DEFAULT_SIZE, spacing=1.0, organ: str = "liver",
    lesion_radius: float = 3.0, lesion_radius_mm: float | None = None, contrast: float | None = None,
    noise: float = 10.0, texture: float = 6.0, texture_sigma: float = 2.0, prevalence: float = 0.5,
    radius_jitter: float = 0.15, anatomy_jitter: float = 1.0,
) -> SyntheticDataset:
    """Binary: 1 if one small lesion is present (in ``organ``; "any" = liver or a kidney), else 0."""
    knobs = dict(locals()); knobs.pop("n_cases"); knobs.pop("seed")
    organs = ("liver", "left_kidney", "right_kidney") if organ == "any" else (organ,)
    for o in organs:
        if o not in LESION_ORGANS:
            raise InputError(f"synthetic: organ must be one of {LESION_ORGANS + ('any',)}, got {organ!r}")
    grid, rng, labels, r = _binary_lesions(size, spacing, seed, n_cases, prevalence, lesion_radius, lesion_radius_mm)
    where = rng.integers(0, len(organs), size=n_cases)
    specs = [[_ct_spec(organs[w], r, contrast)] if y else [] for y, w in zip(labels, where)]
    return _assemble("lesion_binary", "binary", ["absent", "present"], labels, specs, {"image": "ct"},
                     grid, rng, "ct", knobs, seed,
                     **_ct_render_kw(noise, texture, texture_sigma, radius_jitter, anatomy_jitter))


def lesion_location(
    n_cases: int, seed: int = 0, *, size=DEFAULT_SIZE, spacing=1.0,
    organs: Sequence[str] = ("liver", "left_kidney", "right_kidney"),
    lesion_radius: float = 3.0, lesion_radius_mm: float | None = None, contrast: float | None = None,
    noise: float = 10.0, texture: float = 6.0, texture_sigma: float = 2.0,
    radius_jitter: float = 0.15, anatomy_jitter: float = 1.0,
) -> SyntheticDataset:
    """Multi-class: every case has one lesion; the class is the organ that holds it (balanced)."""
    knobs = dict(locals()); knobs.pop("n_cases"); knobs.pop("seed")
    organs = [str(o) for o in organs]
    if len(organs) < 2 or len(set(organs)) != len(organs) or any(o not in LESION_ORGANS for o in organs):
        raise InputError(f"synthetic: organs must be >= 2 distinct names from {LESION_ORGANS}, got {organs!r}")
    knobs["organs"] = organs
    grid = Grid(_size3(size), _spacing3(spacing))
    rng = np.random.default_rng(seed)
    labels = rng.permutation(np.arange(n_cases, dtype=np.int64) % len(organs))
    r = _radius_mm(grid, lesion_radius, lesion_radius_mm)
    specs = [[_ct_spec(organs[y], r, contrast)] for y in labels]
    return _assemble("lesion_location", "multiclass", organs, labels, specs, {"image": "ct"},
                     grid, rng, "ct", knobs, seed,
                     **_ct_render_kw(noise, texture, texture_sigma, radius_jitter, anatomy_jitter))


LESION_TYPES = ("hypodense", "hyperdense", "calcified")


def lesion_types(
    n_cases: int, seed: int = 0, *, size=DEFAULT_SIZE, spacing=1.0, organ: str = "liver",
    lesion_radius: float = 3.0, lesion_radius_mm: float | None = None, contrast: float = 60.0,
    calcified_radius: float = 1.5, calcified_contrast: float = 600.0,
    noise: float = 10.0, texture: float = 6.0, texture_sigma: float = 2.0, prevalence: float = 0.5,
    radius_jitter: float = 0.15, anatomy_jitter: float = 1.0,
) -> SyntheticDataset:
    """Multi-label: any subset of {hypodense, hyperdense, calcified} lesions in ``organ``.

    Each label is positive in exactly round(prevalence * N) cases, drawn independently per label
    (so with 0.5 about 1/8 of cases have no lesion and 1/8 have all three).
    ``contrast`` is the magnitude for hypo- (-|c|) and hyper-dense (+|c|) lesions; calcifications are
    small (``calcified_radius`` voxels), sharp and very bright (``calcified_contrast`` HU).
    """
    knobs = dict(locals()); knobs.pop("n_cases"); knobs.pop("seed")
    if organ not in LESION_ORGANS:
        raise InputError(f"synthetic: organ must be one of {LESION_ORGANS}, got {organ!r}")
    grid = Grid(_size3(size), _spacing3(spacing))
    rng = np.random.default_rng(seed)
    p = _prob("prevalence", prevalence)
    labels = np.stack([_balanced_binary(rng, n_cases, p) for _ in LESION_TYPES], axis=1).astype(np.uint8)
    r = _radius_mm(grid, lesion_radius, lesion_radius_mm)
    rc = float(calcified_radius) * grid.spacing[0]
    c = abs(float(contrast))
    proto = {
        "hypodense": _LesionSpec(organ, "hypodense", r, {"ct": -c}),
        "hyperdense": _LesionSpec(organ, "hyperdense", r, {"ct": +c}),
        "calcified": _LesionSpec(organ, "calcified", rc, {"ct": float(calcified_contrast)}, edge_vox=0.3),
    }
    specs = [[proto[t] for t, on in zip(LESION_TYPES, row) if on] for row in labels]
    return _assemble("lesion_types", "multilabel", list(LESION_TYPES), labels, specs, {"image": "ct"},
                     grid, rng, "ct", knobs, seed,
                     **_ct_render_kw(noise, texture, texture_sigma, radius_jitter, anatomy_jitter))


def elongated(
    n_cases: int, seed: int = 0, *, size=DEFAULT_SIZE, spacing=1.0, organ: str = "liver",
    lesion_radius: float = 2.5, lesion_radius_mm: float | None = None, elongation: float = 2.5,
    contrast: float | None = None, noise: float = 10.0, texture: float = 6.0, texture_sigma: float = 2.0,
    prevalence: float = 0.5, radius_jitter: float = 0.1, anatomy_jitter: float = 1.0,
) -> SyntheticDataset:
    """Binary: every case has one lesion; 1 = elongated along z (S axis), 0 = round.

    Both kinds have the same in-plane radius, so an axial slice through either shows the same disc;
    the difference is obvious in coronal/sagittal views (the multi-view benchmark).
    """
    knobs = dict(locals()); knobs.pop("n_cases"); knobs.pop("seed")
    if not float(elongation) > 1.0:
        raise InputError(f"synthetic: elongation must be > 1, got {elongation}")
    if organ not in LESION_ORGANS:
        raise InputError(f"synthetic: organ must be one of {LESION_ORGANS}, got {organ!r}")
    grid, rng, labels, r = _binary_lesions(size, spacing, seed, n_cases, prevalence, lesion_radius, lesion_radius_mm)
    specs = [[_ct_spec(organ, r, contrast, stretch=(1.0, 1.0, float(elongation)) if y else (1.0, 1.0, 1.0))]
             for y in labels]
    return _assemble("elongated", "binary", ["round", "elongated"], labels, specs, {"image": "ct"},
                     grid, rng, "ct", knobs, seed,
                     **_ct_render_kw(noise, texture, texture_sigma, radius_jitter, anatomy_jitter))


def t2_only(
    n_cases: int, seed: int = 0, *, size=DEFAULT_SIZE, spacing=1.0, organ: str = "liver",
    lesion_radius: float = 3.0, lesion_radius_mm: float | None = None, contrast: float = 200.0,
    t1_contrast: float = 0.0, noise: float = 15.0, texture: float = 0.03, texture_sigma: float = 2.0,
    bias: float = 0.1, prevalence: float = 0.5, radius_jitter: float = 0.15, anatomy_jitter: float = 1.0,
) -> SyntheticDataset:
    """Multi-sequence binary: two co-registered MRI-like images ``t1`` and ``t2`` of the same anatomy;
    a lesion (label 1) changes T2 by ``contrast`` and T1 by ``t1_contrast`` (0 = invisible in T1)."""
    knobs = dict(locals()); knobs.pop("n_cases"); knobs.pop("seed")
    if organ not in LESION_ORGANS:
        raise InputError(f"synthetic: organ must be one of {LESION_ORGANS}, got {organ!r}")
    if not 0 <= bias < 1 or not 0 <= texture < 1:
        raise InputError("synthetic: t2_only needs 0 <= bias < 1 and 0 <= texture < 1 (fractions)")
    grid, rng, labels, r = _binary_lesions(size, spacing, seed, n_cases, prevalence, lesion_radius, lesion_radius_mm)
    specs = [[_LesionSpec(organ, "t2_hyperintense" if contrast >= 0 else "t2_hypointense", r,
                          {"t1": float(t1_contrast), "t2": float(contrast)})] if y else []
             for y in labels]
    kw = _ct_render_kw(noise, texture, texture_sigma, radius_jitter, anatomy_jitter)
    return _assemble("t2_only", "binary", ["absent", "present"], labels, specs, {"t1": "t1", "t2": "t2"},
                     grid, rng, "mri", knobs, seed, bias=float(bias), **kw)


#: name -> builder(n_cases, seed=0, **knobs)
TASKS: dict[str, Callable[..., SyntheticDataset]] = {
    "lesion_binary": lesion_binary,
    "lesion_location": lesion_location,
    "lesion_types": lesion_types,
    "elongated": elongated,
    "t2_only": t2_only,
}


def task_knobs(name: str) -> dict[str, Any]:
    """The knobs a task accepts, with their defaults."""
    if name not in TASKS:
        raise InputError(f"synthetic: unknown task {name!r}; choose one of {sorted(TASKS)}")
    sig = inspect.signature(TASKS[name])
    return {k: p.default for k, p in sig.parameters.items() if p.kind is inspect.Parameter.KEYWORD_ONLY}


def make_task(name: str, n_cases: int, seed: int = 0, **knobs) -> SyntheticDataset:
    """Build the synthetic task ``name`` with ``n_cases`` cases; same seed -> bit-identical arrays."""
    allowed = task_knobs(name)
    unknown = sorted(set(knobs) - set(allowed))
    if unknown:
        raise InputError(f"synthetic: task {name!r} has no knob(s) {unknown}; knobs are {sorted(allowed)}")
    if isinstance(n_cases, bool) or int(n_cases) != n_cases or int(n_cases) < 1:
        raise InputError(f"synthetic: n_cases must be a positive integer, got {n_cases!r}")
    return TASKS[name](int(n_cases), int(seed), **knobs)


# ---------------------------------------------------------------------------------------------
# writing
# ---------------------------------------------------------------------------------------------
SPLIT_NAMES = ("train", "val", "test")


def _stratified_splits(groups: Sequence[Any], fractions: Sequence[float], seed: int) -> list[str]:
    """Assign train/val/test so every group (stratum) is split ~proportionally and totals match.

    Cases are shuffled within each stratum, strata are visited in a fixed order, and each case goes
    to the split with the largest deficit (target share so far minus count), which interleaves
    splits inside every stratum and keeps the overall counts within one of the targets.
    """
    fr = np.asarray(fractions, dtype=np.float64)
    if fr.shape != (3,) or np.any(fr < 0) or fr.sum() <= 0:
        raise InputError(f"synthetic: splits must be 3 non-negative fractions (train, val, test), got {fractions!r}")
    fr = fr / fr.sum()
    rng = np.random.default_rng(seed)
    keys = [json.dumps(g, sort_keys=True, default=str) for g in groups]
    order: list[int] = []
    for k in sorted(set(keys)):
        idx = np.array([i for i, kk in enumerate(keys) if kk == k])
        order.extend(rng.permutation(idx).tolist())
    counts = np.zeros(3)
    out = [""] * len(keys)
    for t, i in enumerate(order):
        deficit = fr * (t + 1) - counts
        deficit[fr == 0] = -np.inf
        j = int(np.argmax(deficit))
        counts[j] += 1
        out[i] = SPLIT_NAMES[j]
    return out


def _atomic_nifti(array: np.ndarray, affine: np.ndarray, path: Path) -> None:
    import nibabel as nib

    img = nib.Nifti1Image(array, affine)
    img.header.set_xyzt_units("mm")
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    with atomic_write(path) as tmp:  # the project's one atomic writer: usual permissions, no half-written file
        nib.save(img, str(tmp))


def _atomic_text(text: str, path: Path) -> None:
    with atomic_write(path) as tmp:
        with open(tmp, "w", newline="", encoding="utf-8") as f:
            f.write(text)


def write_task(dataset: SyntheticDataset, out_dir, splits: Sequence[float] = (0.6, 0.2, 0.2), seed: int = 0) -> Path:
    """Write images/masks as NIfTI, ``manifest.csv`` and ``task.json`` under ``out_dir``.

    Layout: ``images/<id>.nii.gz`` (key "image") or ``images/<id>_<key>.nii.gz`` (other keys, e.g.
    ``_t1``/``_t2``), ``masks/<id>_mask.nii.gz``; manifest paths are relative to ``out_dir``.
    Returns the manifest path.
    """
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "masks").mkdir(parents=True, exist_ok=True)
    n = len(dataset)
    ids = dataset.ids or _ids(n)
    keys = dataset.image_keys
    aff = np.asarray(dataset.affine, dtype=np.float64)

    if dataset.task_type == "multilabel":
        label_columns = list(dataset.label_names)
        strata = [tuple(int(v) for v in row) for row in np.asarray(dataset.labels)]
    else:
        label_columns = ["label"]
        strata = [int(v) for v in np.asarray(dataset.labels)]
    split_of = _stratified_splits(strata, splits, seed)

    image_columns = keys
    header = ["id", *image_columns, *label_columns, "mask", "split"]
    rows = []
    for i in range(n):
        cid = ids[i]
        row: dict[str, Any] = {"id": cid}
        for k in keys:
            rel = f"images/{cid}.nii.gz" if k == "image" else f"images/{cid}_{k}.nii.gz"
            _atomic_nifti(np.asarray(dataset.images[k][i], dtype=np.float32), aff, out / rel)
            row[k] = rel
        mrel = f"masks/{cid}_mask.nii.gz"
        _atomic_nifti(np.asarray(dataset.masks[i], dtype=np.uint8), aff, out / mrel)
        row["mask"] = mrel
        y = np.asarray(dataset.labels)[i]
        if dataset.task_type == "multilabel":
            for name, v in zip(label_columns, y):
                row[name] = int(v)
        elif dataset.task_type == "multiclass":
            row["label"] = dataset.label_names[int(y)]
        else:
            row["label"] = int(y)
        row["split"] = split_of[i]
        rows.append(row)

    import io

    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=header, lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    manifest = out / "manifest.csv"
    _atomic_text(buf.getvalue(), manifest)

    spec = {
        "task": dataset.task,
        "task_type": dataset.task_type,
        "label_names": list(dataset.label_names),
        "label_columns": label_columns,
        "image_columns": image_columns,
        "mask_column": "mask",
        "intensity": dataset.intensity,
        "n_cases": n,
        "spacing": list(dataset.spacing),
        "shape": list(dataset.shape),
        "seed": dataset.seed,
        "knobs": {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataset.knobs.items()},
        "splits": {s: split_of.count(s) for s in SPLIT_NAMES},
        "anatomy_labels": ANATOMY_LABELS,
    }
    _atomic_text(json.dumps(spec, indent=2, default=str) + "\n", out / "task.json")
    return manifest
