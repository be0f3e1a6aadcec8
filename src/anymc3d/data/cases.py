"""What a dataset is to anymc3d: cases with one or more image inputs, a label and an optional mask."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..volume import Volume


@dataclass
class Case:
    id: str
    images: dict[str, Volume | Path | None]  # input name -> volume (in memory), path (read lazily) or None (missing)
    label: np.ndarray | None = None           # (1,) class index / 0-1, or (K,) 0-1 for multilabel
    mask: Volume | Path | None = None
    split: str | None = None


@dataclass
class TaskData:
    name: str
    task_type: str
    label_names: list[str]
    inputs: list[str]
    cases: list[Case]
    source: str
    intensity: str = "minmax"          # default preprocessing preset suggested by the data source
    orientation: str | None = "RAS"
    meta: dict = field(default_factory=dict)

    def split(self, name: str) -> list[Case]:
        return [c for c in self.cases if c.split == name]

    @property
    def has_masks(self) -> bool:
        return any(c.mask is not None for c in self.cases)

    def labels(self, cases: list[Case]) -> np.ndarray:
        arr = np.stack([c.label for c in cases])
        return arr[:, 0] if self.task_type != "multilabel" else arr
