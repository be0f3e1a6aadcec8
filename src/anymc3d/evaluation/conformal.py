"""Split conformal prediction sets (binary and multi-class plugins).

Nonconformity score (LAC, "least ambiguous set-valued classifier", Sadinle et al. 2019):
``s = 1 - p(true class)`` on the calibrated probabilities of the validation split, which the plugin
stores. For a coverage level ``1 - alpha`` the cut ``q`` is the ``ceil((n + 1)(1 - alpha))``-th
smallest validation score (every label when that rank exceeds n); a case's set holds every class
with ``1 - p(class) <= q``. When validation and new cases are exchangeable, the set holds the true
class with probability at least ``1 - alpha`` (and below ``1 - alpha + 1/(n + 1)``).

The validation scores are stored, not the cut, so the coverage stays a choice at prediction
(``--coverage``, 0.9 by default). Why not crepes / MAPIE / TorchCP: the computation is one order
statistic of stored numbers; MAPIE wraps a scikit-learn estimator (its state is a pickle, which a
plugin file never holds), TorchCP wraps a torch model and its data loaders, and crepes'
``ConformalClassifier`` would do this quantile on the same arrays but adds a dependency for it.
The tests check the coverage guarantee empirically instead.
"""
from __future__ import annotations

import math

import numpy as np

DEFAULT_COVERAGE = 0.9


def check_coverage(coverage: float) -> float:
    c = float(coverage)
    if not 0.0 < c < 1.0 or not math.isfinite(c):
        raise ValueError(f"coverage must lie in (0, 1), got {coverage!r}")
    return c


def nonconformity(class_probs, y) -> np.ndarray:
    """LAC scores ``1 - p(true class)`` of (N, K) per-class probabilities."""
    class_probs = np.asarray(class_probs, dtype=np.float64)
    y = np.asarray(y).astype(int).ravel()
    return 1.0 - class_probs[np.arange(len(y)), y]


def conformal_cut(scores, coverage: float) -> float:
    """The split-conformal cut of validation ``scores`` at ``coverage`` (inf: every label)."""
    coverage = check_coverage(coverage)
    s = np.sort(np.asarray(scores, dtype=np.float64).ravel())
    n = len(s)
    rank = math.ceil((n + 1) * coverage)
    if n == 0 or rank > n:
        return math.inf
    return float(s[rank - 1])


def prediction_sets(class_probs, cut: float) -> np.ndarray:
    """(N, K) bool: class k is in case i's set when ``1 - p_ik <= cut``."""
    return (1.0 - np.asarray(class_probs, dtype=np.float64)) <= cut + 1e-12


def coverage_and_size(class_probs, y, scores, coverage: float) -> dict:
    """Empirical coverage and mean set size on labelled cases at ``coverage``."""
    sets = prediction_sets(class_probs, conformal_cut(scores, coverage))
    y = np.asarray(y).astype(int).ravel()
    covered = sets[np.arange(len(y)), y]
    return {"coverage": float(coverage), "empirical_coverage": float(covered.mean()) if len(y) else None,
            "mean_set_size": float(sets.sum(axis=1).mean()) if len(y) else None,
            "empty_sets": int((sets.sum(axis=1) == 0).sum()), "n": int(len(y)), "n_calibration": int(len(scores))}
