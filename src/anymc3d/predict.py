"""Prediction from Python and the CLI: ``anymc3d.load(plugin).predict(volume)``."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .data.cases import Case
from .inputs import prepare_case
from .io import atomic_write
from .plugins import load_plugin
from .preprocess import PreprocessSpec
from .training.trainer import Batcher, predict_prepared
from .volume import Volume


class Predictor:
    """A loaded plugin on its frozen backbone; preprocessing comes from the plugin's saved spec."""

    def __init__(self, model, source: str = "") -> None:
        self.model = model
        self.spec = model.spec
        self.source = source
        self.specs = {k: PreprocessSpec.from_dict(v) for k, v in self.spec.preprocess.items()}
        self.batcher = Batcher(model, self.specs)

    def _case(self, item, case_id: str | None) -> Case:
        if isinstance(item, Case):
            return item
        if isinstance(item, dict):
            images = {k: item.get(k) for k in self.spec.inputs}
        else:
            images = {self.spec.inputs[0]: item}
            for k in self.spec.inputs[1:]:
                images[k] = None
        if case_id is None:
            first = next((v for v in images.values() if v is not None), None)
            case_id = case_id_from(first)
        return Case(id=case_id, images=images)

    def predict(self, item: Volume | str | Path | dict | Case, case_id: str | None = None) -> dict:
        """One volume (or {input: volume} for multi-input plugins) -> JSON-ready result."""
        return self.predict_many([item], [case_id])[0]

    def predict_many(self, items: list, ids: list | None = None, batch_size: int = 4) -> list[dict]:
        ids = ids or [None] * len(items)
        cases = [self._case(it, i) for it, i in zip(items, ids)]
        prepared = [prepare_case(c, self.specs) for c in cases]
        probs, outs = predict_prepared(self.model, self.batcher, prepared, batch_size)
        return [self._result(c, p, pr, o) for c, p, pr, o in zip(cases, prepared, probs, outs)]

    def _result(self, case: Case, prepared, probs: np.ndarray, out: dict) -> dict:
        spec = self.spec
        if spec.task_type == "binary":
            p = float(probs[0])
            probabilities = {spec.label_names[0]: 1 - p, spec.label_names[1]: p}
            predicted = [spec.label_names[1] if p > spec.threshold else spec.label_names[0]]
        elif spec.task_type == "multiclass":
            probabilities = {n: float(v) for n, v in zip(spec.label_names, probs)}
            predicted = [spec.label_names[int(np.argmax(probs))]]
        else:
            probabilities = {n: float(v) for n, v in zip(spec.label_names, probs)}
            predicted = [n for n, v in zip(spec.label_names, probs) if v > spec.threshold]
        used = [s for s, ok in out["present"].items() if ok]
        return {"id": case.id, "inputs": prepared.sources, "task": spec.task, "task_type": spec.task_type,
                "probabilities": probabilities, "predicted": predicted, "threshold": spec.threshold,
                "slice_weights": out["slice_weights"],
                "view_weights": {s: w for s, w in out["view_weights"].items() if s in used},
                "views_used": used, "views_missing": [s for s in out["present"] if s not in used],
                "backbone": spec.backbone, "backbone_fingerprint": spec.backbone_fingerprint, "plugin": self.source}


def case_id_from(item) -> str:
    if isinstance(item, Volume):
        item = item.meta.get("path", "volume")
    name = Path(str(item)).name
    for suffix in (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd", ".npy", ".dcm"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def load(plugin: str | Path, weights: str | None = None) -> Predictor:
    """Load a trained plugin (folder, .json or .safetensors) onto its backbone."""
    return Predictor(load_plugin(plugin, weights=weights), source=str(plugin))


def write_json(obj: dict, path: Path) -> Path:
    with atomic_write(path) as tmp:
        Path(tmp).write_text(json.dumps(obj, indent=2))
    return path
