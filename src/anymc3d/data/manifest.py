"""Manifest CSV: id, image column(s), label column(s), optional mask and split columns.

Column roles come from arguments, else from a ``task.json`` beside the manifest, else defaults
(``image``, ``label``, ``mask``, ``split``). Paths are relative to the manifest's folder.

The task type is never guessed from a stray value:

* given (``--task-type`` / ``task_type=``, else ``task_type`` in ``task.json``): the labels must fit
  it — a binary task takes only ``0``/``1`` (``0.0``/``1.0`` too), every other value is an error
  naming its rows; a multi-label task takes 0/1 in each of its (several) label columns;
* not given: labels that are all 0/1 make a binary task, labels that are all class *names*
  (no number among them) make a multi-class task, and anything else — 0/1 with a few ``2`` or
  ``maybe``, or integer classes ``0, 1, 2`` — is an error that names the odd rows and says how to
  declare a multi-class task.

Every error names the CSV and, where it is about one row, ``:row N`` (the line in the file).

Ids name the output files (``<id>.json``), so an id must be a plain file name: letters, digits,
``.``, ``_``, ``-`` and inner spaces, not starting with ``.`` (no ``/``, ``\\``, ``..``, control
characters), at most 128 characters, and unique even ignoring case (case-insensitive file systems).
An image cell must name an image file (a registered suffix) or a DICOM series folder; a row whose
every image cell is empty is an error.
"""
from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import numpy as np

from ..errors import InputError
from ..volume import MaskPath
from .cases import Case, TaskData

_MISSING = {"", "na", "nan", "none", "null"}
_BINARY = {"0": 0, "1": 1, "0.0": 0, "1.0": 1}
_SPLITS = ("train", "val", "test")
_TASK_TYPES = ("binary", "multiclass", "multilabel")
_ID_OK = re.compile(r"[A-Za-z0-9._-]+( [A-Za-z0-9._-]+)*")
MAX_ID_LENGTH = 128


def id_problem(cid: str) -> str | None:
    """Why ``cid`` cannot name an output file (None when it can); see the module docstring for the rule."""
    bad = sorted({c for c in cid if not (c.isascii() and (c.isalnum() or c in "._- "))})
    if bad:
        shown = ", ".join(repr(c) for c in bad[:5])
        why = ("a path separator" if any(c in "/\\" for c in bad) else
               "a control character" if any(ord(c) < 32 or ord(c) == 127 for c in bad) else "a character")
        return (f"contains {why} ({shown}) that is not allowed in a case id (ids name the output files: use "
                f"letters, digits, '.', '_', '-' and spaces)")
    if cid.startswith(".") or ".." in cid:
        return "starts with '.' or contains '..' (ids name the output files, which must stay in the output folder)"
    if not _ID_OK.fullmatch(cid):
        return "has leading, trailing or repeated spaces"
    if len(cid) > MAX_ID_LENGTH:
        return f"is {len(cid)} characters long (at most {MAX_ID_LENGTH}: ids name the output files)"
    return None


def _is_number(v: str) -> bool:
    try:
        float(v)
    except ValueError:
        return False
    return True


def _sort_key(v: str):
    return (not _is_number(v), float(v) if _is_number(v) else 0.0, v)


def _rows_text(rows: list[tuple[int, str]], limit: int = 5) -> str:
    shown = ", ".join(f"{n} ({v!r})" for n, v in rows[:limit])
    return shown + (f" and {len(rows) - limit} more" if len(rows) > limit else "")


