"""Calibration of a plugin's probabilities: the fit that prediction applies, and how well it holds.

* **Binary: Platt scaling.** ``P(y=1) = sigmoid(a + b * logit(p))`` fitted on the validation scores
  (scikit-learn's logistic regression, the fit that :func:`anymc3d.evaluation.threshold.platt_threshold`
  has always used for the decision threshold). Every answer reports the calibrated probability; the
  threshold is reported on the same scale (``sigmoid(a + b * logit(raw threshold))``, 0.5 under the
  ``platt`` policy), so the decision does not change.
* **Multi-class: temperature scaling.** ``softmax(log(p) / T)`` with T fitted on validation by
  minimising the negative log-likelihood (scipy); the arg-max, hence the decision, is unchanged.
* **Multi-label:** not calibrated (``null``), each label's fixed threshold stays as it was.

Measures (``evaluate`` reports them before and after the calibration): the expected calibration
error with equal-mass bins (each bin holds the same number of cases), the Brier score, and
per-class (one-vs-rest) ECE; :func:`reliability_diagram` draws ``calibration.png``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

#: the one-line note of a plugin written before calibration / OOD / conformal fields were stored
OLD_PLUGIN_NOTE = ("this plugin was trained before calibration, OOD reference and conformal scores were stored: "
                   "calibration, ood and prediction_set are null (retrain it to get them)")


EPS = 1e-6


def logit(p) -> np.ndarray:
    p = np.clip(np.asarray(p, dtype=np.float64), EPS, 1 - EPS)
    return np.log(p / (1 - p))


def sigmoid(z) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.asarray(z, dtype=np.float64)))


# --------------------------------------------------------------------------- fitting
def platt_fit(y, score) -> tuple[float, float] | None:
    """(a, b) of ``sigmoid(a + b * logit(score))`` on validation; None when the fit is degenerate
    (one class, constant scores, or a slope <= 0)."""
    from sklearn.linear_model import LogisticRegression

    y = np.asarray(y).astype(int).ravel()
    score = np.asarray(score, dtype=np.float64).ravel()
    if len(y) == 0 or len(np.unique(y)) < 2:
        return None
    z = logit(score).reshape(-1, 1)
    if float(z.std()) < 1e-9:
        return None
    lr = LogisticRegression(C=100.0, max_iter=1000).fit(z, y)
    a, b = float(lr.intercept_[0]), float(lr.coef_[0, 0])
    return (a, b) if b > 0 else None


def temperature_fit(y, probs) -> float | None:
    """The temperature T of ``softmax(log(p) / T)`` minimising validation NLL (None: fewer than 2 classes seen)."""
    from scipy.optimize import minimize_scalar

    y = np.asarray(y).astype(int).ravel()
    lp = np.log(np.clip(np.asarray(probs, dtype=np.float64), EPS, 1.0))
    if len(y) == 0 or len(np.unique(y)) < 2:
        return None

    def nll(log_t: float) -> float:
        z = lp / np.exp(log_t)
        z = z - z.max(axis=1, keepdims=True)
        return float(-np.mean(z[np.arange(len(y)), y] - np.log(np.exp(z).sum(axis=1))))

    r = minimize_scalar(nll, bounds=(np.log(0.05), np.log(20.0)), method="bounded")
    return float(np.exp(r.x))


def fit_calibration(task_type: str, y, probs) -> dict | None:
    """The calibration to store with a plugin (JSON-ready), fitted on validation; None if there is none."""
    probs = np.asarray(probs, dtype=np.float64)
    if task_type == "binary":
        ab = platt_fit(y, probs.reshape(len(probs), -1)[:, 0])
        return None if ab is None else {"method": "platt", "a": ab[0], "b": ab[1], "n": int(len(probs))}
    if task_type == "multiclass":
        t = temperature_fit(y, probs)
        return None if t is None else {"method": "temperature", "t": t, "n": int(len(probs))}
    return None


def apply_calibration(cal: dict | None, probs) -> np.ndarray:
    """Raw probabilities (N, n_outputs) -> calibrated (the same array when ``cal`` is None)."""
    probs = np.asarray(probs, dtype=np.float64)
    if not cal:
        return probs
    if cal["method"] == "platt":
        return sigmoid(cal["a"] + cal["b"] * logit(probs))
    if cal["method"] == "temperature":
        z = np.log(np.clip(probs, EPS, 1.0)) / cal["t"]
        z = z - z.max(axis=-1, keepdims=True)
        e = np.exp(z)
        return e / e.sum(axis=-1, keepdims=True)
    raise ValueError(f"unknown calibration method {cal['method']!r}")


def calibrated_threshold(cal: dict | None, threshold: float) -> float:
    """The raw decision threshold on the calibrated scale (Platt is monotone: same decisions)."""
    if not cal or cal["method"] != "platt":
        return float(threshold)
    return float(sigmoid(cal["a"] + cal["b"] * logit(threshold)))


# --------------------------------------------------------------------------- measures
def class_probabilities(task_type: str, probs) -> np.ndarray:
    """(N, K) per-class probabilities: binary (N, 1) -> [1 - p, p]."""
    probs = np.asarray(probs, dtype=np.float64)
    if task_type == "binary":
        p = probs.reshape(len(probs), -1)[:, 0]
        return np.stack([1 - p, p], axis=1)
    return probs


def ece_equal_mass(y_bin, p, n_bins: int = 10) -> float | None:
    """Expected calibration error of a binary event with equal-mass bins: sum_b |B|/N |mean(y) - mean(p)|."""
    y_bin = np.asarray(y_bin, dtype=np.float64).ravel()
    p = np.asarray(p, dtype=np.float64).ravel()
    if len(p) == 0:
        return None
    order = np.argsort(p, kind="stable")
    bins = np.array_split(order, min(n_bins, len(p)))
    return float(sum(len(b) / len(p) * abs(y_bin[b].mean() - p[b].mean()) for b in bins if len(b)))


def calibration_summary(task_type: str, y, probs, label_names, n_bins: int = 10) -> dict[str, Any]:
    """ECE (equal-mass bins), Brier score and per-class ECE of probabilities (N, n_outputs).

    Binary: the event "positive" with p(positive). Multi-class: top-label ECE (confidence of the
    arg-max vs its accuracy) and the multi-class Brier score (mean squared error of the one-hot
    vector); per class: one-vs-rest ECE. Multi-label: the mean over labels."""
    y = np.asarray(y)
    probs = np.asarray(probs, dtype=np.float64)
    if task_type == "binary":
        p = probs.reshape(len(probs), -1)[:, 0]
        yb = y.astype(int).ravel()
        return {"ece": ece_equal_mass(yb, p, n_bins), "brier": float(np.mean((p - yb) ** 2)),
                "per_class_ece": {str(label_names[1]): ece_equal_mass(yb, p, n_bins)}, "bins": n_bins}
    if task_type == "multiclass":
        yi = y.astype(int).ravel()
        onehot = np.eye(probs.shape[1])[yi]
        conf, pred = probs.max(axis=1), probs.argmax(axis=1)
        return {"ece": ece_equal_mass(pred == yi, conf, n_bins),
                "brier": float(np.mean(np.sum((probs - onehot) ** 2, axis=1))),
                "per_class_ece": {str(n): ece_equal_mass(onehot[:, k], probs[:, k], n_bins)
                                  for k, n in enumerate(label_names)}, "bins": n_bins}
    per = {str(n): ece_equal_mass(y[:, k], probs[:, k], n_bins) for k, n in enumerate(label_names)}
    vals = [v for v in per.values() if v is not None]
    return {"ece": float(np.mean(vals)) if vals else None, "brier": float(np.mean((probs - y) ** 2)),
            "per_class_ece": per, "bins": n_bins}


def reliability_curve(y_bin, p, n_bins: int = 10) -> tuple[np.ndarray, np.ndarray]:
    """(mean predicted, observed frequency) per equal-mass bin."""
    y_bin = np.asarray(y_bin, dtype=np.float64).ravel()
    p = np.asarray(p, dtype=np.float64).ravel()
    bins = [b for b in np.array_split(np.argsort(p, kind="stable"), min(n_bins, max(len(p), 1))) if len(b)]
    return np.array([p[b].mean() for b in bins]), np.array([y_bin[b].mean() for b in bins])


def reliability_diagram(task_type: str, y, curves: dict[str, np.ndarray], path: str | Path, title: str = "",
                        n_bins: int = 10) -> Path:
    """``calibration.png``: one reliability curve per entry of ``curves`` (name -> probabilities), written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..io import atomic_write

    y = np.asarray(y)
    fig, ax = plt.subplots(figsize=(4.6, 4.4), dpi=110)
    ax.plot([0, 1], [0, 1], color="0.6", lw=1, ls="--", label="perfect")
    for name, probs in curves.items():
        probs = np.asarray(probs, dtype=np.float64)
        if task_type == "binary":
            yb, p = y.astype(int).ravel(), probs.reshape(len(probs), -1)[:, 0]
        elif task_type == "multiclass":
            yb, p = probs.argmax(axis=1) == y.astype(int).ravel(), probs.max(axis=1)
        else:
            yb, p = y.ravel(), probs.ravel()
        mp, fr = reliability_curve(yb, p, n_bins)
        ece = ece_equal_mass(yb, p, n_bins)
        ax.plot(mp, fr, marker="o", ms=3, label=f"{name} (ECE {ece:.3f})")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("predicted probability" + (" (top label)" if task_type == "multiclass" else ""))
    ax.set_ylabel("observed frequency")
    ax.set_title(title or "reliability (equal-mass bins)", fontsize=9)
    ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    path = Path(path)
    with atomic_write(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return path
