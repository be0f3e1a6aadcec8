"""Frozen backbone + mean pooling over slices + logistic regression (the floor the plugin must beat).

Views are mean-pooled separately and concatenated. The regularisation C is chosen on the
validation split by AUROC, then the probe is refit on train and scored on test.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.multiclass import OneVsRestClassifier
from sklearn.preprocessing import StandardScaler
from tqdm.auto import tqdm

from ..backbones import create_backbone
from ..data import load_data
from ..evaluation import compute_metrics
from ..inputs import prepare_case
from ..io import atomic_write
from ..preprocess import to_slices
from ..training.run import PreprocessOptions, assign_splits


@torch.no_grad()
def mean_pooled_features(backbone, cases, specs, views, progress=True, chunk=256) -> np.ndarray:
    feats = []
    for c in tqdm(cases, desc="features", disable=not progress, leave=False):
        pc = prepare_case(c, specs)
        per_view = []
        for inp, spec in specs.items():
            for v in views:
                x = to_slices(pc.arrays[inp], spec, v)
                emb = torch.cat([backbone(x[i:i + chunk]).cls.float() for i in range(0, len(x), chunk)])
                per_view.append(emb.mean(0))
        feats.append(torch.cat(per_view).numpy())
    return np.stack(feats)


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
                     seed: int = 0, cs=(0.01, 0.03, 0.1, 0.3, 1.0, 3.0), progress: bool = True) -> dict:
    t0 = time.time()
    task = load_data(data)
    splits = assign_splits(task, seed)
    bb = create_backbone(backbone, weights=weights, input_size=size)
    pre = PreprocessOptions(views=list(views), size=size)
    specs = {inp: pre.spec_for(task, bb.input_size) for inp in task.inputs}
    feats = {k: mean_pooled_features(bb, v, specs, views, progress) for k, v in splits.items() if v}
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
    with atomic_write(out / "metrics.json") as tmp:
        Path(tmp).write_text(json.dumps(res, indent=2))
    return res
