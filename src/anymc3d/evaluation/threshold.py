"""The decision threshold of a binary plugin: chosen on the validation split, stored in the plugin,
shown with every prediction.

Policies (``TrainConfig.threshold`` / ``anymc3d train --threshold``):

* ``platt`` (the default): fit a logistic calibration ``P(y=1) = sigmoid(a + b * logit(p))`` on the
  validation scores (Platt scaling) and decide where the calibrated probability crosses 0.5. Every
  validation case moves the fit a little, so one or two cases cannot swing it; it undoes the
  downward shift of focal loss (alpha = 0.25) and it is the accuracy-optimal cut when the
  calibration holds. With a degenerate fit (one class, or a slope <= 0) it falls back to 0.5.
* ``youden``: the cut that maximises sensitivity + specificity - 1 on validation. It is an arg-max
  over the validation cases, so on small validation sets it moves with single cases, and it trades
  accuracy for sensitivity on unbalanced data (docs/results.md, issue 15).
* a number: that fixed threshold (``0.5`` is MedMNIST's ACC definition).

Multi-class tasks decide by arg-max; multi-label tasks use the fixed threshold (0.5 by default).
"""
from __future__ import annotations

import numpy as np

POLICIES = ("platt", "youden")
DEFAULT_POLICY = "platt"


def youden_threshold(y: np.ndarray, score: np.ndarray) -> float:
    """Threshold maximising Youden's J (sensitivity + specificity - 1) on validation scores."""
    from sklearn.metrics import roc_curve

    if len(np.unique(y)) < 2:
        return 0.5
    fpr, tpr, thr = roc_curve(y, score)
    j = tpr - fpr
    best = int(np.argmax(j[1:]) + 1)  # thr[0] is +inf
    # midpoint between the chosen score and the next lower one generalises better than the score itself
    lo = thr[best + 1] if best + 1 < len(thr) else thr[best] - 1e-6
    return float(np.clip((thr[best] + lo) / 2, 1e-6, 1 - 1e-6))


def _logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(np.asarray(p, dtype=np.float64), 1e-6, 1 - 1e-6)
    return np.log(p / (1 - p))


def platt_threshold(y: np.ndarray, score: np.ndarray) -> float:
    """The raw score at which a logistic calibration fitted on (score, y) reaches 0.5."""
    from sklearn.linear_model import LogisticRegression

    y = np.asarray(y).astype(int).ravel()
    if len(np.unique(y)) < 2:
        return 0.5
    z = _logit(score).reshape(-1, 1)
    if float(z.std()) < 1e-9:
        return 0.5
    lr = LogisticRegression(C=100.0, max_iter=1000).fit(z, y)
    a, b = float(lr.intercept_[0]), float(lr.coef_[0, 0])
    if not b > 0:
        return 0.5
    return float(np.clip(1 / (1 + np.exp(a / b)), 1e-6, 1 - 1e-6))  # sigmoid(-a / b)


def choose_threshold(y: np.ndarray | None, score: np.ndarray | None, task_type: str,
                     policy: str | float = DEFAULT_POLICY) -> float:
    """The decision threshold for ``task_type`` under ``policy`` (see the module docstring)."""
    if isinstance(policy, (int, float)) and not isinstance(policy, bool):
        return float(policy)
    if policy not in POLICIES:
        raise ValueError(f"threshold policy must be one of {POLICIES} or a number, got {policy!r}")
    if task_type != "binary" or y is None or score is None or len(y) == 0:
        return 0.5
    return youden_threshold(y, score) if policy == "youden" else platt_threshold(y, score)


def parse_policy(text: str) -> str | float:
    """``--threshold platt|youden|0.5`` -> a policy name or a number."""
    if text in POLICIES:
        return text
    try:
        v = float(text)
    except ValueError:
        raise ValueError(f"--threshold: expected {' or '.join(POLICIES)} or a number in (0, 1), got {text!r}") from None
    if not 0.0 < v < 1.0:
        raise ValueError(f"--threshold: a fixed threshold must lie in (0, 1), got {text!r}")
    return v
