"""The JSON half of a plugin file: everything needed to rebuild and re-apply a trained plugin."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from .lora import LoraSpec

TASK_TYPES = ("binary", "multiclass", "multilabel")


@dataclass
class PluginSpec:
    task: str
    task_type: str
    label_names: list[str]
    inputs: list[str]                       # image inputs (manifest image columns), e.g. ["image"] or ["t1", "t2"]
    preprocess: dict[str, dict[str, Any]]   # input -> PreprocessSpec.to_dict(); re-applied verbatim at prediction
    backbone: str
    backbone_fingerprint: str
    input_size: int
    lora: LoraSpec = field(default_factory=LoraSpec)
    head_dropout: float = 0.2
    threshold: float = 0.5
    training: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    version: str = ""
    format: str = "anymc3d-plugin/1"

    def __post_init__(self) -> None:
        if self.task_type not in TASK_TYPES:
            raise ValueError(f"task_type must be one of {TASK_TYPES}, got {self.task_type!r}")
        if self.task_type == "binary" and len(self.label_names) != 2:
            raise ValueError("a binary task has exactly two label names (negative, positive)")

    @property
    def streams(self) -> list[str]:
        """One stream per (input, view); each has its own LoRA adapter and task query."""
        return [f"{inp}:{view}" for inp in self.inputs for view in self.preprocess[inp]["views"]]

    @property
    def n_outputs(self) -> int:
        return 1 if self.task_type == "binary" else len(self.label_names)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["lora"] = self.lora.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "PluginSpec":
        d = dict(d)
        d["lora"] = LoraSpec.from_dict(d.get("lora", {}))
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in d.items() if k in known})
