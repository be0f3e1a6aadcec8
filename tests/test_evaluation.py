"""Tests for anymc3d.evaluation (metrics + report)."""
from __future__ import annotations

import json

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from anymc3d.errors import InputError
from anymc3d.evaluation import bootstrap_ci, compute_metrics, write_report
from anymc3d.evaluation.metrics import _fast_auc

# Hand example: positives score 0.35, 0.8, 0.9; negatives 0.1, 0.55, 0.6.
# Pairs pos > neg: 1 + 3 + 3 = 7 of 9 -> AUC 7/9.
# Predictions at 0.5: [0, 1, 0, 1, 1, 1] -> TP 2, FP 2, TN 1, FN 1 -> ACC 3/6.
Y_BIN = np.array([0, 0, 1, 1, 0, 1])
S_BIN = np.array([0.1, 0.55, 0.35, 0.8, 0.6, 0.9])


def _multiclass_data(n=60, k=4, seed=1):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, k, size=n)
    y[:k] = np.arange(k)  # every class present
    logits = rng.normal(size=(n, k))
    logits[np.arange(n), y] += 1.0
    p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    return y, p


def _multilabel_data(n=50, k=3, seed=2):
    rng = np.random.default_rng(seed)
    y = (rng.random((n, k)) < 0.4).astype(int)
    s = np.clip(0.5 * y + 0.6 * rng.random((n, k)), 0, 1)
    return y, s


