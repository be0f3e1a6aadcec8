"""`anymc3d evaluate`: a plugin on a labelled split -> metrics.json, report.md, roc.png, calibration.png,
predictions.csv (calibrated and raw probabilities, OOD score). Besides AUC/ACC: ECE and Brier before
and after the stored calibration, conformal coverage and mean set size, the OOD flag rate, and
sensitivity / specificity at the stored and the asked operating points (anymc3d.plugins.trust)."""
from __future__ import annotations

import csv
import time
from pathlib import Path

import numpy as np

from ..data import load_data
from ..errors import InputError
from ..io import atomic_write
from .metrics import compute_metrics
from .ood import predict_with_embeddings
from .report import write_report


def metric_scores(probs: np.ndarray, task_type: str) -> np.ndarray:
    """The score array the metrics take: the positive-class column for binary tasks."""
    return probs[:, 0] if task_type == "binary" else probs


#: coverage levels every evaluation reports (plus the predictor's own)
COVERAGE_LEVELS = (0.8, 0.9, 0.95)


def wilson_ci(k: int, n: int, z: float = 1.959964) -> list[float] | None:
    """95 % Wilson score interval of a proportion k / n."""
    if n == 0:
        return None
    p = k / n
    den = 1 + z * z / n
    c = (p + z * z / (2 * n)) / den
    h = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / den
    return [float(max(0.0, c - h)), float(min(1.0, c + h))]


def operating_point(policy: str, threshold: float, y, score, stored: bool = False) -> dict:
    """Sensitivity and specificity (with Wilson CIs) of ``score > threshold`` on labelled cases."""
    y = np.asarray(y).astype(int).ravel()
    pred = np.asarray(score).ravel() > threshold
    tp, fn = int((pred & (y == 1)).sum()), int((~pred & (y == 1)).sum())
    tn, fp = int((~pred & (y == 0)).sum()), int((pred & (y == 0)).sum())
    return {"policy": str(policy), "threshold": float(threshold), "stored": stored,
            "sensitivity": tp / (tp + fn) if tp + fn else None, "sensitivity_ci": wilson_ci(tp, tp + fn),
            "specificity": tn / (tn + fp) if tn + fp else None, "specificity_ci": wilson_ci(tn, tn + fp)}


def trust_metrics(predictor, probs: np.ndarray, emb: dict, y, coverages=(), operating_points=()) -> dict:
    """Calibration (before/after), conformal coverage and set size, OOD flag rate and operating points
    of one split; empty with a one-line ``trust_note`` for a plugin without stored trust fields."""
    from . import calibration as cal, conformal, ood
    from .threshold import choose_threshold

    spec, trust = predictor.spec, predictor.trust
    out: dict = {}
    before = cal.calibration_summary(spec.task_type, y, probs, spec.label_names)
    if trust is None:
        return {"calibration": {"method": None, "before": before, "after": None}, "trust_note": cal.OLD_PLUGIN_NOTE}
    calibrated = trust.calibrate(probs)
    out["calibration"] = {"method": (trust.calibration or {}).get("method"), "before": before,
                          "after": cal.calibration_summary(spec.task_type, y, calibrated, spec.label_names)
                          if trust.calibration else None}
    if trust.has_conformal:
        cp = cal.class_probabilities(spec.task_type, calibrated)
        levels = sorted({*COVERAGE_LEVELS, *[conformal.check_coverage(c) for c in coverages]})
        out["conformal"] = [conformal.coverage_and_size(cp, y, trust.conformal_scores(), c) for c in levels]
    if trust.has_ood:
        sc = trust.ood_scores(emb)
        flags = sc > trust.ood["threshold"]
        out["ood"] = {"n": int(len(sc)), "n_flagged": int(flags.sum()), "flag_rate": float(flags.mean()),
                      "threshold": float(trust.ood["threshold"]), "percentile": float(trust.ood["percentile"]),
                      "median_score": float(np.nanmedian(sc)), "method": trust.ood["method"]}
        out["_ood_scores"] = sc
    if spec.task_type == "binary":
        score = np.asarray(probs)[:, 0]
        stored = (trust.operating_point or {}).get("policy", "stored")
        ops = [operating_point(stored, spec.threshold, y, score, stored=True)]
        for op in operating_points:
            if trust.val_probs is None:
                break
            thr = choose_threshold(trust.val_labels, trust.val_probs[:, 0], "binary", op)
            ops.append(operating_point(op, thr, y, score))
        out["operating_points"] = ops
    return out


