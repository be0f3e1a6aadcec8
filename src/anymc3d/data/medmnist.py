"""MedMNIST 3D .npz files (official splits) as TaskData, fully in memory."""
from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np

from ..errors import InputError
from ..volume import Volume
from .cases import Case, TaskData

_LABELS = {  # known MedMNIST 3D label names, by file stem prefix
    "adrenalmnist3d": ["normal", "hyperplasia"],
    "nodulemnist3d": ["benign", "malignant"],
    "vesselmnist3d": ["vessel", "aneurysm"],
    "synapsemnist3d": ["inhibitory", "excitatory"],
    "fracturemnist3d": ["buckle", "nondisplaced", "displaced"],
}


def load_medmnist(path: str | Path) -> TaskData:
    """Arrays N x D x H x W become volumes (X=W, Y=H, Z=D), so 'axial' slices run along MedMNIST's D."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: file not found")
    try:
        data = np.load(path, allow_pickle=False)
        keys = set(data.files)
    except (OSError, ValueError, zipfile.BadZipFile) as exc:
        raise InputError(f"{path}: not a readable .npz file ({exc})") from exc
    need = {f"{s}_{k}" for s in ("train", "val", "test") for k in ("images", "labels")}
    if not need <= keys:
        raise InputError(f"{path}: not a MedMNIST file, missing keys {sorted(need - keys)}")
    cases: list[Case] = []
    all_labels = []
    for split in ("train", "val", "test"):
        imgs, labels = data[f"{split}_images"], data[f"{split}_labels"]
        if imgs.ndim == 5 and imgs.shape[-1] in (1, 3):
            imgs = np.moveaxis(imgs, -1, 1)
        if imgs.ndim not in (4, 5):
            raise InputError(f"{path}: {split}_images has shape {imgs.shape}, expected N x D x H x W")
        if len(imgs) != len(labels):
            raise InputError(f"{path}: {split}_images has {len(imgs)} cases but {split}_labels has {len(labels)}")
        labels = labels.reshape(len(labels), -1)
        all_labels.append(labels)
        for i in range(len(imgs)):
            arr = np.ascontiguousarray(np.swapaxes(imgs[i], -1, -3)).astype(np.float32)  # (..., W, H, D)
            cases.append(Case(id=f"{split}_{i:05d}", images={"image": Volume(arr, np.eye(4), {"path": f"{path}[{split}:{i}]"})},
                              label=labels[i].astype(np.int64), split=split))
    lab = np.concatenate(all_labels)
    stem = path.stem.split("_")[0].lower()
    if lab.shape[1] > 1:
        task_type, names = "multilabel", [f"label_{k}" for k in range(lab.shape[1])]
    else:
        k = int(lab.max()) + 1
        task_type = "binary" if k <= 2 else "multiclass"
        names = _LABELS.get(stem, [f"class_{j}" for j in range(max(k, 2))])
    return TaskData(name=path.stem, task_type=task_type, label_names=names, inputs=["image"], cases=cases,
                    source=str(path), intensity="fixed", orientation=None, meta={"format": "medmnist"})