def _resolve_task(path: Path, column: str, values: list[str], lines: list[int], task_type: str | None,
                  declared_by: str) -> tuple[str, list[str]]:
    """(task_type, label names) for one label column; see the module docstring for the rule."""
    odd = [(n, v) for n, v in zip(lines, values) if v not in _BINARY]
    uniq = sorted(set(values), key=_sort_key)
    if task_type == "binary" or (task_type is None and not odd):
        if odd:
            (n0, v0), rest = odd[0], odd[1:]
            also = f" (also row(s) {_rows_text(rest)})" if rest else ""
            raise InputError(f"{path}:row {n0}: label {v0!r} in column '{column}' is not 0 or 1, and the task is "
                             f"binary ({declared_by}){also}")
        return "binary", ["negative", "positive"]
    if task_type == "multiclass":
        if len(uniq) < 2:
            raise InputError(f"{path}: column '{column}': a multi-class task needs at least two classes, found {uniq}")
        return "multiclass", uniq
    if task_type == "multilabel":
        raise InputError(f"{path}: a multi-label task needs several 0/1 label columns (--label-columns a,b,c), "
                         f"got the one column '{column}'")
    # not declared, and not all 0/1
    if not any(_is_number(v) for v in values):
        return "multiclass", uniq  # class names: multi-class by design
    binary_like = [(n, v) for n, v in zip(lines, values) if v in _BINARY]
    (n0, v0), rest = odd[0], odd[1:]
    also = f" (also row(s) {_rows_text(rest)})" if rest else ""
    if binary_like and len(odd) <= max(2, 0.1 * len(values)):
        why = "the other labels are 0/1, so the task looks binary and a binary task takes only 0 and 1"
    else:
        why = f"numeric labels {', '.join(uniq[:6])}{' ...' if len(uniq) > 6 else ''} are never taken as classes"
    raise InputError(f"{path}:row {n0}: label {v0!r} in column '{column}': {why}{also}; fix the row(s), or declare a "
                     f"multi-class task with --task-type multiclass (or \"task_type\": \"multiclass\" in task.json)")


def _read_task_json(task_json: Path) -> dict:
    try:
        meta = json.loads(task_json.read_text(encoding="utf-8-sig"))
    except (OSError, UnicodeDecodeError, RecursionError, json.JSONDecodeError) as exc:
        raise InputError(f"{task_json}: not valid JSON ({' '.join(str(exc).split())[:200]})") from exc
    if not isinstance(meta, dict):
        raise InputError(f"{task_json}: expected a JSON object, got {type(meta).__name__}")
    for key in ("image_columns", "label_columns", "label_names"):
        v = meta.get(key)
        if v is not None and (not isinstance(v, list) or not v or not all(isinstance(x, str) and x for x in v)):
            raise InputError(f"{task_json}: '{key}' must be a non-empty list of names, got {v!r:.80}")
    for key in ("mask_column", "task", "intensity"):
        v = meta.get(key)
        if v is not None and not isinstance(v, str):
            raise InputError(f"{task_json}: '{key}' must be a string, got {v!r:.80}")
    if meta.get("task_type") is not None and meta["task_type"] not in _TASK_TYPES:
        raise InputError(f"{task_json}: 'task_type' must be one of {', '.join(_TASK_TYPES)}, got {meta['task_type']!r:.80}")
    return meta


def _read_rows(path: Path) -> tuple[list[str], list[dict], list[int]]:
    """Header (stripped names), rows as dicts and the file line of each row."""
    try:
        with path.open(newline="", encoding="utf-8-sig") as fh:
            reader = csv.reader(fh)
            header = next(reader, None)
            rows, lines = [], []
            if header is not None:
                header = [h.strip() for h in header]
                for rec in reader:
                    if not any(x.strip() for x in rec):
                        continue  # blank line
                    if len(rec) > len(header):
                        raise InputError(f"{path}:row {reader.line_num}: {len(rec)} fields but the header has "
                                         f"{len(header)} (a delimiter or quoting problem?)")
                    rows.append(dict(zip(header, rec + [""] * (len(header) - len(rec)))))
                    lines.append(reader.line_num)
    except InputError:
        raise
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise InputError(f"{path}: cannot read manifest CSV ({' '.join(str(exc).split())[:200]})") from exc
    if header is None:
        raise InputError(f"{path}: manifest is empty (no header row)")
    dup = sorted({h for h in header if header.count(h) > 1})
    if dup:
        raise InputError(f"{path}: duplicate column name(s) {', '.join(repr(d) for d in dup)} in the header")
    return header, rows, lines