def _assert_plain_json(obj):
    """Everything must be a plain python type (no numpy scalars)."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            assert isinstance(k, str)
            _assert_plain_json(v)
    elif isinstance(obj, list):
        for v in obj:
            _assert_plain_json(v)
    else:
        assert obj is None or type(obj) in (int, float, str, bool), (obj, type(obj))


# ----------------------------------------------------------------- binary
def test_binary_hand_computed():
    m = compute_metrics(Y_BIN, S_BIN, "binary", label_names=["neg", "pos"], n_bootstrap=200)
    assert m["auc"] == pytest.approx(7 / 9)
    assert m["acc"] == pytest.approx(0.5)
    assert m["sensitivity"] == pytest.approx(2 / 3)
    assert m["specificity"] == pytest.approx(1 / 3)
    assert m["ppv"] == pytest.approx(0.5)
    assert m["npv"] == pytest.approx(0.5)
    assert m["confusion_matrix"] == [[1, 2], [1, 2]]  # [[TN, FP], [FN, TP]]
    assert m["per_class_auc"] == {"pos": pytest.approx(7 / 9)}
    assert m["n"] == 6 and m["task_type"] == "binary" and m["threshold"] == 0.5
    assert m["warnings"] == []
    _assert_plain_json(m)
    json.dumps(m, allow_nan=False)


def test_binary_two_column_scores_and_strict_threshold():
    two = np.stack([1 - S_BIN, S_BIN], axis=1)
    assert compute_metrics(Y_BIN, two, "binary", n_bootstrap=0)["auc"] == pytest.approx(7 / 9)
    # MedMNIST predicts positive for score > threshold (strict)
    m = compute_metrics([0, 1], [0.5, 0.7], "binary", n_bootstrap=0)
    assert m["acc"] == 1.0
    # MedMNIST-style (N,1) labels accepted; task alias accepted
    m2 = compute_metrics(Y_BIN[:, None], S_BIN, "binary-class", n_bootstrap=0)
    assert m2["auc"] == pytest.approx(7 / 9)


def test_threshold_changes_acc_not_auc():
    m = compute_metrics(Y_BIN, S_BIN, "binary", threshold=0.7, n_bootstrap=0)
    assert m["auc"] == pytest.approx(7 / 9)
    # preds at 0.7: [0,0,0,1,0,1] -> correct 5/6
    assert m["acc"] == pytest.approx(5 / 6)
    assert m["threshold"] == 0.7


# ----------------------------------------------------------------- multiclass
def test_multiclass_auc_is_mean_of_ovr():
    y, p = _multiclass_data()
    m = compute_metrics(y, p, "multiclass", label_names=["a", "b", "c", "d"], n_bootstrap=100)
    ovr = [roc_auc_score((y == i).astype(int), p[:, i]) for i in range(4)]
    assert m["auc"] == pytest.approx(float(np.mean(ovr)))
    assert list(m["per_class_auc"]) == ["a", "b", "c", "d"]
    for i, nm in enumerate("abcd"):
        assert m["per_class_auc"][nm] == pytest.approx(ovr[i])
    assert m["acc"] == pytest.approx(float(np.mean(p.argmax(1) == y)))
    cm = np.array(m["confusion_matrix"])
    assert cm.shape == (4, 4) and cm.sum() == len(y)
    assert np.trace(cm) == int(np.sum(p.argmax(1) == y))
    # per-class recall / specificity from the confusion matrix
    for i, nm in enumerate("abcd"):
        tp = cm[i, i]
        fn = cm[i].sum() - tp
        fp = cm[:, i].sum() - tp
        tn = cm.sum() - tp - fn - fp
        assert m["sensitivity"][nm] == pytest.approx(tp / (tp + fn))
        assert m["specificity"][nm] == pytest.approx(tn / (tn + fp))
    assert m["sensitivity_macro"] == pytest.approx(np.mean(list(m["sensitivity"].values())))
    _assert_plain_json(m)


def test_multiclass_missing_class_is_skipped_with_warning():
    y, p = _multiclass_data()
    y = np.where(y == 3, 0, y)  # class 3 never occurs
    m = compute_metrics(y, p, "multiclass", n_bootstrap=50)
    assert m["per_class_auc"]["3"] is None
    expected = np.mean([roc_auc_score((y == i).astype(int), p[:, i]) for i in range(3)])
    assert m["auc"] == pytest.approx(expected)
    assert any("'3'" in w for w in m["warnings"])


# ----------------------------------------------------------------- multilabel
def test_multilabel_macro_and_acc():
    y, s = _multilabel_data()
    m = compute_metrics(y, s, "multilabel", n_bootstrap=100)
    per = [roc_auc_score(y[:, i], s[:, i]) for i in range(3)]
    assert m["auc"] == pytest.approx(float(np.mean(per)))
    acc = np.mean([np.mean((s[:, i] > 0.5) == y[:, i]) for i in range(3)])
    assert m["acc"] == pytest.approx(float(acc))
    for i in range(3):
        yi, pi = y[:, i] == 1, s[:, i] > 0.5
        assert m["sensitivity"][str(i)] == pytest.approx(np.sum(yi & pi) / np.sum(yi))
        assert m["specificity"][str(i)] == pytest.approx(np.sum(~yi & ~pi) / np.sum(~yi))
    assert set(m["confusion_matrix"]) == {"0", "1", "2"}
    _assert_plain_json(m)


def test_multilabel_single_class_label_skipped():
    y, s = _multilabel_data()
    y[:, 1] = 0
    m = compute_metrics(y, s, "multilabel", label_names=["x", "y", "z"], n_bootstrap=50)
    assert m["per_class_auc"]["y"] is None
    assert m["auc"] == pytest.approx(np.mean([roc_auc_score(y[:, i], s[:, i]) for i in (0, 2)]))
    assert any("'y'" in w for w in m["warnings"])


# ----------------------------------------------------------------- CI / bootstrap
def test_ci_contains_point_and_is_deterministic():
    y, p = _multiclass_data(n=80)
    a = compute_metrics(y, p, "multiclass", n_bootstrap=300, seed=7)
    b = compute_metrics(y, p, "multiclass", n_bootstrap=300, seed=7)
    c = compute_metrics(y, p, "multiclass", n_bootstrap=300, seed=8)
    assert a["ci"] == b["ci"]
    assert a["ci"]["auc"] != c["ci"]["auc"]
    for key in ("auc", "acc"):
        lo, hi = a["ci"][key]
        assert lo <= a[key] <= hi
        assert 0.0 <= lo < hi <= 1.0
    assert a["n_bootstrap"] == 300


def test_binary_ci_skips_undefined_resamples():
    m = compute_metrics(Y_BIN, S_BIN, "binary", n_bootstrap=500, seed=0)
    lo, hi = m["ci"]["auc"]
    assert lo <= m["auc"] <= hi
    # with 6 cases some resamples contain one class only; they are skipped, not counted
    assert 0 < m["ci"]["n_valid"]["auc"] < 500
    assert m["ci"]["n_valid"]["acc"] == 500


def test_bootstrap_ci_reusable():
    def fn(yt, ys):
        return float(np.mean((ys > 0.5) == yt))

    r1 = bootstrap_ci(fn, Y_BIN, S_BIN, n=200, seed=3)
    r2 = bootstrap_ci(fn, Y_BIN, S_BIN, n=200, seed=3)
    assert r1 == r2 and isinstance(r1[0], float) and r1[0] <= r1[1]
    # metric always undefined -> None
    assert bootstrap_ci(lambda yt, ys: None, Y_BIN, S_BIN, n=20, seed=0) is None


def test_fast_auc_matches_sklearn_with_ties():
    rng = np.random.default_rng(0)
    for _ in range(20):
        y = rng.integers(0, 2, 40)
        s = rng.integers(0, 5, 40) / 4.0  # many ties
        if y.min() == y.max():
            continue
        assert _fast_auc(y, s) == pytest.approx(roc_auc_score(y, s))


# ----------------------------------------------------------------- undefined / errors
def test_single_class_gives_none_and_warning():
    m = compute_metrics([1, 1, 1, 1], [0.2, 0.6, 0.7, 0.9], "binary", n_bootstrap=50)
    assert m["auc"] is None
    assert m["ci"]["auc"] is None
    assert m["warnings"] and "AUC undefined" in m["warnings"][0]
    assert m["acc"] == pytest.approx(0.75)
    assert m["specificity"] is None  # no negatives: undefined, not 0
    json.dumps(m, allow_nan=False)

    m2 = compute_metrics([0, 0, 0], np.full((3, 3), 1 / 3), "multiclass", n_bootstrap=10)
    assert m2["auc"] is None and m2["warnings"]


@pytest.mark.parametrize(
    "y_true, y_score, task",
    [
        ([0, 1, 1], [0.1, 0.9], "binary"),  # length mismatch
        ([0, 1], np.zeros((2, 3)), "binary"),  # 3 columns for binary
        ([0, 2], [0.1, 0.9], "binary"),  # non-binary label
        ([0, 1, 2], np.zeros((3,)), "multiclass"),  # 1-D scores
        ([0, 1, 3], np.zeros((3, 3)), "multiclass"),  # label out of range
        (np.zeros((4, 2)), np.zeros((4, 3)), "multilabel"),  # shape mismatch
        (np.zeros(4), np.zeros((4, 3)), "multilabel"),  # 1-D labels
        ([0, 1], [0.1, np.nan], "binary"),  # NaN
        ([], [], "binary"),  # empty
        ([0, 1], [0.1, 0.9], "regression"),  # unknown task
    ],
)
def test_bad_inputs_raise_input_error(y_true, y_score, task):
    with pytest.raises(InputError):
        compute_metrics(y_true, y_score, task, n_bootstrap=0)


def test_label_names_length_checked():
    with pytest.raises(InputError, match="label_names"):
        compute_metrics(Y_BIN, S_BIN, "binary", label_names=["only"], n_bootstrap=0)


# ----------------------------------------------------------------- report
@pytest.mark.parametrize("task", ["binary", "multiclass", "multilabel"])
def test_write_report(tmp_path, task):
    if task == "binary":
        y, s, names = Y_BIN, S_BIN, ["benign", "malignant"]
    elif task == "multiclass":
        y, s = _multiclass_data()
        names = ["a", "b", "c", "d"]
    else:
        y, s = _multilabel_data()
        names = ["l0", "l1", "l2"]
    m = compute_metrics(y, s, task, label_names=names, n_bootstrap=50)
    out = tmp_path / "eval"
    paths = write_report(m, y, s, out, f"Test {task}", extra={"model": "demo", "ckpt": tmp_path / "x.pt",
                                                              "lr": np.float32(0.001)})
    assert set(paths) == {"metrics", "report", "roc"}
    assert sorted(p.name for p in out.iterdir()) == ["metrics.json", "report.md", "roc.png"]
    for p in paths.values():
        assert p.exists() and p.parent == out

    data = json.loads(paths["metrics"].read_text())
    for key in ("auc", "acc", "n"):
        assert key in data
    assert data["auc"] == pytest.approx(m["auc"])
    assert data["n"] == len(y)
    assert data["info"]["model"] == "demo" and data["info"]["title"] == f"Test {task}"
    assert data["info"]["ckpt"].endswith("x.pt")

    assert paths["roc"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    md = paths["report"].read_text()
    assert f"# Test {task}" in md and "roc.png" in md and "AUC" in md and "ACC" in md
    assert "Confusion matrix" in md
    for nm in (names[1:] if task == "binary" else names):
        assert nm in md


def test_write_report_undefined_auc_and_overwrite(tmp_path):
    y, s = [1, 1, 1], [0.2, 0.6, 0.9]
    m = compute_metrics(y, s, "binary", n_bootstrap=10)
    write_report(m, y, s, tmp_path, "first")
    paths = write_report(m, y, s, tmp_path, "second")  # overwrite in place
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.json", "report.md", "roc.png"]
    data = json.loads(paths["metrics"].read_text())
    assert data["auc"] is None and data["warnings"]
    assert data["info"]["title"] == "second"
    assert "n/a" in paths["report"].read_text()
    assert paths["roc"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_write_report_rejects_mismatched_arrays(tmp_path):
    m = compute_metrics(Y_BIN, S_BIN, "binary", n_bootstrap=0)
    with pytest.raises(InputError):
        write_report(m, Y_BIN[:4], S_BIN[:4], tmp_path, "bad")
    with pytest.raises(InputError):
        write_report({"auc": 0.5}, Y_BIN, S_BIN, tmp_path, "bad")
    assert list(tmp_path.iterdir()) == []
