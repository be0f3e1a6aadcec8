"""Datasets: manifest CSVs and MedMNIST .npz files -> TaskData."""
from __future__ import annotations

from pathlib import Path

from .cases import Case, TaskData
from .manifest import check_training_labels, id_problem, load_manifest
from .medmnist import load_medmnist


def load_data(path: str | Path, **kwargs) -> TaskData:
    """A ``.npz`` is read as MedMNIST (official splits); anything else as a manifest CSV."""
    path = Path(path)
    if path.suffix == ".npz":
        return load_medmnist(path)
    return load_manifest(path, **kwargs)


__all__ = ["Case", "TaskData", "check_training_labels", "id_problem", "load_data", "load_manifest", "load_medmnist"]