def _labels(path: Path, rows: list[dict], lines: list[int], label_columns: list[str], task_type: str | None,
            declared_by: str, meta: dict) -> tuple[str, list[str]]:
    for c in label_columns:
        bad = next((n for n, r in zip(lines, rows) if r[c].strip().lower() in _MISSING), None)
        if bad is not None:
            raise InputError(f"{path}:row {bad}: no value in label column '{c}'")
    if len(label_columns) > 1:
        if task_type not in (None, "multilabel"):
            raise InputError(f"{path}: several label columns ({', '.join(label_columns)}) make a multi-label task, "
                             f"but the task type is {task_type}")
        for c in label_columns:
            odd = [(n, r[c].strip()) for n, r in zip(lines, rows) if r[c].strip() not in _BINARY]
            if odd:
                (n0, v0), rest = odd[0], odd[1:]
                also = f" (also row(s) {_rows_text(rest)})" if rest else ""
                raise InputError(f"{path}:row {n0}: label {v0!r} in column '{c}' is not 0 or 1 (a multi-label task "
                                 f"has one 0/1 column per label){also}")
        return "multilabel", list(label_columns)
    values = [r[label_columns[0]].strip() for r in rows]
    task_type, names = _resolve_task(path, label_columns[0], values, lines, task_type, declared_by)
    if task_type == "binary" and meta.get("label_names") and len(meta["label_names"]) == 2:
        names = list(meta["label_names"])
    return task_type, names


def _check_columns(path: Path, header: list[str], needed: list[str]) -> None:
    """Every needed column is in the header (with a hint when the file is not comma-separated)."""
    cols = set(header)
    for c in needed:
        if c not in cols:
            sep = next((d for d in (";", "\t", "|") if len(header) == 1 and d in header[0]), None)
            hint = (f"; the header looks {'tab' if sep == chr(9) else repr(sep)}-separated, anymc3d reads "
                    f"comma-separated CSV" if sep else "")
            raise InputError(f"{path}: missing column '{c}' (columns: {', '.join(sorted(cols))}){hint}")


def _task_labels(path: Path, rows: list[dict], lines: list[int], cols: set, label_columns: list[str],
                 task_type: str | None, declared_by: str, meta: dict, require_labels: bool,
                 label_names: list[str] | None) -> tuple[str, list[str], bool]:
    """``(task type, label names, whether the rows' labels are used)``; without ``require_labels`` (prediction)
    labels that are absent or fit no task type are not used."""
    labels_ok = all(c in cols for c in label_columns)
    try:
        task_type, names = _labels(path, rows, lines, label_columns, task_type, declared_by, meta) if labels_ok \
            else (task_type or "binary", ["negative", "positive"])
    except InputError:
        if require_labels or task_type is not None:
            raise
        labels_ok = False  # prediction: labels that fit no task type are not used
        task_type, names = "binary", ["negative", "positive"]
    if label_names:
        names = list(label_names)
    if task_type == "binary" and len(names) != 2:
        raise InputError(f"{path}: a binary task has two label names, got {names}")
    return task_type, names, labels_ok


def _check_id(path: Path, line: int, cid: str, seen: dict, folded: dict) -> None:
    """``cid`` can name an output file and is unique (also ignoring case); then recorded in ``seen``/``folded``."""
    problem = id_problem(cid)
    if problem:
        raise InputError(f"{path}:row {line}: id {cid!r} {problem}")
    if cid in seen:
        raise InputError(f"{path}:row {line}: id '{cid}' is also the id of row {seen[cid]} (ids name the outputs)")
    if cid.lower() in folded:
        other, n = folded[cid.lower()]
        raise InputError(f"{path}:row {line}: id '{cid}' differs only in upper/lower case from '{other}' of row "
                         f"{n}; on case-insensitive file systems (macOS, Windows) both write the same output file")
    seen[cid] = line
    folded[cid.lower()] = (cid, line)


