"""The per-volume result dict every verb writes (``predict``, ``predict --plugins``, the service)."""
from __future__ import annotations

import numpy as np


def volume_result(spec, case_id: str, probs: np.ndarray, out: dict, plugin: str = "") -> dict:
    """JSON-ready result of one plugin on one case.

    ``out`` is one row of :func:`anymc3d.runtime.engine.case_outputs` (slice / view weights, stream
    presence, sources, reader warnings). Binary: the positive label is predicted when its
    probability exceeds the plugin's threshold (chosen on validation at training, stored in
    ``plugin.json``); multi-class: the arg-max; multi-label: every label above the threshold."""
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
    res = {"id": case_id, "inputs": out.get("sources", {}), "task": spec.task, "task_type": spec.task_type,
           "probabilities": probabilities, "predicted": predicted, "threshold": spec.threshold,
           "slice_weights": out["slice_weights"],
           "view_weights": {s: w for s, w in out["view_weights"].items() if s in used},
           "views_used": used, "views_missing": [s for s in out["present"] if s not in used],
           "backbone": spec.backbone, "backbone_fingerprint": spec.backbone_fingerprint, "plugin": plugin}
    res["warnings"] = list(out.get("warnings") or [])
    return res


def decision_text(res: dict) -> str:
    """What was decided and why, for a printed line: ``present (p=0.498 > threshold 0.310)``.
    Every printed prediction shows the threshold that made the decision."""
    probs, predicted = res["probabilities"], res["predicted"]
    thr = float(res.get("threshold", 0.5))
    if res["task_type"] == "binary":
        pos = list(probs)[1]
        p = probs[pos]
        return f"{predicted[0]} (p({pos})={p:.3f} {'>' if p > thr else '<='} threshold {thr:.3f})"
    if res["task_type"] == "multiclass":
        return f"{predicted[0]} (p={probs[predicted[0]]:.3f}, the largest of {len(probs)})"
    shown = ", ".join(f"{n}={v:.3f}" for n, v in probs.items())
    return f"{', '.join(predicted) or '-'} ({shown}; threshold {thr:.3f})"
