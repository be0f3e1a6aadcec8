"""`anymc3d evaluate`: a plugin on a labelled split -> metrics.json, report.md, roc.png, predictions.csv."""
from __future__ import annotations

import csv
import time
from pathlib import Path

import numpy as np

from ..data import load_data
from ..errors import InputError
from ..io import atomic_write
from .metrics import compute_metrics
from .report import write_report


def metric_scores(probs: np.ndarray, task_type: str) -> np.ndarray:
    """The score array the metrics take: the positive-class column for binary tasks."""
    return probs[:, 0] if task_type == "binary" else probs


def evaluate_plugin(predictor, data: str | Path, split: str = "test", out: str | Path = "eval",
                    n_bootstrap: int = 1000, data_kwargs: dict | None = None) -> dict:
    spec = predictor.spec
    task = load_data(data, **(data_kwargs or {}))
    cases = [c for c in task.cases if c.label is not None and (split == "all" or c.split == split)]
    if not cases:
        raise InputError(f"{data}: no labelled cases in split '{split}'")
    if task.task_type != spec.task_type or list(task.label_names) != list(spec.label_names):
        if not (task.task_type == spec.task_type and len(task.label_names) == len(spec.label_names)):
            raise InputError(f"{data}: labels ({task.task_type}, {task.label_names}) do not match the plugin's "
                             f"({spec.task_type}, {spec.label_names})")
    t0 = time.time()
    probs, _ = predictor.runtime.predict(cases, 4)  # the loader's workers read and preprocess
    dt = time.time() - t0
    y = task.labels(cases)
    metrics = compute_metrics(y, metric_scores(probs, spec.task_type), spec.task_type, spec.label_names,
                              threshold=spec.threshold, n_bootstrap=n_bootstrap)
    if spec.threshold != 0.5:  # MedMNIST's ACC thresholds at 0.5; keep it for comparison with published numbers
        metrics["acc_at_0.5"] = compute_metrics(y, metric_scores(probs, spec.task_type), spec.task_type,
                                                spec.label_names, n_bootstrap=0)["acc"]
    out = Path(out)
    paths = write_report(metrics, y, metric_scores(probs, spec.task_type), out,
                         title=f"{spec.task} on {Path(str(data)).name} [{split}]", label_names=spec.label_names,
                         extra={"plugin": predictor.source, "data": str(data), "split": split,
                                "backbone": spec.backbone, "seconds_per_volume": dt / len(cases)})
    with atomic_write(out / "predictions.csv") as tmp:
        with open(tmp, "w", newline="", encoding="utf-8") as fh:
            w = csv.writer(fh)
            w.writerow(["id", "label", *[f"p_{n}" for n in (spec.label_names[1:] if spec.task_type == "binary" else spec.label_names)]])
            for c, yy, p in zip(cases, y, probs):
                w.writerow([c.id, yy.tolist() if isinstance(yy, np.ndarray) else int(yy), *[f"{v:.6f}" for v in p]])
    metrics["paths"] = {k: str(v) for k, v in paths.items()}
    return metrics
