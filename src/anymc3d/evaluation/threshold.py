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
* ``sens=X`` / ``spec=X`` (operating points): the threshold at which the validation sensitivity /
  specificity reaches X (for an unbalanced task where the accuracy-optimal cut misses positives);
  ``evaluate`` reports the sensitivity and specificity it reaches on test, with CIs.
* a number: that fixed threshold (``0.5`` is MedMNIST's ACC definition).

Multi-class tasks decide by arg-max; multi-label tasks use the fixed threshold (0.5 by default).
"""
from __future__ import annotations

import numpy as np

POLICIES = ("platt", "youden")
DEFAULT_POLICY = "platt"
#: ``sens=0.9`` / ``spec=0.95``: the threshold reaching that sensitivity / specificity on validation
OPERATING_POINTS = ("sens", "spec")


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
    """The raw score at which a logistic calibration fitted on (score, y) reaches 0.5
    (the fit of :func:`anymc3d.evaluation.calibration.platt_fit`, which the plugin also stores)."""
    from .calibration import platt_fit

    ab = platt_fit(y, score)
    if ab is None:
        return 0.5
    a, b = ab
    return float(np.clip(1 / (1 + np.exp(a / b)), 1e-6, 1 - 1e-6))  # sigmoid(-a / b)


def operating_point_threshold(y: np.ndarray, score: np.ndarray, kind: str, target: float) -> float:
    """The threshold reaching sensitivity (``kind="sens"``) or specificity (``"spec"``) >= ``target`` on
    validation (``score > threshold`` is positive): the largest such threshold for a sensitivity target
    (as specific as the target allows), the smallest for a specificity target; halfway to the next
    score so that it does not sit on a validation case."""
    y = np.asarray(y).astype(int).ravel()
    s = np.asarray(score, dtype=np.float64).ravel()
    pos, neg = np.sort(s[y == 1])[::-1], np.sort(s[y == 0])
    if len(pos) == 0 or len(neg) == 0:
        return 0.5
    if kind == "sens":
        m = int(np.ceil(target * len(pos) - 1e-9))
        if m <= 0:
            return float(np.clip(s.max(), 1e-6, 1 - 1e-6))
        cut = pos[m - 1]                       # the m-th highest positive must stay above the threshold
        below = s[s < cut]
        thr = (cut + below.max()) / 2 if len(below) else cut - 1e-6
    else:
        m = int(np.ceil(target * len(neg) - 1e-9))
        if m <= 0:
            return float(np.clip(s.min() - 1e-6, 1e-6, 1 - 1e-6))
        cut = neg[m - 1]                       # the m-th lowest negative must stay at or below it
        above = s[s > cut]
        thr = (cut + above.min()) / 2 if len(above) else cut
    return float(np.clip(thr, 1e-6, 1 - 1e-6))


def parse_operating_point(policy) -> tuple[str, float] | None:
    """``"sens=0.9"`` -> ("sens", 0.9); anything else -> None."""
    if not isinstance(policy, str) or "=" not in policy:
        return None
    kind, _, v = policy.partition("=")
    kind = kind.strip().lower()
    if kind not in OPERATING_POINTS:
        raise ValueError(f"--threshold: an operating point is sens=X or spec=X, got {policy!r}")
    try:
        target = float(v)
    except ValueError:
        raise ValueError(f"--threshold: the target of {policy!r} is not a number") from None
    if not 0.0 < target <= 1.0:
        raise ValueError(f"--threshold: the target of {policy!r} must lie in (0, 1]")
    return kind, target


def choose_threshold(y: np.ndarray | None, score: np.ndarray | None, task_type: str,
                     policy: str | float = DEFAULT_POLICY) -> float:
    """The decision threshold for ``task_type`` under ``policy`` (see the module docstring)."""
    if isinstance(policy, (int, float)) and not isinstance(policy, bool):
        return float(policy)
    op = parse_operating_point(policy)
    if op is not None:
        if task_type != "binary" or y is None or score is None or len(y) == 0:
            return 0.5
        return operating_point_threshold(y, score, *op)
    if policy not in POLICIES:
        raise ValueError(f"threshold policy must be one of {POLICIES} or a number, got {policy!r}")
    if task_type != "binary" or y is None or score is None or len(y) == 0:
        return 0.5
    return youden_threshold(y, score) if policy == "youden" else platt_threshold(y, score)


def parse_policy(text: str) -> str | float:
    """``--threshold platt|youden|sens=0.9|spec=0.95|0.5`` -> a policy name or a number."""
    if text in POLICIES:
        return text
    if "=" in text:
        kind, target = parse_operating_point(text)
        return f"{kind}={target:g}"
    try:
        v = float(text)
    except ValueError:
        raise ValueError(f"--threshold: expected {' or '.join(POLICIES)}, sens=X, spec=X or a number in (0, 1), "
                         f"got {text!r}") from None
    if not 0.0 < v < 1.0:
        raise ValueError(f"--threshold: a fixed threshold must lie in (0, 1), got {text!r}")
    return v
