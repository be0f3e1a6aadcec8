"""Classification metrics with MedMNIST-compatible AUC/ACC and percentile-bootstrap CIs.

Definitions (they follow ``medmnist.evaluator.getAUC`` / ``getACC``):

* ``binary``: AUC = ``roc_auc_score(y_true, score_of_positive_class)``; ACC = accuracy of
  ``score > threshold`` (strictly greater, as MedMNIST). Sensitivity / specificity / PPV / NPV
  and the confusion matrix use the same prediction.
* ``multiclass``: AUC = unweighted mean over classes ``i`` of
  ``roc_auc_score(y_true == i, y_score[:, i])``; ACC = argmax accuracy. Per-class
  sensitivity (recall), specificity, PPV, NPV come from the argmax confusion matrix.
* ``multilabel``: AUC = macro mean of per-label AUCs; ACC = mean over labels of the per-label
  accuracy of ``score > threshold``.

A per-class / per-label AUC that is undefined (only one class present) is ``None``; it is left
out of the mean and a line is added to ``warnings``. If no AUC can be computed at all, ``auc`` is
``None`` -- never a made-up number. Every returned value is a plain Python type (JSON-ready).
"""
from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import numpy as np
from sklearn.metrics import roc_auc_score

from anymc3d.errors import InputError

__all__ = ["compute_metrics", "bootstrap_ci", "prepare_inputs", "TASK_TYPES"]

TASK_TYPES = ("binary", "multiclass", "multilabel")

_TASK_ALIASES = {
    "binary": "binary",
    "binary-class": "binary",
    "multiclass": "multiclass",
    "multi-class": "multiclass",
    "multilabel": "multilabel",
    "multi-label": "multilabel",
    "multi-label, binary-class": "multilabel",
}


# --------------------------------------------------------------------------- input checks
def _normalise_task(task_type: str) -> str:
    key = str(task_type).strip().lower()
    if key not in _TASK_ALIASES:
        raise InputError(f"task_type: unknown task type {task_type!r}; expected one of {list(TASK_TYPES)}")
    return _TASK_ALIASES[key]


def _as_array(x: Any, name: str) -> np.ndarray:
    try:
        arr = np.asarray(x)
    except Exception as exc:  # ragged lists etc.
        raise InputError(f"{name}: cannot be converted to an array ({exc})") from None
    if arr.dtype == object or not (np.issubdtype(arr.dtype, np.number) or arr.dtype == bool):
        raise InputError(f"{name}: expected numeric values, got dtype {arr.dtype}")
    if not np.all(np.isfinite(arr)):
        raise InputError(f"{name}: contains NaN or infinite values")
    return arr


def _squeeze_col(arr: np.ndarray) -> np.ndarray:
    """(N, 1) -> (N,) (MedMNIST stores labels as (N, 1))."""
    if arr.ndim == 2 and arr.shape[1] == 1:
        return arr[:, 0]
    return arr


def _as_int_labels(arr: np.ndarray, name: str) -> np.ndarray:
    if arr.dtype == bool:
        return arr.astype(np.int64)
    if not np.issubdtype(arr.dtype, np.integer):
        if not np.all(np.equal(np.mod(arr, 1), 0)):
            raise InputError(f"{name}: labels must be integers, found non-integer values")
    return arr.astype(np.int64)


def _check_names(label_names: Sequence[Any] | None, k: int, what: str) -> list[str]:
    if label_names is None:
        return [str(i) for i in range(k)]
    if isinstance(label_names, (str, bytes)):
        raise InputError("label_names: expected a list of names, got a single string")
    names = [str(n) for n in label_names]
    if len(names) != k:
        raise InputError(f"label_names: got {len(names)} names but the data has {k} {what}")
    if len(set(names)) != len(names):
        raise InputError(f"label_names: names must be unique, got {names}")
    return names