def _row_images(path: Path, line: int, r: dict, image_columns: list[str], base: Path) -> dict:
    """One row's image cells -> ``{column: path or None}``; at least one must be given."""
    images = {}
    for c in image_columns:
        v = r[c].strip()
        images[c] = None if v.lower() in _MISSING else _existing(path, line, c, base, v, "image")
    if all(v is None for v in images.values()):
        cells = ", ".join(f"'{c}'" for c in image_columns)
        raise InputError(f"{path}:row {line}: no image: the image column{'s' if len(image_columns) > 1 else ''} "
                         f"{cells} {'are' if len(image_columns) > 1 else 'is'} empty")
    return images


def _row_label(r: dict, task_type: str, label_columns: list[str], names: list[str]) -> np.ndarray:
    """One row's (already validated) label: 0/1 per label (multi-label), 0/1 (binary) or the class index."""
    if task_type == "multilabel":
        return np.array([_BINARY[r[c].strip()] for c in label_columns], dtype=np.int64)
    if task_type == "binary":
        return np.array([_BINARY[r[label_columns[0]].strip()]], dtype=np.int64)
    return np.array([names.index(r[label_columns[0]].strip())], dtype=np.int64)


def _row_split(path: Path, line: int, r: dict) -> str | None:
    """One row's split cell: train, val, test or None (empty)."""
    split = r["split"].strip().lower() or None
    if split is not None and split not in _SPLITS:
        raise InputError(f"{path}:row {line}: split {r['split'].strip()!r} is not one of train, val, test "
                         f"(or empty)")
    return split


def load_manifest(path: str | Path, image_columns: list[str] | None = None, label_columns: list[str] | None = None,
                  mask_column: str | None = None, task_type: str | None = None, label_names: list[str] | None = None,
                  require_labels: bool = True) -> TaskData:
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: manifest not found")
    meta: dict = {}
    task_json = path.parent / "task.json"
    if task_json.is_file():
        meta = _read_task_json(task_json)
    image_columns = image_columns or meta.get("image_columns") or ["image"]
    label_columns = label_columns or meta.get("label_columns") or ["label"]
    mask_column = mask_column or meta.get("mask_column") or "mask"
    declared_by = "--task-type" if task_type else ("task.json" if meta.get("task_type") else "")
    task_type = task_type or meta.get("task_type")
    if task_type is not None and task_type not in _TASK_TYPES:
        raise InputError(f"{path}: task type must be one of {', '.join(_TASK_TYPES)}, got {task_type!r}")
    header, rows, lines = _read_rows(path)
    if not rows:
        raise InputError(f"{path}: manifest has no rows")
    cols = set(header)
    _check_columns(path, header, ["id", *image_columns] + (label_columns if require_labels else []))
    has_mask = mask_column in cols
    has_split = "split" in cols
    base = path.parent
    task_type, names, labels_ok = _task_labels(path, rows, lines, cols, label_columns, task_type, declared_by, meta,
                                               require_labels, label_names)

    cases, seen, folded = [], {}, {}
    for i, (line, r) in enumerate(zip(lines, rows)):
        cid = r["id"].strip() or f"case{i}"
        _check_id(path, line, cid, seen, folded)
        images = _row_images(path, line, r, image_columns, base)
        label = _row_label(r, task_type, label_columns, names) if labels_ok else None
        mask = None
        if has_mask and r[mask_column].strip().lower() not in _MISSING:
            mask = MaskPath(_existing(path, line, mask_column, base, r[mask_column].strip(), "mask"))
        split = _row_split(path, line, r) if has_split else None
        cases.append(Case(id=cid, images=images, label=label, mask=mask, split=split))
    return TaskData(name=meta.get("task", path.parent.name), task_type=task_type, label_names=names,
                    inputs=list(image_columns), cases=cases, source=str(path),
                    intensity=meta.get("intensity", "minmax"), meta=meta)