def evaluate_plugin(predictor, data: str | Path, split: str = "test", out: str | Path = "eval",
                    n_bootstrap: int = 1000, data_kwargs: dict | None = None,
                    coverages: tuple = (), operating_points: tuple = ()) -> dict:
    """``coverages``: conformal levels reported besides 0.8, 0.9, 0.95; ``operating_points``: thresholds
    (``sens=0.9``, ``spec=0.95``, a policy or a number) chosen on the stored validation scores, whose
    sensitivity and specificity are reported beside the stored operating point's."""
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
    probs, _, cap = predict_with_embeddings(predictor.runtime, cases, 4)  # the loader's workers read and preprocess
    dt = time.time() - t0
    y = task.labels(cases)
    metrics = compute_metrics(y, metric_scores(probs, spec.task_type), spec.task_type, spec.label_names,
                              threshold=spec.threshold, n_bootstrap=n_bootstrap)
    if spec.threshold != 0.5:  # MedMNIST's ACC thresholds at 0.5; keep it for comparison with published numbers
        metrics["acc_at_0.5"] = compute_metrics(y, metric_scores(probs, spec.task_type), spec.task_type,
                                                spec.label_names, n_bootstrap=0)["acc"]
    trust = trust_metrics(predictor, probs, cap.take("task_query"), y, coverages, operating_points)
    ood_scores = trust.pop("_ood_scores", None)
    metrics.update(trust)
    out = Path(out)
    calibrated = predictor.trust.calibrate(probs) if predictor.trust is not None else probs
    if spec.task_type != "multilabel":
        from .calibration import reliability_diagram

        curves = {"raw": probs, **({f"calibrated ({trust['calibration']['method']})": calibrated}
                                   if trust["calibration"].get("after") else {})}
        reliability_diagram(spec.task_type, y, curves, out / "calibration.png", title=f"{spec.task} [{split}]")
    paths = write_report(metrics, y, metric_scores(probs, spec.task_type), out,
                         title=f"{spec.task} on {Path(str(data)).name} [{split}]", label_names=spec.label_names,
                         extra={"plugin": predictor.source, "data": str(data), "split": split,
                                "backbone": spec.backbone, "seconds_per_volume": dt / len(cases)})
    with atomic_write(out / "predictions.csv") as tmp:
        with open(tmp, "w", newline="", encoding="utf-8") as fh:
            w = csv.writer(fh)
            names = spec.label_names[1:] if spec.task_type == "binary" else spec.label_names
            w.writerow(["id", "label", *[f"p_{n}" for n in names], *[f"raw_p_{n}" for n in names], "ood_score"])
            for i, (c, yy, p) in enumerate(zip(cases, y, probs)):
                w.writerow([c.id, yy.tolist() if isinstance(yy, np.ndarray) else int(yy),
                            *[f"{v:.6f}" for v in calibrated[i]], *[f"{v:.6f}" for v in p],
                            "" if ood_scores is None else f"{ood_scores[i]:.6g}"])
    metrics["paths"] = {k: str(v) for k, v in paths.items()}
    if (out / "calibration.png").is_file():
        metrics["paths"]["calibration"] = str(out / "calibration.png")
    return metrics


def trust_lines(m: dict) -> list[str]:
    """The printed summary of :func:`trust_metrics`: ECE, coverage, OOD flag rate, operating points."""
    lines = []
    if m.get("trust_note"):
        lines.append(f"note: {m['trust_note']}")
    cal = m.get("calibration") or {}
    if cal.get("before"):
        after = cal.get("after")
        lines.append(f"calibration: ECE {cal['before']['ece']:.4f} raw" + (
            f" -> {after['ece']:.4f} {cal['method']}" if after else "") + f"; Brier {cal['before']['brier']:.4f}"
            + (f" -> {after['brier']:.4f}" if after else ""))
    if m.get("conformal"):
        lines.append("conformal sets: " + ", ".join(
            f"{c['coverage']:g}: coverage {c['empirical_coverage']:.3f}, mean size {c['mean_set_size']:.2f}"
            for c in m["conformal"]))
    if m.get("ood"):
        o = m["ood"]
        lines.append(f"OOD: {o['n_flagged']} of {o['n']} flagged ({100 * o['flag_rate']:.1f} %) at threshold "
                     f"{o['threshold']:.3g}")
    for op in m.get("operating_points") or []:
        lines.append(f"operating point {op['policy']}{' (stored)' if op['stored'] else ''}: threshold "
                     f"{op['threshold']:.3f}, sensitivity {_f(op['sensitivity'])} {_ci(op['sensitivity_ci'])}, "
                     f"specificity {_f(op['specificity'])} {_ci(op['specificity_ci'])}")
    return lines


def _f(v) -> str:
    return "n/a" if v is None else f"{v:.3f}"


def _ci(ci) -> str:
    return "" if not ci else f"[{ci[0]:.3f}, {ci[1]:.3f}]"
