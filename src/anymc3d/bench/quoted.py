"""Published numbers shown as reference rows (``source = quoted``), never mixed with measured rows.

Keys are matched against a MedMNIST file's stem (``adrenalmnist3d``, ``adrenalmnist3d_64``) or set
explicitly with ``quoted: KEY`` in a suite file. Values are test-split AUC / ACC as printed in the
cited paper (docs/method.md, "Data and published numbers").
"""
from __future__ import annotations

MEDMNIST_V2 = ("Yang et al., MedMNIST v2, Scientific Data 2023 (Table: AdrenalMNIST3D 28³ test)")
PLANECYCLE = "PlaneCycle (DINOv3 ConvNeXt lifted to 3D), reported best on AdrenalMNIST3D 64³ (docs/method.md)"

QUOTED: dict[str, list[dict]] = {
    "adrenalmnist3d": [
        {"method": "ResNet-18+2.5D", "auc": 0.718, "acc": 0.772, "citation": MEDMNIST_V2},
        {"method": "ResNet-18+3D", "auc": 0.827, "acc": 0.721, "citation": MEDMNIST_V2},
        {"method": "ResNet-18+ACS", "auc": 0.839, "acc": 0.754, "citation": MEDMNIST_V2},
        {"method": "ResNet-50+2.5D", "auc": 0.732, "acc": 0.763, "citation": MEDMNIST_V2},
        {"method": "ResNet-50+3D", "auc": 0.828, "acc": 0.745, "citation": MEDMNIST_V2},
        {"method": "ResNet-50+ACS", "auc": 0.828, "acc": 0.758, "citation": MEDMNIST_V2},
        {"method": "auto-sklearn", "auc": 0.828, "acc": 0.802, "citation": MEDMNIST_V2},
        {"method": "AutoKeras", "auc": 0.804, "acc": 0.705, "citation": MEDMNIST_V2},
    ],
    "adrenalmnist3d_64": [
        {"method": "PlaneCycle DINOv3 ConvNeXt (3D-lifted)", "auc": 0.911, "acc": 0.866, "citation": PLANECYCLE},
    ],
}


def quoted_key_for(data_path: str | None) -> str | None:
    """The QUOTED key of a MedMNIST file path (by stem), or None."""
    if not data_path:
        return None
    from pathlib import Path

    stem = Path(str(data_path)).stem.lower()
    return stem if stem in QUOTED else None
