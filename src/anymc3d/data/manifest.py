"""Manifest CSV: id, image column(s), label column(s), optional mask and split columns.

Column roles come from arguments, else from a ``task.json`` beside the manifest, else defaults
(``image``, ``label``, ``mask``, ``split``). Paths are relative to the manifest's folder.
"""
from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np

from ..errors import InputError
from .cases import Case, TaskData

_MISSING = {"", "na", "nan", "none", "null"}


def _infer_task(values: list[str], task_type: str | None) -> tuple[str, list[str]]:
    uniq = sorted(set(values), key=lambda v: (not v.lstrip("-").isdigit(), int(v) if v.lstrip("-").isdigit() else 0, v))
    if task_type is None:
        task_type = "binary" if set(values) <= {"0", "1"} else "multiclass"
    if task_type == "binary":
        if not set(values) <= {"0", "1"}:
            raise ValueError(f"binary labels must be 0/1, found {uniq[:5]}")
        return task_type, ["negative", "positive"]
    return task_type, uniq


def load_manifest(path: str | Path, image_columns: list[str] | None = None, label_columns: list[str] | None = None,
                  mask_column: str | None = None, task_type: str | None = None, label_names: list[str] | None = None,
                  require_labels: bool = True) -> TaskData:
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: manifest not found")
    meta: dict = {}
    task_json = path.parent / "task.json"
    if task_json.is_file():
        meta = json.loads(task_json.read_text())
    image_columns = image_columns or meta.get("image_columns") or ["image"]
    label_columns = label_columns or meta.get("label_columns") or ["label"]
    mask_column = mask_column or meta.get("mask_column") or "mask"
    task_type = task_type or meta.get("task_type")
    try:
        with path.open(newline="") as fh:
            rows = list(csv.DictReader(fh))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise InputError(f"{path}: cannot read manifest CSV ({exc})") from exc
    if not rows:
        raise InputError(f"{path}: manifest has no rows")
    cols = set(rows[0])
    for c in ["id", *image_columns] + (label_columns if require_labels else []):
        if c not in cols:
            raise InputError(f"{path}: missing column '{c}' (columns: {', '.join(sorted(cols))})")
    has_mask = mask_column in cols
    has_split = "split" in cols
    base = path.parent

    labels_ok = all(c in cols for c in label_columns)
    if labels_ok and len(label_columns) > 1:
        task_type = "multilabel"
        names = list(label_columns)
    elif labels_ok:
        values = [r[label_columns[0]].strip() for r in rows]
        if any(v.lower() in _MISSING for v in values):
            bad = next(i for i, v in enumerate(values) if v.lower() in _MISSING)
            raise InputError(f"{path}: row {bad + 2} has no value in label column '{label_columns[0]}'")
        try:
            task_type, names = _infer_task(values, task_type)
        except ValueError as exc:
            raise InputError(f"{path}: column '{label_columns[0]}': {exc}") from exc
        if task_type == "binary" and meta.get("label_names") and len(meta["label_names"]) == 2:
            names = list(meta["label_names"])
    else:
        task_type, names = task_type or "binary", ["negative", "positive"]
    if label_names:
        names = list(label_names)

    cases = []
    for i, r in enumerate(rows):
        images = {}
        for c in image_columns:
            v = (r.get(c) or "").strip()
            images[c] = None if v.lower() in _MISSING else (base / v)
        label = None
        if labels_ok:
            try:
                if task_type == "multilabel":
                    label = np.array([int(float(r[c])) for c in label_columns], dtype=np.int64)
                elif task_type == "binary":
                    label = np.array([int(r[label_columns[0]].strip())], dtype=np.int64)
                else:
                    label = np.array([names.index(r[label_columns[0]].strip())], dtype=np.int64)
            except ValueError as exc:
                raise InputError(f"{path}: row {i + 2}: bad label value ({exc})") from exc
        mask = None
        if has_mask and (r.get(mask_column) or "").strip().lower() not in _MISSING:
            mask = base / r[mask_column].strip()
        split = (r.get("split") or "").strip().lower() or None if has_split else None
        cases.append(Case(id=r["id"].strip() or f"case{i}", images=images, label=label, mask=mask, split=split))
    return TaskData(name=meta.get("task", path.parent.name), task_type=task_type, label_names=names,
                    inputs=list(image_columns), cases=cases, source=str(path),
                    intensity=meta.get("intensity", "minmax"), meta=meta)
