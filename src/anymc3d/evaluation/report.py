"""Write an evaluation report: ``metrics.json``, ``report.md`` and ``roc.png`` (all atomic)."""
from __future__ import annotations

import io
import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from anymc3d.errors import InputError
from anymc3d.evaluation.metrics import prepare_inputs

__all__ = ["write_report"]

METRICS_NAME = "metrics.json"
REPORT_NAME = "report.md"
ROC_NAME = "roc.png"


# --------------------------------------------------------------------------- helpers
def _atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to a temp file in the same folder, fsync, then ``os.replace`` onto ``path``."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            os.fchmod(fh.fileno(), 0o644)  # mkstemp creates 0600; reports are meant to be shared
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def _jsonable(obj: Any) -> Any:
    """Recursively convert numpy types / Paths / tuples to plain JSON types; NaN/inf -> None."""
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return _jsonable(obj.tolist())
    if isinstance(obj, (bool, np.bool_)):
        return bool(obj)
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        f = float(obj)
        return f if math.isfinite(f) else None
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if obj is None or isinstance(obj, str):
        return obj
    return str(obj)


def _fmt(v: Any, digits: int = 4) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def _fmt_ci(ci: Any) -> str:
    if not ci or any(x is None for x in ci):
        return "n/a"
    return f"[{ci[0]:.4f}, {ci[1]:.4f}]"


def _md(s: Any) -> str:
    """Escape a value for a markdown table cell."""
    return str(s).replace("|", "\\|").replace("\n", " ")


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    lines = ["| " + " | ".join(_md(h) for h in header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_md(c) for c in row) + " |" for row in rows]
    return lines


def _per(metrics: dict, key: str, name: str, binary_pos: str | None) -> Any:
    v = metrics.get(key)
    if isinstance(v, dict):
        return v.get(name)
    if binary_pos is not None and name == binary_pos:
        return v
    return None


