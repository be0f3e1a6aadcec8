"""Frozen backbone + mean pooling over slices + logistic regression (the floor the plugin must beat).

Views are mean-pooled separately and concatenated. The regularisation C is chosen on the
validation split by AUROC, then the probe is refit on train and scored on test.
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.multiclass import OneVsRestClassifier
from sklearn.preprocessing import StandardScaler

from ..backbones import create_backbone
from ..data import load_data
from ..errors import InputError
from ..evaluation import compute_metrics
from ..io import write_json
from ..preprocess import PreprocessOptions
from ..runtime.engine import frozen_embeddings
from ..training.run import assign_splits


def mean_pooled_features(backbone, cases, specs, views, progress=True, device: str = "auto",
                         cache=None, workers: int = 0) -> np.ndarray:
    """Per case: the mean over slices of the frozen class embeddings, per stream, streams concatenated."""
    rows, _ = frozen_embeddings(backbone, cases, specs, views, device=device, cache=cache, progress=progress,
                                workers=workers)
    for c, row in zip(cases, rows):
        if any(e is None for e in row):
            raise InputError(f"case {c.id}: the linear probe needs every input of the task")
    return np.stack([np.concatenate([e.mean(0) for e in row]) for row in rows])


def fit_logistic_probe(feats: dict[str, np.ndarray], y: dict[str, np.ndarray], task_type: str,
                       label_names: list[str], cs=(0.01, 0.03, 0.1, 0.3, 1.0, 3.0)):
    """Standardise on train, choose C by validation AUROC (first C when there is no val split),
    refit; returns (split -> scores, C, validation AUROC)."""
    scaler = StandardScaler().fit(feats["train"])
    f = {k: scaler.transform(v) for k, v in feats.items()}

    def fit(c):
        lr = LogisticRegression(C=c, max_iter=5000)
        clf = OneVsRestClassifier(lr) if task_type == "multilabel" else lr
        return clf.fit(f["train"], y["train"])

    def scores(clf, split):
        p = clf.predict_proba(f[split])
        return p[:, 1] if task_type == "binary" and p.ndim == 2 and p.shape[1] == 2 else p

    best_c, best_auc = cs[0], -1.0
    if "val" in f:
        for c in cs:
            auc = compute_metrics(y["val"], scores(fit(c), "val"), task_type, label_names, n_bootstrap=0)["auc"] or 0
            if auc > best_auc:
                best_c, best_auc = c, auc
    clf = fit(best_c)
    return (lambda split: scores(clf, split)), best_c, best_auc


def run_linear_probe(data: str | Path, backbone: str = "efficientnet_lite0", out: str | Path = "probe",
                     views: tuple[str, ...] = ("axial",), size: int | None = None, weights: str | None = None,
                     seed: int = 0, cs=(0.01, 0.03, 0.1, 0.3, 1.0, 3.0), progress: bool = True,
                     device: str = "auto", workers: int = 0) -> dict:
    t0 = time.time()
    task = load_data(data)
    splits = assign_splits(task, seed)
    bb = create_backbone(backbone, weights=weights, input_size=size)
    pre = PreprocessOptions(views=list(views), size=size)
    specs = {inp: pre.spec_for(task, bb.input_size) for inp in task.inputs}
    feats = {k: mean_pooled_features(bb, v, specs, views, progress, device=device, workers=workers)
             for k, v in splits.items() if v}
    t_feat = time.time() - t0
    y = {k: task.labels(v) for k, v in splits.items() if v}
    score, best_c, best_auc = fit_logistic_probe(feats, y, task.task_type, task.label_names, cs)
    f = feats
    res = {"method": "linear_probe", "backbone": backbone, "views": list(views), "size": bb.input_size, "C": best_c,
           "val_auc": best_auc, "feature_s": round(t_feat, 1), "total_s": round(time.time() - t0, 1),
           "trainable_params": int(np.prod(f["train"].shape[1:]) + 1) * (1 if task.task_type == "binary" else len(task.label_names))}
    if "test" in f:
        m = compute_metrics(y["test"], score("test"), task.task_type, task.label_names)
        res.update(auc=m["auc"], acc=m["acc"], n=m["n"], test=m)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    write_json(res, out / "metrics.json")
    return res
