"""What a plugin stores so that every answer can be weighed: calibration, OOD reference, conformal scores.

Fitted once at the end of training (:func:`fit_trust`, on the validation split; the OOD reference on
the training split) and stored with the plugin:

* ``plugin.json`` field ``trust`` (small): the calibration (Platt a, b / temperature), the OOD method,
  feature, rank k, flag percentile and threshold, the conformal score's name, the operating point;
* ``plugin.safetensors`` tensors under ``trust.`` (covered by the file's sha256 like the rest):
  ``trust.ood.<stream>.{points,neighbours}`` (the k-NN reference, :mod:`anymc3d.evaluation.ood`;
  plugins written before it hold ``{mean,basis,eigvals,resid}``, a Mahalanobis reference, and keep it),
  ``trust.val.probs`` (raw validation probabilities), ``trust.val.labels``, ``trust.val.ood`` (the
  validation cases' OOD scores: the percentiles and the flag threshold).

:func:`annotate` adds to a prediction: ``probabilities`` (calibrated), ``raw_probabilities``,
``threshold`` on the calibrated scale (``raw_threshold`` beside it), ``ood`` {score, percentile, flag,
threshold}, ``prediction_set`` {labels, coverage}. A plugin written before this (no ``trust``) still
loads and answers: those fields are ``null`` and ``trust_note`` says why in one line.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ..evaluation import calibration as cal_mod
from ..evaluation import conformal, ood

PREFIX = "trust."
OLD_PLUGIN_NOTE = cal_mod.OLD_PLUGIN_NOTE  # a plugin written before trust fields were stored
#: cases of the training split the OOD reference is fitted on (a random subset beyond that)
MAX_REFERENCE_CASES = 2000


@dataclass
class Trust:
    task_type: str
    label_names: list[str]
    calibration: dict | None = None
    ood: dict | None = None                       # method, feature, k, percentile, threshold, streams
    refs: dict[str, dict] = field(default_factory=dict)
    val_probs: np.ndarray | None = None           # raw, (n, n_outputs)
    val_labels: np.ndarray | None = None          # (n,) class index, or (n, K) multilabel
    val_ood: np.ndarray | None = None
    operating_point: dict | None = None

    # ---- storage --------------------------------------------------------------------------------
    def spec_dict(self) -> dict[str, Any]:
        return {"calibration": self.calibration, "ood": self.ood,
                "conformal": ({"score": "lac", "n": int(len(self.val_labels))} if self.has_conformal else None),
                "operating_point": self.operating_point}

    def tensors(self) -> dict[str, torch.Tensor]:
        out = ood.to_tensors(self.refs, PREFIX + "ood.")
        for name, arr in (("val.probs", self.val_probs), ("val.labels", self.val_labels), ("val.ood", self.val_ood)):
            if arr is not None:
                out[PREFIX + name] = torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32))
        return out

    @classmethod
    def from_file(cls, spec, tensors: dict[str, torch.Tensor]) -> "Trust | None":
        d = getattr(spec, "trust", None)
        if not d:
            return None
        t = {k: v for k, v in tensors.items() if k.startswith(PREFIX)}
        get = (lambda k: t[PREFIX + k].float().numpy() if PREFIX + k in t else None)
        labels = get("val.labels")
        if labels is not None and spec.task_type != "multilabel":
            labels = labels.astype(int).ravel()
        return cls(spec.task_type, list(spec.label_names), d.get("calibration"), d.get("ood"),
                   ood.from_tensors(t, list((d.get("ood") or {}).get("streams", [])), PREFIX + "ood."),
                   get("val.probs"), labels, get("val.ood"), d.get("operating_point"))

    # ---- what it can answer ---------------------------------------------------------------------
    @property
    def has_conformal(self) -> bool:
        return self.val_probs is not None and self.val_labels is not None and self.task_type != "multilabel" \
            and len(self.val_labels) > 0

    @property
    def has_ood(self) -> bool:
        return bool(self.ood) and bool(self.refs) and self.val_ood is not None

    def calibrate(self, probs) -> np.ndarray:
        return cal_mod.apply_calibration(self.calibration, probs)

    def conformal_scores(self) -> np.ndarray:
        cp = cal_mod.class_probabilities(self.task_type, self.calibrate(self.val_probs))
        return conformal.nonconformity(cp, self.val_labels)

    def ood_scores(self, emb: dict[str, np.ndarray]) -> np.ndarray:
        return ood.combined_score(self.refs, {s: emb[s] for s in self.refs})


# ------------------------------------------------------------------------------------------- fit
def fit_trust(model, runtime, train_cases: list, val_cases: list, y_val, batch_size: int = 4,
              points: int = ood.DEFAULT_REFERENCE_POINTS, neighbours: int = ood.DEFAULT_NEIGHBOURS,
              percentile: float = ood.DEFAULT_PERCENTILE, seed: int = 0,
              log=print, train_runtime=None) -> Trust:
    """Predict the training cases (up to :data:`MAX_REFERENCE_CASES`) and the validation cases with the
    trained model, fit the OOD reference on the training embeddings, and keep the validation
    probabilities, labels and OOD scores; the calibration is fitted on validation.

    ``train_runtime``: the runtime for the training cases' pass (training's, whose trunk cache already
    holds them; default ``runtime``). That pass runs without test-time flips: the embedding a prediction
    is scored by is its unflipped pass's (:attr:`anymc3d.evaluation.ood.EmbeddingCapture.passes`)."""
    import time

    spec = model.spec
    t0 = time.time()
    if len(train_cases) > MAX_REFERENCE_CASES:
        idx = np.random.default_rng(seed).choice(len(train_cases), MAX_REFERENCE_CASES, replace=False)
        train_cases = [train_cases[i] for i in sorted(idx)]
    _, _, cap_tr = ood.predict_with_embeddings(train_runtime or runtime, train_cases, batch_size, flips=False)
    emb_tr = cap_tr.take("task_query")
    refs = {s: ood.fit_knn_reference(x, points, neighbours, seed) for s, x in emb_tr.items()
            if np.isfinite(x).all(axis=1).sum() >= 3}
    vprobs, _, cap_v = ood.predict_with_embeddings(runtime, val_cases, batch_size)
    y_val = np.asarray(y_val)
    labels = y_val.astype(np.float32) if spec.task_type == "multilabel" else y_val.astype(int).ravel()
    trust = Trust(spec.task_type, list(spec.label_names), cal_mod.fit_calibration(spec.task_type, labels, vprobs),
                  None, refs, np.asarray(vprobs, np.float32), labels, None)
    if refs:
        vs = trust.ood_scores(cap_v.take("task_query"))
        trust.val_ood = vs.astype(np.float32)
        # the threshold's cases: validation and the training cases scored as new ones (cross-fitted)
        tr = ood.cross_fitted_scores({s: emb_tr[s] for s in refs}, points, neighbours, seed=seed)
        held = np.r_[vs[np.isfinite(vs)], tr[np.isfinite(tr)]]
        trust.ood = {"method": ood.DEFAULT_METHOD, "feature": "task_query", "points": int(points),
                     "neighbours": int(neighbours),
                     "percentile": float(percentile), "threshold": ood.ood_threshold(held, percentile),
                     "threshold_cases": {"validation": int(np.isfinite(vs).sum()),
                                         "training, cross-fitted": int(np.isfinite(tr).sum())},
                     "streams": list(refs), "n_reference": int(len(train_cases))}
    log(f"trust: calibration {trust.calibration['method'] if trust.calibration else 'none'}; OOD reference "
        f"{len(refs)} stream(s) from {len(train_cases)} training cases ({points} points); conformal scores from "
        f"{len(val_cases)} validation cases ({time.time() - t0:.0f} s)")
    return trust


