"""Issue 30: calibrated probabilities, the out-of-distribution flag, conformal prediction sets and
operating points in every answer (``anymc3d.plugins.trust``, ``anymc3d.evaluation.{calibration,ood,conformal}``)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from conftest import AFFINE, BLOB_A, build_binary_dataset, make_volume, random_plugin, write_nifti

from anymc3d.cli import main
from anymc3d.data.cases import Case
from anymc3d.evaluation import calibration as cal
from anymc3d.evaluation import conformal, ood
from anymc3d.evaluation.threshold import choose_threshold, parse_policy
from anymc3d.plugins import load_plugin, save_plugin
from anymc3d.plugins.trust import OLD_PLUGIN_NOTE, fit_trust
from anymc3d.predict import Predictor, load


# ------------------------------------------------------------------------------------------ helpers
def attach_trust(plugin_dir: Path, train_images: list, val_images: list, val_labels, weights: str | None = None) -> None:
    """Fit and store calibration / OOD reference / conformal scores for an existing plugin folder, as
    training does at its end (used by the viewer test on a store's plugin)."""
    model = load_plugin(plugin_dir, weights=weights)
    pred = Predictor(model, source=str(plugin_dir), device="cpu")
    cases = lambda imgs, tag: [Case(id=f"{tag}{i}", images={"image": p}) for i, p in enumerate(imgs)]  # noqa: E731
    model.trust = fit_trust(model, pred.runtime, cases(train_images, "t"), cases(val_images, "v"),
                            np.asarray(val_labels), log=lambda *a, **k: None)
    save_plugin(model, plugin_dir)


def other_generator(rng: np.random.Generator, shape=(12, 12, 10)) -> np.ndarray:
    """A volume of another generator: smooth stripes over the whole field of view, no blob, no noise floor."""
    x, y, z = np.meshgrid(*[np.arange(s) for s in shape], indexing="ij")
    f = rng.uniform(0.6, 1.2)
    return (0.5 + 0.5 * np.sin(f * x + rng.uniform(0, 6)) * np.cos(f * y)).astype(np.float32) + 0.02 * z


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    """A plugin really trained (2 epochs, efficientnet_lite0, 32-pixel slices) on 40 noise + cube volumes."""
    from anymc3d.training.run import PreprocessOptions, train_plugin
    from anymc3d.training.trainer import TrainConfig

    root = tmp_path_factory.mktemp("trust")
    manifest = build_binary_dataset(root / "data", n=40, seed=3)
    m = train_plugin(manifest, "efficientnet_lite0", root / "plugin", preprocess=PreprocessOptions(size=32),
                     config=TrainConfig(epochs=2, batch_size=4, progress=False), log=lambda *a, **k: None)
    return {"root": root, "manifest": manifest, "plugin": root / "plugin", "metrics": m}


# ------------------------------------------------------------------------------------------ OOD
def test_ood_score_higher_for_another_generator(toy, tmp_path):
    """Held-out volumes of the training generator score low; volumes of another generator score higher
    (AUROC >= 0.9) and are flagged."""
    pred = load(toy["plugin"], device="cpu")
    assert pred.trust is not None and pred.trust.has_ood
    held = sorted((toy["root"] / "data" / "images").glob("case3*.nii.gz"))  # cases 30..39: the test split
    rng = np.random.default_rng(7)
    other = [write_nifti(tmp_path / f"o{i}.nii.gz", other_generator(rng)) for i in range(10)]
    s_in = [pred.predict(p)["ood"]["score"] for p in held]
    s_out = [pred.predict(p)["ood"]["score"] for p in other]
    auc = roc_auc_score([0] * len(s_in) + [1] * len(s_out), s_in + s_out)
    assert auc >= 0.9, (s_in, s_out)
    res = [pred.predict(p) for p in other]
    assert sum(r["ood"]["flag"] for r in res) >= 8
    flagged = next(r for r in res if r["ood"]["flag"])
    assert any(w.startswith("out of distribution") for w in flagged["warnings"])
    assert 0.0 <= flagged["ood"]["percentile"] <= 100.0


def test_every_answer_carries_calibration_set_and_ood(toy, tmp_path, capsys):
    pred = load(toy["plugin"], device="cpu")
    img = toy["root"] / "data" / "images" / "case31.nii.gz"
    r = pred.predict(img)
    spec = pred.spec
    raw_p = r["raw_probabilities"][spec.label_names[1]]
    p = r["probabilities"][spec.label_names[1]]
    c = pred.trust.calibration
    assert r["calibration"] == "platt" and c["method"] == "platt"
    assert p == pytest.approx(float(cal.sigmoid(c["a"] + c["b"] * cal.logit(raw_p))), abs=1e-9)
    # the threshold is on the calibrated scale: the decision is the one the raw threshold makes
    assert r["raw_threshold"] == spec.threshold
    assert (p > r["threshold"]) == (raw_p > spec.threshold)
    assert r["prediction_set"]["coverage"] == 0.9 and set(r["prediction_set"]["labels"]) <= set(spec.label_names)
    assert set(r["ood"]) == {"score", "percentile", "flag", "threshold"}
    # the CLI: --coverage, the printed line shows decision, threshold, set and OOD; a flagged case warns
    far = write_nifti(tmp_path / "far.nii.gz", other_generator(np.random.default_rng(1)) * 50)
    rc = main(["predict", str(toy["plugin"]), str(img), str(far), "--out", str(tmp_path / "pr"), "--coverage", "0.8",
               "--device", "cpu"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "threshold" in out and "set {" in out and "at 80%" in out
    js = json.loads((tmp_path / "pr" / "far.json").read_text())
    assert js["prediction_set"]["coverage"] == 0.8 and "raw_probabilities" in js
    assert js["ood"]["flag"] and "warning: far: out of distribution" in out
    header = (tmp_path / "pr" / "predictions.csv").read_text().splitlines()[0]
    assert header.endswith("prediction_set,ood_score,ood_flag")


def test_plugin_growth_and_info(toy, capsys):
    """The stored reference stays far below 1 MB; ``plugins info`` shows calibration and OOD reference."""
    from anymc3d.plugins.file import load_tensors

    tensors = load_tensors(toy["plugin"] / "plugin.safetensors")
    trust_bytes = sum(v.numel() * v.element_size() for k, v in tensors.items() if k.startswith("trust."))
    assert 0 < trust_bytes < 1_000_000
    store = toy["root"] / "store"
    assert main(["plugins", "add", str(toy["plugin"]), "--store", str(store), "--name", "toy"]) == 0
    assert main(["plugins", "info", "toy", "--store", str(store)]) == 0
    out = capsys.readouterr().out
    assert "calibration platt" in out and "knn_cosine on task_query" in out and "conformal   lac" in out


# ------------------------------------------------------------------------------------------ old plugins
def test_old_plugin_loads_and_answers_with_nulls(tmp_path, positive_volume, capsys):
    from anymc3d.backbones import create_backbone

    bb = create_backbone("efficientnet_lite0", weights="random", input_size=32)
    old = random_plugin(bb, tmp_path, "old", seed=1, size=32)  # written like every plugin before issue 30
    assert "trust" not in json.loads((old / "plugin.json").read_text()) or \
        json.loads((old / "plugin.json").read_text())["trust"] is None
    pred = load(old, weights="random", device="cpu")
    assert pred.trust is None
    r = pred.predict(positive_volume)
    assert r["calibration"] is None and r["ood"] is None and r["prediction_set"] is None
    assert r["trust_note"] == OLD_PLUGIN_NOTE and "\n" not in OLD_PLUGIN_NOTE
    assert r["raw_probabilities"] == r["probabilities"]
    # and from the CLI: the note once, then the usual line
    rc = main(["predict", str(old), str(positive_volume), "--out", str(tmp_path / "p"), "--weights", "random",
               "--device", "cpu"])
    out = capsys.readouterr().out
    assert rc == 0 and out.count("note: " + OLD_PLUGIN_NOTE) == 1
    # a store: plugins info shows nulls with the note; predict --plugins answers with nulls
    store = tmp_path / "store"
    from anymc3d.store import PluginStore

    PluginStore(store).add(old)
    assert main(["plugins", "info", "old", "--store", str(store), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["trust"]["calibration"] is None and info["trust"]["ood"] is None and info["trust"]["note"]
    rc = main(["predict", "--plugins", str(store), str(positive_volume), "--out", str(tmp_path / "pp"),
               "--weights", "random", "--device", "cpu"])
    assert rc == 0
    res = json.loads(next((tmp_path / "pp").glob("*.json")).read_text())["tasks"]["old"]
    assert res["ood"] is None and res["prediction_set"] is None and res["trust_note"] == OLD_PLUGIN_NOTE


def test_store_predict_carries_trust(toy, tmp_path):
    """``predict --plugins``: the same calibrated probability, set and OOD score as ``predict PLUGIN``."""
    from anymc3d.store.multi import MultiPredictor

    img = toy["root"] / "data" / "images" / "case32.nii.gz"
    single = load(toy["plugin"], device="cpu").predict(img)
    mp = MultiPredictor.from_paths([("toy", toy["plugin"])], device="cpu")
    multi = mp.predict(img)["tasks"]["toy"]
    for k in ("probabilities", "raw_probabilities"):
        for lab, v in single[k].items():
            assert multi[k][lab] == pytest.approx(v, abs=1e-4)
    assert multi["prediction_set"] == single["prediction_set"]
    assert multi["ood"]["score"] == pytest.approx(single["ood"]["score"], rel=1e-3)


# ------------------------------------------------------------------------------------------ evaluate
def test_evaluate_reports_calibration_coverage_ood_and_operating_points(toy, tmp_path, capsys):
    out = tmp_path / "ev"
    rc = main(["evaluate", str(toy["plugin"]), str(toy["manifest"]), "--out", str(out), "--bootstrap", "20",
               "--operating-point", "sens=0.9", "--operating-point", "spec=0.95", "--device", "cpu"])
    printed = capsys.readouterr().out
    assert rc == 0 and "calibration: ECE" in printed and "conformal sets:" in printed
    m = json.loads((out / "metrics.json").read_text())
    assert m["calibration"]["method"] == "platt"
    for k in ("before", "after"):
        assert 0.0 <= m["calibration"][k]["ece"] <= 1.0 and 0.0 <= m["calibration"][k]["brier"] <= 1.0
    assert [c["coverage"] for c in m["conformal"]] == [0.8, 0.9, 0.95]
    assert all(1.0 <= c["mean_set_size"] + c["empty_sets"] / c["n"] for c in m["conformal"])
    assert 0.0 <= m["ood"]["flag_rate"] <= 1.0
    ops = {op["policy"]: op for op in m["operating_points"]}
    assert ops["platt"]["stored"] and {"sens=0.9", "spec=0.95"} <= set(ops)
    assert ops["sens=0.9"]["sensitivity_ci"][0] <= ops["sens=0.9"]["sensitivity"] <= ops["sens=0.9"]["sensitivity_ci"][1]
    assert (out / "calibration.png").stat().st_size > 1000
    report = (out / "report.md").read_text()
    for section in ("## Calibration", "## Conformal prediction sets", "## Out-of-distribution flag", "## Operating points"):
        assert section in report


# ------------------------------------------------------------------------------------------ units
def test_conformal_coverage_on_a_synthetic_task_with_many_validation_cases():
    """Exchangeable validation / test cases of a 4-class task (calibrated probabilities drawn from a
    Dirichlet, labels drawn from them): empirical coverage within 0.02 of nominal, sets grow with it."""
    rng = np.random.default_rng(0)

    def draw(n):
        p = rng.dirichlet(np.full(4, 0.7), size=n)
        y = np.array([rng.choice(4, p=pi) for pi in p])
        return p, y

    pv, yv = draw(3000)
    pt, yt = draw(6000)
    scores = conformal.nonconformity(pv, yv)
    sizes = []
    for c in (0.8, 0.9, 0.95):
        r = conformal.coverage_and_size(pt, yt, scores, c)
        assert abs(r["empirical_coverage"] - c) <= 0.02, r
        sizes.append(r["mean_set_size"])
    assert sizes == sorted(sizes) and sizes[0] < sizes[-1]
    # a cut beyond the calibration set's rank: every label
    assert conformal.conformal_cut(scores[:5], 0.95) == np.inf
    with pytest.raises(ValueError):
        conformal.check_coverage(1.0)


def test_platt_and_temperature_reduce_ece_of_miscalibrated_scores():
    rng = np.random.default_rng(1)
    z = rng.normal(size=4000)
    y = (rng.random(4000) < cal.sigmoid(2.0 * z - 0.5)).astype(int)
    raw = cal.sigmoid(0.6 * z)  # under-confident and shifted
    c = cal.fit_calibration("binary", y[:2000], raw[:2000, None])
    after = cal.apply_calibration(c, raw[2000:, None])[:, 0]
    assert cal.ece_equal_mass(y[2000:], after) < 0.5 * cal.ece_equal_mass(y[2000:], raw[2000:])
    # monotone: the same decisions at the calibrated threshold
    thr = 0.4
    assert np.array_equal(raw[2000:] > thr, after > cal.calibrated_threshold(c, thr))
    # multi-class temperature scaling
    logits = rng.normal(size=(3000, 3)) * 2
    p_true = torch.softmax(torch.tensor(logits), -1).numpy()
    yy = np.array([rng.choice(3, p=p) for p in p_true])
    over = torch.softmax(torch.tensor(logits * 3), -1).numpy()  # over-confident
    t = cal.fit_calibration("multiclass", yy[:1500], over[:1500])
    assert t["method"] == "temperature" and 2.0 < t["t"] < 4.5
    fixed = cal.apply_calibration(t, over[1500:])
    before = cal.calibration_summary("multiclass", yy[1500:], over[1500:], ["a", "b", "c"])["ece"]
    assert cal.calibration_summary("multiclass", yy[1500:], fixed, ["a", "b", "c"])["ece"] < 0.5 * before
    assert np.array_equal(fixed.argmax(1), over[1500:].argmax(1))


def test_operating_point_thresholds_reach_their_targets():
    rng = np.random.default_rng(2)
    y = (rng.random(500) < 0.15).astype(int)  # unbalanced
    s = np.clip(rng.normal(0.3 + 0.3 * y, 0.15), 0.001, 0.999)
    assert parse_policy("sens=0.9") == "sens=0.9" and parse_policy("spec=0.95") == "spec=0.95"
    with pytest.raises(ValueError):
        parse_policy("ppv=0.9")
    t_sens = choose_threshold(y, s, "binary", "sens=0.9")
    assert np.mean(s[y == 1] > t_sens) >= 0.9
    assert np.mean(s[y == 1] > t_sens + 0.02) < 0.9 + 0.05  # not needlessly low
    t_spec = choose_threshold(y, s, "binary", "spec=0.95")
    assert np.mean(s[y == 0] <= t_spec) >= 0.95
    assert t_sens < choose_threshold(y, s, "binary", "platt")  # the accuracy-optimal cut misses positives


def test_knn_reference_is_compact_and_flags_a_short_embedding():
    """The stored k-NN reference is at most ``points`` float16 unit vectors, and it flags what the
    Mahalanobis reference calls typical: an embedding shrunk towards the training mean (a 4x field of view)."""
    rng = np.random.default_rng(3)
    centres = rng.normal(size=(4, 64))
    centres = 4.0 * centres / np.linalg.norm(centres, axis=1, keepdims=True)
    a = centres[rng.integers(0, 4, 400)] + rng.normal(size=(400, 64)) * 0.3  # training: four directions
    ref = ood.fit_knn_reference(a[:300], points=16, neighbours=1)
    assert ref["points"].shape == (16, 64) and ref["points"].dtype == np.float16
    assert np.allclose(np.linalg.norm(ref["points"].astype(np.float64), axis=1), 1.0, atol=1e-2)
    shrunk = a[:300].mean(axis=0) + rng.normal(size=(100, 64)) * 0.3  # short, near the mean, no direction
    s_in, s_out = ood.knn_distance(ref, a[300:]), ood.knn_distance(ref, shrunk)
    assert roc_auc_score([0] * 100 + [1] * 100, np.r_[s_in, s_out]) > 0.95
    maha = ood.fit_reference(a[:300], k=8)
    assert roc_auc_score([0] * 100 + [1] * 100, np.r_[ood.mahalanobis(maha, a[300:]), ood.mahalanobis(maha, shrunk)]) < 0.5
    # stored and read back through the plugin tensors: float16 points, the same scores
    back = ood.from_tensors(ood.to_tensors({"image:axial": ref}), ["image:axial"])["image:axial"]
    assert np.allclose(ood.knn_distance(back, shrunk), s_out, atol=1e-6)


def test_ood_threshold_bounds_the_false_flag_rate():
    """The split-conformal quantile: with 98 validation cases the 99 % threshold is their largest score;
    over many draws a new in-distribution case lands above it in at most 1 % + noise of them."""
    rng = np.random.default_rng(0)
    v = rng.normal(size=98)
    assert ood.ood_threshold(v, 99.0) == v.max()
    assert ood.ood_threshold(np.arange(1000.0), 99.0) == 990.0  # the ceil(1001 * 0.99) = 991st smallest
    flagged = [rng.normal() > ood.ood_threshold(rng.normal(size=98), 99.0) for _ in range(4000)]
    assert np.mean(flagged) <= 0.015  # expected 1 / 99
    plain = [rng.normal() > np.percentile(rng.normal(size=98), 99.0) for _ in range(4000)]
    assert np.mean(plain) > np.mean(flagged)  # the plain percentile flags more than it promises


def test_mahalanobis_reference_is_compact_and_separates():
    rng = np.random.default_rng(3)
    a = rng.normal(size=(400, 64)) @ rng.normal(size=(64, 64)) * 0.3
    ref = ood.fit_reference(a[:300], k=8)
    assert ref["basis"].shape == (8, 64)
    s_in = ood.mahalanobis(ref, a[300:])
    s_out = ood.mahalanobis(ref, a[300:] + rng.normal(size=(100, 64)) * 3.0)
    assert roc_auc_score([0] * 100 + [1] * 100, np.r_[s_in, s_out]) > 0.95
    assert 0.5 < np.median(s_in) < 2.0  # about 1 for in-distribution cases (score = d^2 / D)


def test_cross_fitted_scores_score_training_cases_as_new_ones():
    """In-sample, a reference of at most 64 points holds each training embedding itself (score 0);
    cross-fitted, each case is scored against the other folds' reference, like a fresh case of the same
    distribution, so the threshold can be set on the training cases too."""
    rng = np.random.default_rng(4)
    centre = rng.normal(size=16)
    draw = lambda n: centre + 0.5 * rng.normal(size=(n, 16))  # noqa: E731
    train, fresh = {"s": draw(60)}, {"s": draw(400)}
    ref = {"s": ood.fit_knn_reference(train["s"], 64, 1)}
    assert np.allclose(ood.combined_score(ref, train), 0.0, atol=1e-3)
    oof = ood.cross_fitted_scores(train, 64, 1, folds=5)
    new = ood.combined_score({"s": ood.fit_knn_reference(train["s"][:48], 64, 1)}, fresh)  # 4/5 of the cases
    assert np.isfinite(oof).all() and oof.min() > 0.01
    assert abs(np.median(oof) - np.median(new)) < 0.2 * np.median(new)
    assert np.isnan(ood.cross_fitted_scores({"s": draw(3)})).all()  # too few cases for any fold's reference


def test_the_ood_threshold_counts_the_cross_fitted_training_cases(toy):
    spec = json.loads((toy["plugin"] / "plugin.json").read_text())
    m = spec["trust"]["ood"]
    n_val = len(load(toy["plugin"], device="cpu").trust.val_ood)
    assert m["threshold_cases"] == {"validation": n_val, "training, cross-fitted": m["n_reference"]}
