"""Deterministic lesion phantoms: small labelled 3D CT/MRI-like tasks with lesion masks.

>>> ds = make_task("lesion_binary", 200, seed=0)          # the demo default, 40^3 CT in HU
>>> manifest = write_task(ds, "out/lesion_binary")          # NIfTI + manifest.csv + task.json

See ``docs/synthetic.md``.
"""
from __future__ import annotations

from .phantoms import ANATOMY_LABELS, LESION_ORGANS, TISSUES, voxel_affine
from .tasks import (
    DEFAULT_SIZE,
    LESION_TYPES,
    TASKS,
    SyntheticDataset,
    make_task,
    task_knobs,
    write_task,
)

__all__ = [
    "ANATOMY_LABELS",
    "DEFAULT_SIZE",
    "LESION_ORGANS",
    "LESION_TYPES",
    "TASKS",
    "TISSUES",
    "SyntheticDataset",
    "make_task",
    "task_knobs",
    "voxel_affine",
    "write_task",
]