# --------------------------------------------------------------------------------------- predict
def annotate(res: dict, trust: Trust | None, spec, raw_probs, emb: dict[str, np.ndarray] | None,
             coverage: float = conformal.DEFAULT_COVERAGE) -> dict:
    """Add calibrated probabilities, the OOD score and the prediction set to a ``volume_result`` dict
    (``raw_probs``: the plugin's (n_outputs,) raw probabilities; ``emb``: stream -> (1, D))."""
    raw = dict(res["probabilities"])
    res["raw_probabilities"] = raw
    res["raw_threshold"] = res.get("threshold", spec.threshold)
    res["calibration"], res["ood"], res["prediction_set"] = None, None, None
    if trust is None:
        res["trust_note"] = OLD_PLUGIN_NOTE
        return res
    notes = []
    raw_probs = np.asarray(raw_probs, dtype=np.float64).reshape(1, -1)
    if trust.calibration:
        cp = trust.calibrate(raw_probs)[0]
        if spec.task_type == "binary":
            p = float(cp[0])
            res["probabilities"] = {spec.label_names[0]: 1 - p, spec.label_names[1]: p}
            res["threshold"] = cal_mod.calibrated_threshold(trust.calibration, spec.threshold)
        else:
            res["probabilities"] = {n: float(v) for n, v in zip(spec.label_names, cp)}
        res["calibration"] = trust.calibration["method"]
    elif spec.task_type != "multilabel":
        notes.append("no calibration (its fit on validation was degenerate): probabilities are raw")
    if trust.has_ood and emb is not None:
        s = float(trust.ood_scores(emb)[0])
        if np.isfinite(s):
            thr = float(trust.ood["threshold"])
            res["ood"] = {"score": round(s, 6), "percentile": round(ood.percentile_of(trust.val_ood, s), 2),
                          "flag": bool(s > thr), "threshold": round(thr, 6)}
            if s > thr:
                res.setdefault("warnings", []).append(
                    f"out of distribution: OOD score {s:.3g} above the plugin's threshold {thr:.3g} (the "
                    f"{trust.ood['percentile']:g} % quantile of its held-out cases' scores); do not rely on this prediction")
    if trust.has_conformal:
        cp = cal_mod.class_probabilities(spec.task_type, trust.calibrate(raw_probs))
        cut = conformal.conformal_cut(trust.conformal_scores(), coverage)
        members = conformal.prediction_sets(cp, cut)[0]
        res["prediction_set"] = {"labels": [n for n, m in zip(spec.label_names, members) if m],
                                 "coverage": float(coverage)}
    elif spec.task_type == "multilabel":
        notes.append("no conformal set for multi-label plugins")
    if notes:
        res["trust_note"] = "; ".join(notes)
    return res


def trust_text(res: dict) -> str:
    """The OOD / set part of a printed line: ``; set {present} at 90%; OOD 42nd percentile``."""
    parts = []
    ps = res.get("prediction_set")
    if ps is not None:
        parts.append(f"set {{{', '.join(ps['labels'])}}} at {100 * ps['coverage']:g}%")
    o = res.get("ood")
    if o is not None:
        parts.append(f"OOD {'FLAGGED' if o['flag'] else 'ok'} (score {o['score']:.3g}, {o['percentile']:.0f}th pct)")
    return ("; " + "; ".join(parts)) if parts else ""


def info(spec, tensors_bytes: int | None = None) -> dict:
    """What ``plugins info`` shows of a spec's trust fields."""
    d = getattr(spec, "trust", None)
    if not d:
        return {"calibration": None, "ood": None, "conformal": None, "note": OLD_PLUGIN_NOTE}
    return {"calibration": d.get("calibration"), "ood": d.get("ood"), "conformal": d.get("conformal"),
            "operating_point": d.get("operating_point")}