def _existing(manifest: Path, line: int, column: str, base: Path, value: str, what: str) -> Path:
    """The path of one image/mask cell (relative to the manifest's folder, or absolute); it must exist and be an
    image file of a registered type or a folder (a DICOM series), else the row is named."""
    from ..io import registered_suffixes

    where = f"{manifest}:row {line}: {what} '{value}' (column '{column}')"
    p = base / value
    try:
        ok = p.exists()
        is_dir = p.is_dir()
    except (OSError, ValueError):
        ok = is_dir = False
    if not ok:
        hint = (" (~ and $VARIABLES are not expanded: write the path relative to the manifest's folder, or "
                "absolute)" if value.startswith("~") or "$" in value or "%" in value else "")
        raise InputError(f"{where} not found ({p}){hint}")
    suffixes = registered_suffixes()
    if is_dir:
        try:
            entries = [e for e in p.iterdir() if not e.name.startswith(".")]
        except OSError as exc:
            raise InputError(f"{where}: cannot list the folder ({' '.join(str(exc).split())[:120]})") from exc
        if not entries:
            raise InputError(f"{where} is an empty folder, not a DICOM series")
        images = sorted(e.name for e in entries if e.is_file() and any(
            e.name.lower().endswith(x) for x in suffixes if x != ".dcm"))
        if images:
            raise InputError(f"{where} is a folder of image files ({', '.join(images[:3])}"
                             f"{' ...' if len(images) > 3 else ''}), not one DICOM series: give one file per row")
        return p
    if p.resolve() == manifest.resolve():
        raise InputError(f"{where} is the manifest itself, not an image")
    if not any(p.name.lower().endswith(x) for x in suffixes):
        raise InputError(f"{where} is not an image file of a known type (supported: {', '.join(suffixes)} or a "
                         f"DICOM series folder)")
    return p


def check_training_labels(task: TaskData, splits: dict) -> None:
    """Before training: the training split must hold every class (binary: both labels; multi-class: each class
    that appears anywhere; multi-label: each label both present and absent). A classifier never shown a class
    cannot learn it, and a split with one class makes no model at all."""
    train = [c for c in splits.get("train", []) if c.label is not None]
    if not train:
        return
    names = list(task.label_names)
    y = np.stack([c.label for c in train])
    if task.task_type == "multilabel":
        for j, name in enumerate(names):
            vals = set(int(v) for v in y[:, j])
            if len(vals) < 2:
                state = "positive" if vals == {1} else "negative"
                raise InputError(f"{task.source}: label '{name}' is {state} in every one of the {len(train)} training "
                                 f"cases; a classifier needs positive and negative training cases of each label")
        return
    seen = set(int(v) for v in y[:, 0])
    if task.task_type == "binary":
        if len(seen) < 2:
            only = names[next(iter(seen))] if seen else "?"
            raise InputError(f"{task.source}: every one of the {len(train)} training cases has label "
                             f"{next(iter(seen))} ('{only}'); training needs cases of both labels")
        return
    if len(seen) < 2:
        raise InputError(f"{task.source}: every one of the {len(train)} training cases has class '{names[next(iter(seen))]}'; "
                         f"training needs at least two classes")
    for split in ("val", "test"):
        missing = sorted({int(c.label[0]) for c in splits.get(split, []) if c.label is not None} - seen)
        if missing:
            cls = ", ".join(f"'{names[k]}'" for k in missing)
            raise InputError(f"{task.source}: class {cls} is in the {split} split but in none of the {len(train)} "
                             f"training cases; the plugin could never predict it (move such cases into training, "
                             f"or drop the class)")
