"""The one input expander of every verb: files, folders, DICOM series folders and manifests -> items.

``expand_inputs(["scan.nii.gz", "dicom/case3/", "more/", "cases.csv"], inputs)`` gives one
:class:`InputItem` per volume (or per manifest row):

* a file is itself;
* a folder holding image files (NIfTI, NRRD, MHA, npy ...) gives each of them, sorted;
* any other folder is one DICOM series;
* a ``.csv`` is a manifest: one item per row, with its mask and label when the manifest has them.
"""
from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import InputError


@dataclass
class InputItem:
    id: str | None              # the manifest's id, else None (the file name gives it)
    item: object                # a path, or an anymc3d.data.Case for a manifest row
    mask: object = None
    label: np.ndarray | None = None

    def __iter__(self):  # (id, item) unpacking, as the verbs use it
        return iter((self.id, self.item))


def is_image_file(p: Path) -> bool:
    from .io import registered_suffixes

    name = p.name.lower()
    return p.is_file() and not name.startswith(".") and any(name.endswith(s) for s in registered_suffixes() if s != ".dcm")


def _is_positive(label: np.ndarray, task_type: str) -> bool:
    return bool(np.asarray(label).any()) if task_type != "multiclass" else True


def expand_inputs(images: list[str], inputs: list[str], strict: bool = True, split: str | None = None,
                  positives_only: bool = False, task_type: str = "binary") -> list[InputItem]:
    """``strict``: a manifest must have every one of ``inputs`` as a column (one plugin); otherwise
    the columns it has are used (a store of plugins with different inputs). ``split`` /
    ``positives_only`` keep only those manifest rows."""
    from .data import load_manifest

    items: list[InputItem] = []
    for x in map(str, images):
        p = Path(x)
        if x.endswith(".csv"):
            cols = list(inputs)
            if not strict:
                with open(x, newline="") as fh:
                    header = next(csv.reader(fh), [])
                cols = [c for c in inputs if c in header] or None
            task = load_manifest(x, image_columns=cols, require_labels=False)
            for c in task.cases:
                if split and c.split != split:
                    continue
                if positives_only and (c.label is None or not _is_positive(c.label, task_type)):
                    continue
                items.append(InputItem(c.id, c, c.mask, c.label))
            continue
        if not p.exists():
            raise InputError(f"{x}: file not found")
        if p.is_dir():
            files = sorted(f for f in p.iterdir() if is_image_file(f))
            if files:
                items += [InputItem(None, str(f)) for f in files]
                continue
        items.append(InputItem(None, x))
    if not items:
        raise InputError(f"no images in {', '.join(map(str, images))}")
    return items