def prepare_inputs(
    y_true: Any, y_score: Any, task_type: str, label_names: Sequence[Any] | None = None
) -> tuple[np.ndarray, np.ndarray, str, list[str]]:
    """Validate and normalise inputs.

    Returns ``(y_true, y_score, task, names)``:
    binary -> y_true (N,) int in {0,1}, y_score (N,) positive-class score, names [neg, pos];
    multiclass -> y_true (N,) int in [0, K), y_score (N, K), K names;
    multilabel -> y_true (N, K) int in {0,1}, y_score (N, K), K names.
    Raises ``InputError`` on any shape / value problem.
    """
    task = _normalise_task(task_type)
    yt = _as_array(y_true, "y_true")
    ys = _as_array(y_score, "y_score").astype(np.float64)
    if yt.ndim == 0 or ys.ndim == 0:
        raise InputError("y_true/y_score: expected arrays with one row per case, got a scalar")
    if yt.shape[0] != ys.shape[0]:
        raise InputError(
            f"y_true/y_score: length mismatch, y_true has {yt.shape[0]} cases but y_score has {ys.shape[0]}"
        )
    n = yt.shape[0]
    if n == 0:
        raise InputError("y_true/y_score: no cases (empty arrays)")

    if task == "binary":
        yt = _squeeze_col(yt)
        if yt.ndim != 1:
            raise InputError(f"y_true: binary task expects shape (N,), got {yt.shape}")
        if ys.ndim == 2 and ys.shape[1] in (1, 2):
            ys = ys[:, -1]  # (N,1) -> column 0; (N,2) -> column 1 (positive class)
        if ys.ndim != 1:
            raise InputError(
                f"y_score: binary task expects shape (N,) or (N, 2), got {ys.shape}"
                + (" (use task_type='multiclass' for more than two classes)" if ys.ndim == 2 else "")
            )
        yt = _as_int_labels(yt, "y_true")
        bad = np.setdiff1d(np.unique(yt), [0, 1])
        if bad.size:
            raise InputError(f"y_true: binary labels must be 0 or 1, found {bad.tolist()}")
        names = _check_names(label_names, 2, "classes (negative, positive)")
        return yt, ys, task, names

    if task == "multiclass":
        yt = _squeeze_col(yt)
        if yt.ndim != 1:
            raise InputError(f"y_true: multiclass task expects shape (N,) of class indices, got {yt.shape}")
        if ys.ndim != 2 or ys.shape[1] < 2:
            raise InputError(f"y_score: multiclass task expects shape (N, K) with K >= 2, got {ys.shape}")
        k = ys.shape[1]
        yt = _as_int_labels(yt, "y_true")
        if yt.min() < 0 or yt.max() >= k:
            raise InputError(
                f"y_true: class indices must be in [0, {k - 1}] for y_score with {k} columns, "
                f"found range [{int(yt.min())}, {int(yt.max())}]"
            )
        names = _check_names(label_names, k, "classes")
        return yt, ys, task, names

    # multilabel
    if yt.ndim != 2:
        raise InputError(f"y_true: multilabel task expects shape (N, K), got {yt.shape}")
    if ys.ndim != 2:
        raise InputError(f"y_score: multilabel task expects shape (N, K), got {ys.shape}")
    if yt.shape != ys.shape:
        raise InputError(f"y_true/y_score: shape mismatch, y_true {yt.shape} vs y_score {ys.shape}")
    yt = _as_int_labels(yt, "y_true")
    bad = np.setdiff1d(np.unique(yt), [0, 1])
    if bad.size:
        raise InputError(f"y_true: multilabel targets must be 0 or 1, found {bad.tolist()}")
    names = _check_names(label_names, yt.shape[1], "labels")
    return yt, ys, task, names


# --------------------------------------------------------------------------- primitives
def _ratio(num: int, den: int) -> float | None:
    return float(num) / float(den) if den > 0 else None