# --------------------------------------------------------------------------- ROC plot
def _roc_png(y_true: np.ndarray, y_score: np.ndarray, task: str, names: list[str], title: str) -> bytes:
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # Agg, no pyplot global state
    from matplotlib.figure import Figure
    from sklearn.metrics import roc_auc_score, roc_curve

    if task == "binary":
        curves = [(names[1], y_true.astype(bool), y_score)]
    elif task == "multiclass":
        curves = [(nm, y_true == i, y_score[:, i]) for i, nm in enumerate(names)]
    else:
        curves = [(nm, y_true[:, i].astype(bool), y_score[:, i]) for i, nm in enumerate(names)]

    fig = Figure(figsize=(6.4, 6.0), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    ax.plot([0, 1], [0, 1], linestyle="--", color="0.6", linewidth=1, label="chance")
    skipped = []
    for name, y, s in curves:
        if y.all() or not y.any():
            skipped.append(name)
            continue
        fpr, tpr, _ = roc_curve(y.astype(np.int64), s)
        auc = roc_auc_score(y.astype(np.int64), s)
        label = f"AUC = {auc:.3f}" if task == "binary" else f"{name} (AUC = {auc:.3f})"
        ax.plot(fpr, tpr, linewidth=1.5, label=label)
    if skipped:
        ax.text(0.98, 0.02, "ROC undefined (one class only): " + ", ".join(skipped)[:80],
                transform=ax.transAxes, ha="right", va="bottom", fontsize=7, color="0.3")
    ax.set_xlim(0.0, 1.0)
    ax.set_ylim(0.0, 1.02)
    ax.set_xlabel("False positive rate (1 - specificity)")
    ax.set_ylabel("True positive rate (sensitivity)")
    ax.set_title(title[:80])
    ax.legend(loc="lower right", fontsize=8 if len(curves) <= 8 else 6)
    ax.grid(alpha=0.3)
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


# --------------------------------------------------------------------------- markdown
def _report_md(metrics: dict, title: str, names: list[str], info: dict) -> str:
    task = metrics.get("task_type")
    ci = metrics.get("ci") or {}
    lines = [f"# {title}", ""]
    lines += [
        f"- Task: **{task}**, cases: **{metrics.get('n')}**, classes/labels: {metrics.get('n_classes', len(names))}",
        f"- Threshold: {metrics.get('threshold')} (binary/multilabel predictions are `score > threshold`)",
        f"- CIs: 95% percentile bootstrap over cases, {metrics.get('n_bootstrap')} resamples, seed {metrics.get('seed')}",
        "",
        "## Summary",
        "",
    ]
    lines += _table(
        ["Metric", "Value", "95% CI"],
        [["AUC", _fmt(metrics.get("auc")), _fmt_ci(ci.get("auc"))],
         ["ACC", _fmt(metrics.get("acc")), _fmt_ci(ci.get("acc"))]],
    )
    if task != "binary":
        lines += ["", "Macro means: " + ", ".join(
            f"{r} {_fmt(metrics.get(f'{r}_macro'))}" for r in ("sensitivity", "specificity", "ppv", "npv")
        )]
    lines += ["", "## Per-class metrics", ""]
    pos = names[1] if task == "binary" and len(names) == 2 else None
    rows_names = [pos] if pos is not None else names
    support = metrics.get("support") or {}
    rows = []
    for nm in rows_names:
        rows.append([
            nm,
            _fmt((metrics.get("per_class_auc") or {}).get(nm)),
            _fmt(_per(metrics, "sensitivity", nm, pos)),
            _fmt(_per(metrics, "specificity", nm, pos)),
            _fmt(_per(metrics, "ppv", nm, pos)),
            _fmt(_per(metrics, "npv", nm, pos)),
            _fmt(support.get(nm)),
        ])
    lines += _table(["Class", "AUC", "Sensitivity", "Specificity", "PPV", "NPV", "Positives"], rows)

    cm = metrics.get("confusion_matrix")
    if cm is not None:
        lines += ["", "## Confusion matrix", ""]
        if task == "multilabel" and isinstance(cm, dict):
            lines.append("Per label, at the threshold: `[[TN, FP], [FN, TP]]`.")
            lines.append("")
            lines += _table(["Label", "TN", "FP", "FN", "TP"],
                            [[nm, m[0][0], m[0][1], m[1][0], m[1][1]] for nm, m in cm.items()])
        else:
            lbls = names if len(names) == len(cm) else [str(i) for i in range(len(cm))]
            lines.append("Rows: true class, columns: predicted class.")
            lines.append("")
            lines += _table(["true \\ pred", *lbls], [[lbls[i], *row] for i, row in enumerate(cm)])

    lines += _trust_md(metrics)
    warns = metrics.get("warnings") or []
    if warns:
        lines += ["", "## Warnings", ""] + [f"- {w}" for w in warns]
    if info:
        lines += ["", "## Run info", ""]
        for k, v in info.items():
            val = v if isinstance(v, str) else json.dumps(v)
            lines.append(f"- **{_md(k)}**: {_md(val)}")
    lines += ["", "## ROC curve", "", f"![ROC curve]({ROC_NAME})", f"([{ROC_NAME}]({ROC_NAME}))", ""]
    return "\n".join(lines)


def _trust_md(metrics: dict) -> list[str]:
    """Calibration, conformal sets, OOD flags and operating points (``anymc3d.plugins.trust``), when measured."""
    lines: list[str] = []
    note = metrics.get("trust_note")
    if note:
        lines += ["", "## Calibration, OOD and conformal sets", "", f"- {note}"]
    cal = metrics.get("calibration")
    if cal:
        lines += ["", "## Calibration", "",
                  f"Equal-mass bins ({cal['before'].get('bins')}); the calibration stored with the plugin: "
                  f"**{cal.get('method') or 'none'}** (fitted on the validation split).", ""]
        rows = [["raw (before)", _fmt(cal["before"].get("ece")), _fmt(cal["before"].get("brier"))]]
        if cal.get("after"):
            rows.append([f"calibrated ({cal.get('method')})", _fmt(cal["after"].get("ece")), _fmt(cal["after"].get("brier"))])
        lines += _table(["Probabilities", "ECE", "Brier"], rows)
        per_b = cal["before"].get("per_class_ece") or {}
        per_a = (cal.get("after") or {}).get("per_class_ece") or {}
        lines += [""] + _table(["Class", "ECE before", "ECE after"], [[k, _fmt(v), _fmt(per_a.get(k))] for k, v in per_b.items()])
        lines += ["", "![reliability diagram](calibration.png)"]
    conf = metrics.get("conformal")
    if conf:
        lines += ["", "## Conformal prediction sets", "",
                  f"Split conformal (LAC score) on {conf[0]['n_calibration']} validation cases."
                  " Empirical coverage and mean set size on this split:", ""]
        lines += _table(["Nominal coverage", "Empirical coverage", "Mean set size", "Empty sets", "n"],
                        [[_fmt(c["coverage"], 2), _fmt(c["empirical_coverage"]), _fmt(c["mean_set_size"], 3),
                          c["empty_sets"], c["n"]] for c in conf])
    o = metrics.get("ood")
    if o:
        lines += ["", "## Out-of-distribution flag", "",
                  f"- {o['n_flagged']} of {o['n']} cases flagged ({_fmt(o['flag_rate'])}) at the stored threshold "
                  f"{_fmt(o['threshold'])} ({o['percentile']:g}th percentile of the validation scores); "
                  f"median score {_fmt(o['median_score'])}"]
    ops = metrics.get("operating_points")
    if ops:
        lines += ["", "## Operating points", "",
                  "Thresholds chosen on the validation split; sensitivity / specificity reached on this split "
                  "(95% Wilson intervals).", ""]
        lines += _table(["Operating point", "Threshold (raw)", "Sensitivity", "95% CI", "Specificity", "95% CI"],
                        [[op["policy"] + (" (stored)" if op.get("stored") else ""), _fmt(op["threshold"]),
                          _fmt(op["sensitivity"]), _fmt_ci(op["sensitivity_ci"]), _fmt(op["specificity"]),
                          _fmt_ci(op["specificity_ci"])] for op in ops])
    return lines


# --------------------------------------------------------------------------- entry point
def write_report(
    metrics: dict,
    y_true: Any,
    y_score: Any,
    out_dir: str | os.PathLike,
    title: str,
    label_names: Sequence[Any] | None = None,
    extra: dict | None = None,
) -> dict[str, Path]:
    """Write ``metrics.json``, ``report.md`` and ``roc.png`` into ``out_dir`` (created if needed).

    ``metrics`` is the dict from :func:`compute_metrics`; ``y_true``/``y_score`` are the same
    arrays (used for the ROC curves). ``extra`` (run info: model, checkpoint, data paths...) is
    stored under ``info`` in metrics.json, together with ``title``. Every file is written to a
    temp name in ``out_dir`` and moved into place with ``os.replace``.
    Returns ``{"metrics": Path, "report": Path, "roc": Path}``.
    """
    if not isinstance(metrics, dict) or "task_type" not in metrics:
        raise InputError("metrics: expected the dict returned by compute_metrics (missing 'task_type')")
    if extra is not None and not isinstance(extra, dict):
        raise InputError(f"extra: expected a dict or None, got {type(extra).__name__}")
    if label_names is None:
        label_names = metrics.get("label_names")
    yt, ys, task, names = prepare_inputs(y_true, y_score, metrics["task_type"], label_names)
    if metrics.get("n") is not None and int(metrics["n"]) != yt.shape[0]:
        raise InputError(f"y_true: has {yt.shape[0]} cases but metrics were computed on n={metrics['n']}")

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"metrics": out / METRICS_NAME, "report": out / REPORT_NAME, "roc": out / ROC_NAME}

    info = {"title": title, **(extra or {})}
    payload = _jsonable({**metrics, "info": {**(metrics.get("info") or {}), **info}})
    text_json = json.dumps(payload, indent=2, allow_nan=False) + "\n"
    text_md = _report_md(_jsonable(metrics), title, names, _jsonable(info))
    png = _roc_png(yt, ys, task, names, title)

    _atomic_write_bytes(paths["roc"], png)
    _atomic_write_bytes(paths["report"], text_md.encode("utf-8"))
    _atomic_write_bytes(paths["metrics"], text_json.encode("utf-8"))
    return paths