def _mean_defined(values: Sequence[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return float(np.mean(vals)) if vals else None


def _sklearn_auc(y: np.ndarray, s: np.ndarray) -> float | None:
    """Point-estimate AUC via sklearn; None when only one class is present."""
    y = np.asarray(y).astype(bool)
    if y.all() or not y.any():
        return None
    return float(roc_auc_score(y.astype(np.int64), s))


def _fast_auc(y: np.ndarray, s: np.ndarray) -> float | None:
    """Mann-Whitney AUC with tie-averaged ranks (== roc_auc_score); for the bootstrap loop."""
    y = np.asarray(y).astype(bool)
    n = y.shape[0]
    npos = int(y.sum())
    nneg = n - npos
    if npos == 0 or nneg == 0:
        return None
    order = np.argsort(s, kind="mergesort")
    ss = s[order]
    starts = np.flatnonzero(np.r_[True, ss[1:] != ss[:-1]])
    ends = np.r_[starts[1:], n]
    avg_rank = (starts + ends + 1) / 2.0  # mean of 1-based ranks starts+1 .. ends
    ranks = np.empty(n, dtype=np.float64)
    ranks[order] = np.repeat(avg_rank, ends - starts)
    return float((ranks[y].sum() - npos * (npos + 1) / 2.0) / (npos * nneg))


def _counts(y: np.ndarray, pred: np.ndarray) -> dict[str, int]:
    y = y.astype(bool)
    pred = pred.astype(bool)
    return {
        "tp": int(np.sum(y & pred)),
        "fp": int(np.sum(~y & pred)),
        "tn": int(np.sum(~y & ~pred)),
        "fn": int(np.sum(y & ~pred)),
    }


def _rates(c: dict[str, int]) -> dict[str, float | None]:
    return {
        "sensitivity": _ratio(c["tp"], c["tp"] + c["fn"]),
        "specificity": _ratio(c["tn"], c["tn"] + c["fp"]),
        "ppv": _ratio(c["tp"], c["tp"] + c["fp"]),
        "npv": _ratio(c["tn"], c["tn"] + c["fn"]),
    }


def _auc_fn(task: str, classes: list[int], auc: Callable = _fast_auc) -> Callable:
    """AUC as a function of (y_true, y_score) over a fixed set of classes/labels.

    Returns None (undefined) when any of those classes is single-class in the sample.
    """

    def fn(yt: np.ndarray, ys: np.ndarray) -> float | None:
        if task == "binary":
            return auc(yt, ys)
        vals = []
        for i in classes:
            v = auc(yt == i, ys[:, i]) if task == "multiclass" else auc(yt[:, i], ys[:, i])
            if v is None:
                return None
            vals.append(v)
        return float(np.mean(vals)) if vals else None

    return fn


def _acc_fn(task: str, threshold: float) -> Callable:
    def fn(yt: np.ndarray, ys: np.ndarray) -> float:
        if task == "binary":
            return float(np.mean((ys > threshold) == yt.astype(bool)))
        if task == "multiclass":
            return float(np.mean(np.argmax(ys, axis=1) == yt))
        return float(np.mean(np.mean((ys > threshold) == yt.astype(bool), axis=0)))

    return fn


# --------------------------------------------------------------------------- bootstrap
def _bootstrap_values(metric_fn: Callable, y_true: np.ndarray, y_score: np.ndarray, n: int, seed: int) -> list[float]:
    y_true = np.asarray(y_true)
    y_score = np.asarray(y_score)
    m = y_true.shape[0]
    rng = np.random.default_rng(seed)
    out: list[float] = []
    for _ in range(int(n)):
        idx = rng.integers(0, m, size=m)
        try:
            v = metric_fn(y_true[idx], y_score[idx])
        except ValueError:  # e.g. sklearn "Only one class present"
            continue
        if v is None:
            continue
        v = float(v)
        if math.isfinite(v):
            out.append(v)
    return out


def bootstrap_ci(
    metric_fn: Callable[[np.ndarray, np.ndarray], float | None],
    y_true: Any,
    y_score: Any,
    n: int = 1000,
    seed: int = 0,
    alpha: float = 0.05,
) -> tuple[float, float] | None:
    """Percentile bootstrap CI over cases.

    Resamples rows of ``y_true``/``y_score`` with replacement ``n`` times (``numpy`` generator
    seeded with ``seed``, so the result is deterministic), evaluates ``metric_fn`` on each
    resample and returns the ``(alpha/2, 1-alpha/2)`` percentiles as plain floats. Resamples
    where the metric is undefined (``metric_fn`` returns None/NaN or raises ``ValueError``) are
    skipped. Returns ``None`` when no resample gives a defined value (or ``n == 0``).
    """
    if int(n) < 0:
        raise InputError(f"n_bootstrap: must be >= 0, got {n}")
    yt = np.asarray(y_true)
    ys = np.asarray(y_score)
    if yt.shape[0] != ys.shape[0]:
        raise InputError(f"y_true/y_score: length mismatch ({yt.shape[0]} vs {ys.shape[0]})")
    vals = _bootstrap_values(metric_fn, yt, ys, n, seed)
    if not vals:
        return None
    lo, hi = np.percentile(vals, [100 * alpha / 2, 100 * (1 - alpha / 2)])
    return float(lo), float(hi)


# --------------------------------------------------------------------------- main entry
def _check_options(threshold: Any, n_bootstrap: Any) -> tuple[float, int]:
    """Validate ``threshold`` (a finite number) and ``n_bootstrap`` (a non-negative integer)."""
    try:
        threshold = float(threshold)
    except (TypeError, ValueError):
        raise InputError(f"threshold: expected a number, got {threshold!r}") from None
    if not math.isfinite(threshold):
        raise InputError(f"threshold: must be finite, got {threshold}")
    if isinstance(n_bootstrap, bool) or int(n_bootstrap) != n_bootstrap or int(n_bootstrap) < 0:
        raise InputError(f"n_bootstrap: must be a non-negative integer, got {n_bootstrap!r}")
    return threshold, int(n_bootstrap)


def _binary_metrics(yt: np.ndarray, ys: np.ndarray, names: list[str], threshold: float,
                    out: dict[str, Any], warnings: list[str]) -> list[int]:
    """Binary AUC/ACC, rates, confusion matrix and support into ``out``; returns the AUC classes."""
    n = int(yt.shape[0])
    out["n_classes"] = 2
    auc = _sklearn_auc(yt, ys)
    if auc is None:
        warnings.append(
            f"AUC undefined: y_true contains only class {names[int(yt[0])]!r} ({n} cases); auc is None"
        )
    pred = ys > threshold
    c = _counts(yt, pred)
    out["auc"] = auc
    out["acc"] = float(np.mean(pred == yt.astype(bool)))
    out["per_class_auc"] = {names[1]: auc}
    out.update(_rates(c))
    out["confusion_matrix"] = [[c["tn"], c["fp"]], [c["fn"], c["tp"]]]
    out["support"] = {names[0]: int(np.sum(yt == 0)), names[1]: int(np.sum(yt == 1))}
    return [1]


def _multi_predictions(yt: np.ndarray, ys: np.ndarray, task: str, threshold: float,
                       out: dict[str, Any]) -> np.ndarray:
    """Argmax (multiclass) or thresholded (multilabel) predictions; ACC and confusion matrix into ``out``."""
    if task == "multiclass":
        k = int(ys.shape[1])
        pred_cls = np.argmax(ys, axis=1)
        cm = np.zeros((k, k), dtype=np.int64)
        np.add.at(cm, (yt, pred_cls), 1)
        out["confusion_matrix"] = cm.tolist()
        out["acc"] = float(np.mean(pred_cls == yt))
        return pred_cls
    pred_ml = ys > threshold
    out["confusion_matrix"] = {}
    out["acc"] = float(np.mean(np.mean(pred_ml == yt.astype(bool), axis=0)))
    return pred_ml


def _multi_metrics(yt: np.ndarray, ys: np.ndarray, task: str, names: list[str], threshold: float,
                   out: dict[str, Any], warnings: list[str]) -> list[int]:
    """Multiclass/multilabel per-class AUC, rates (+ macro means) and support into ``out``.

    Returns the classes/labels whose AUC is defined on the full set (for the bootstrap).
    """
    k = int(ys.shape[1])
    out["n_classes"] = k
    per_auc: dict[str, float | None] = {}
    rates: dict[str, dict[str, float | None]] = {r: {} for r in ("sensitivity", "specificity", "ppv", "npv")}
    support: dict[str, int] = {}
    auc_classes: list[int] = []
    pred = _multi_predictions(yt, ys, task, threshold, out)
    for i, name in enumerate(names):
        if task == "multiclass":
            y_i, s_i, p_i = yt == i, ys[:, i], pred == i
        else:
            y_i, s_i, p_i = yt[:, i].astype(bool), ys[:, i], pred[:, i]
        a = _sklearn_auc(y_i, s_i)
        per_auc[name] = a
        if a is None:
            kind = "class" if task == "multiclass" else "label"
            state = "has no positive cases" if not y_i.any() else "is positive in every case"
            warnings.append(f"AUC for {kind} {name!r} undefined ({kind} {state}); left out of the mean")
        else:
            auc_classes.append(i)
        c = _counts(y_i, p_i)
        for r, v in _rates(c).items():
            rates[r][name] = v
        support[name] = int(np.sum(y_i))
        if task == "multilabel":
            out["confusion_matrix"][name] = [[c["tn"], c["fp"]], [c["fn"], c["tp"]]]
    auc = _mean_defined(list(per_auc.values()))
    if auc is None:
        warnings.append("AUC undefined for every class/label (only one class present); auc is None")
    elif len(auc_classes) < k:
        warnings.append(f"auc is the mean over {len(auc_classes)} of {k} classes/labels with a defined AUC")
    out["auc"] = auc
    out["per_class_auc"] = per_auc
    for r, d in rates.items():
        out[r] = d
        out[f"{r}_macro"] = _mean_defined(list(d.values()))
    out["support"] = support
    return auc_classes


def _bootstrap_cis(yt: np.ndarray, ys: np.ndarray, task: str, threshold: float, auc_defined: bool,
                   auc_classes: list[int], n_bootstrap: int, seed: int, warnings: list[str]) -> dict[str, Any]:
    """95% percentile-bootstrap CIs of ACC and (when defined on the full set) AUC over ``auc_classes``."""
    ci: dict[str, Any] = {"level": 0.95, "auc": None, "acc": None}
    n_valid = {"auc": 0, "acc": 0}
    if n_bootstrap > 0:
        acc_vals = _bootstrap_values(_acc_fn(task, threshold), yt, ys, n_bootstrap, seed)
        n_valid["acc"] = len(acc_vals)
        if acc_vals:
            ci["acc"] = [float(v) for v in np.percentile(acc_vals, [2.5, 97.5])]
        if auc_defined:
            auc_vals = _bootstrap_values(_auc_fn(task, auc_classes), yt, ys, n_bootstrap, seed)
            n_valid["auc"] = len(auc_vals)
            if auc_vals:
                ci["auc"] = [float(v) for v in np.percentile(auc_vals, [2.5, 97.5])]
            else:
                warnings.append("AUC confidence interval undefined: no bootstrap resample had both classes")
            if 0 < len(auc_vals) < 0.9 * n_bootstrap:  # count always in ci["n_valid"]
                warnings.append(
                    f"AUC CI uses {len(auc_vals)} of {n_bootstrap} bootstrap resamples "
                    "(resamples with an undefined AUC were skipped)"
                )
    ci["n_valid"] = n_valid
    return ci


def compute_metrics(
    y_true: Any,
    y_score: Any,
    task_type: str,
    label_names: Sequence[Any] | None = None,
    threshold: float = 0.5,
    n_bootstrap: int = 1000,
    seed: int = 0,
) -> dict[str, Any]:
    """Compute AUC/ACC (MedMNIST definitions), per-class metrics and 95% bootstrap CIs.

    Keys: ``task_type, n, n_classes, label_names, threshold, auc, acc, per_class_auc,
    sensitivity, specificity, ppv, npv, confusion_matrix, support, ci, n_bootstrap, seed,
    warnings`` (+ ``*_macro`` means for multiclass/multilabel). For binary the rates are floats
    and ``per_class_auc`` has the positive class only; for multiclass/multilabel the rates are
    ``{name: value}`` dicts. Undefined quantities are ``None``.
    """
    threshold, n_bootstrap = _check_options(threshold, n_bootstrap)
    yt, ys, task, names = prepare_inputs(y_true, y_score, task_type, label_names)
    n = int(yt.shape[0])
    warnings: list[str] = []
    out: dict[str, Any] = {"task_type": task, "n": n, "threshold": threshold, "label_names": names}
    if task == "binary":
        auc_classes = _binary_metrics(yt, ys, names, threshold, out, warnings)
    else:
        auc_classes = _multi_metrics(yt, ys, task, names, threshold, out, warnings)
    # ---- bootstrap CIs (AUC over the classes that are defined on the full set)
    out["ci"] = _bootstrap_cis(yt, ys, task, threshold, out["auc"] is not None, auc_classes,
                               n_bootstrap, seed, warnings)
    out["n_bootstrap"] = n_bootstrap
    out["seed"] = int(seed)
    out["warnings"] = warnings
    return out
