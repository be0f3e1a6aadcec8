"""Every CLI verb end to end on tiny data, and one-line errors (exit 2, no traceback, nothing written)."""
from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import anymc3d
from anymc3d.cli import main

from conftest import build_binary_dataset, write_nifti

SIZE = "32"


def _cli_cmd() -> list[str]:
    exe = shutil.which("anymc3d")
    return [exe] if exe else [sys.executable, "-m", "anymc3d.cli"]


def _read_csv(path: Path) -> list[dict]:
    with path.open(newline="") as fh:
        return list(csv.DictReader(fh))


@pytest.fixture(scope="module")
def cli_plugin(binary_manifest, tmp_path_factory) -> Path:
    """`anymc3d train` once for this module: evaluate/predict use what the train verb wrote."""
    out = tmp_path_factory.mktemp("cli") / "plugin"
    rc = main(["train", str(binary_manifest), "--out", str(out), "--size", SIZE, "--epochs", "1",
               "--batch-size", "4", "--lora-rank", "4", "--quiet", "--no-select"])
    assert rc == 0
    return out


# ------------------------------------------------------------------------------------------ verbs
def test_version_subprocess():
    r = subprocess.run([*_cli_cmd(), "--version"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0
    assert r.stdout.strip() == f"anymc3d {anymc3d.__version__}"


def test_backbones_verb(capsys):
    assert main(["backbones"]) == 0
    names = capsys.readouterr().out.split()
    assert "efficientnet_lite0" in names and "dinov2_vits14" in names and "dinov3_vits16" in names


def test_train_writes_plugin_and_metrics(cli_plugin, capsys):
    for name in ("plugin.safetensors", "plugin.json", "metrics.json", "train_log.csv"):
        assert (cli_plugin / name).is_file(), name
    spec = json.loads((cli_plugin / "plugin.json").read_text())
    assert spec["backbone"] == "efficientnet_lite0" and spec["input_size"] == 32
    assert spec["task_type"] == "binary" and spec["lora"]["r"] == 4
    assert spec["preprocess"]["image"]["size"] == 32 and spec["preprocess"]["image"]["views"] == ["axial"]
    m = json.loads((cli_plugin / "metrics.json").read_text())
    assert m["split"] == "test" and m["n"] == 4 and m["splits"] == {"train": 8, "val": 4, "test": 4}
    assert (m["auc"], m["acc"]) == (m["test"]["auc"], m["test"]["acc"])  # the headline is the test split's
    assert m["epochs_run"] == 1 and m["backbone_fingerprint"] == spec["backbone_fingerprint"]
    log = _read_csv(cli_plugin / "train_log.csv")
    assert len(log) == 1 and log[0]["epoch"] == "1" and float(log[0]["train_loss"]) > 0
    # the stored plugin's validation AUC is the one training selected its epoch by (training's learning
    # is asserted on a separable toy in tests/test_learning.py; one epoch on 8 cases proves nothing)
    assert abs(m["val"]["auc"] - float(log[0]["val_auc"])) < 1e-6
    assert not list(cli_plugin.glob(".tmp-*"))  # atomic writes leave no temporaries


@pytest.mark.parametrize("kind", ["multiclass", "multilabel"])
def test_train_and_predict_other_task_types(kind, multiclass_manifest, multilabel_manifest, tmp_path, capsys):
    manifest = multiclass_manifest if kind == "multiclass" else multilabel_manifest
    out = tmp_path / "plugin"
    assert main(["train", str(manifest), "--out", str(out), "--size", SIZE, "--epochs", "1", "--batch-size", "4",
                 "--lora-rank", "2", "--quiet", "--no-select"] + (["--loss", "ce"] if kind == "multiclass" else [])) == 0
    spec = json.loads((out / "plugin.json").read_text())
    assert spec["task_type"] == kind
    assert sorted(spec["label_names"]) == (["clear", "high", "low"] if kind == "multiclass" else ["has_a", "has_b"])
    m = json.loads((out / "metrics.json").read_text())
    assert m["task_type"] == kind and m["n"] > 0
    image = sorted(manifest.parent.glob("*.nii.gz"))[0]
    assert main(["predict", str(out), str(image), "--out", str(tmp_path / "pred")]) == 0
    res = json.loads((tmp_path / "pred" / (image.name[:-7] + ".json")).read_text())
    assert set(res["probabilities"]) == set(spec["label_names"])
    if kind == "multiclass":
        assert abs(sum(res["probabilities"].values()) - 1) < 1e-5 and len(res["predicted"]) == 1


def test_evaluate_writes_report(cli_plugin, binary_manifest, tmp_path, capsys):
    out = tmp_path / "eval"
    assert main(["evaluate", str(cli_plugin), str(binary_manifest), "--out", str(out), "--bootstrap", "50"]) == 0
    m = json.loads((out / "metrics.json").read_text())
    for key in ("auc", "acc", "n"):
        assert key in m
    assert m["n"] == 4 and m["task_type"] == "binary"
    trained = json.loads((cli_plugin / "metrics.json").read_text())["test"]
    assert abs(m["auc"] - trained["auc"]) < 1e-6 and m["acc"] == trained["acc"]  # evaluate = training's test scoring
    assert m["info"]["split"] == "test"
    assert (out / "report.md").read_text().startswith("#")
    assert (out / "roc.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = _read_csv(out / "predictions.csv")
    assert len(rows) == 4 and {"id", "label", "p_positive"} <= set(rows[0])
    # --split all evaluates every labelled case
    assert main(["evaluate", str(cli_plugin), str(binary_manifest), "--out", str(tmp_path / "all"),
                 "--split", "all", "--bootstrap", "0"]) == 0
    assert json.loads((tmp_path / "all" / "metrics.json").read_text())["n"] == 16


def test_predict_one_and_several(cli_plugin, positive_volume, negative_volume, tmp_path, capsys):
    one = tmp_path / "one"
    assert main(["predict", str(cli_plugin), str(positive_volume), "--out", str(one)]) == 0
    files = sorted(p.name for p in one.iterdir())
    assert files == ["case01.json"]  # one input: no predictions.csv
    res = json.loads((one / "case01.json").read_text())
    assert set(res["probabilities"]) == {"negative", "positive"}
    assert abs(sum(res["probabilities"].values()) - 1) < 1e-6
    assert res["predicted"] in (["negative"], ["positive"])
    sw = res["slice_weights"]["image:axial"]
    assert len(sw) == 10 and abs(sum(sw) - 1) < 1e-4  # one weight per axial slice (z = 10)
    assert res["backbone"] == "efficientnet_lite0" and res["id"] == "case01"

    several = tmp_path / "several"
    assert main(["predict", str(cli_plugin), str(positive_volume), str(negative_volume), "--out", str(several)]) == 0
    assert sorted(p.name for p in several.iterdir()) == ["case00.json", "case01.json", "predictions.csv"]
    rows = _read_csv(several / "predictions.csv")
    assert [r["id"] for r in rows] == ["case00", "case01"]  # sorted by case id (issue 16)
    assert set(rows[0]) == {"id", "p_negative", "p_positive", "predicted", "prediction_set", "ood_score", "ood_flag"}
    assert abs(float(rows[1]["p_positive"]) - res["probabilities"]["positive"]) < 1e-5  # rows[1]: case01


def test_predict_npy_volume(cli_plugin, tmp_path, capsys):
    rng = np.random.default_rng(0)
    p = tmp_path / "vol.npy"
    np.save(p, (rng.random((12, 12, 10)) * 0.2).astype(np.float32))
    assert main(["predict", str(cli_plugin), str(p), "--out", str(tmp_path / "o")]) == 0
    assert (tmp_path / "o" / "vol.json").is_file()


def test_predict_manifest(cli_plugin, binary_manifest, tmp_path, capsys):
    out = tmp_path / "pm"
    assert main(["predict", str(cli_plugin), str(binary_manifest), "--out", str(out)]) == 0
    rows = _read_csv(out / "predictions.csv")
    assert len(rows) == 16 and rows[0]["id"] == "case00"
    assert len(list(out.glob("case*.json"))) == 16
    # a manifest without a label column is fine for prediction
    nolabel = binary_manifest.parent / "nolabel.csv"
    nolabel.write_text("id,image\nx1,images/case03.nii.gz\n")
    assert main(["predict", str(cli_plugin), str(nolabel), "--out", str(tmp_path / "nl")]) == 0
    assert (tmp_path / "nl" / "x1.json").is_file()


def test_probe_writes_metrics(binary_manifest, tmp_path, capsys):
    out = tmp_path / "probe"
    assert main(["probe", str(binary_manifest), "--out", str(out), "--size", SIZE]) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["method"] == "linear_probe" and m["n"] == 4
    assert m["auc"] == 1.0 and m["val_auc"] == 1.0  # a bright cube or none: frozen ImageNet features separate it
    assert m["trainable_params"] == 1280 + 1


# ------------------------------------------------------------------------------------------ errors
def _assert_one_line_error(capsys, argv, out: Path, *fragments) -> str:
    rc = main(argv)
    captured = capsys.readouterr()
    assert rc == 2, captured
    err = captured.err.strip()
    assert "\n" not in err, err
    assert err.startswith("anymc3d: error:"), err
    assert "Traceback" not in captured.err + captured.out
    for f in fragments:
        assert f in err, (f, err)
    assert not out.exists() or not any(out.rglob("*")), list(out.rglob("*"))
    return err


@pytest.fixture()
def small_dataset(tmp_path) -> Path:
    return build_binary_dataset(tmp_path / "data", n=8, seed=5)


def test_error_corrupt_nifti(cli_plugin, positive_volume, small_dataset, tmp_path, capsys):
    bad = tmp_path / "corrupt.nii.gz"
    bad.write_bytes(b"definitely not gzip" * 50)
    out = tmp_path / "out"
    # a good input first: its JSON must not be written when a later input fails
    _assert_one_line_error(capsys, ["predict", str(cli_plugin), str(positive_volume), str(bad), "--out", str(out)],
                           out, str(bad))
    # the same in a training manifest: nothing is written before every case has been read
    (small_dataset.parent / "images" / "case03.nii.gz").write_bytes(b"\x1f\x8b garbage")
    _assert_one_line_error(capsys, ["train", str(small_dataset), "--out", str(out), "--size", SIZE, "--epochs", "1",
                                    "--quiet"], out, "case03.nii.gz")
    _assert_one_line_error(capsys, ["evaluate", str(cli_plugin), str(small_dataset), "--out", str(out), "--split",
                                    "all"], out, "case03.nii.gz")


def test_error_2d_npy(cli_plugin, tmp_path, capsys):
    p = tmp_path / "flat.npy"
    np.save(p, np.zeros((12, 12), np.float32))
    out = tmp_path / "out"
    err = _assert_one_line_error(capsys, ["predict", str(cli_plugin), str(p), "--out", str(out)], out, str(p))
    assert "2 dimensions" in err


def test_error_nan_volume(cli_plugin, positive_volume, small_dataset, tmp_path, capsys):
    a = np.random.default_rng(0).random((12, 12, 10)).astype(np.float32)
    a[3, 4, 5] = np.nan
    p = write_nifti(tmp_path / "nan.nii.gz", a)
    out = tmp_path / "out"
    err = _assert_one_line_error(capsys, ["predict", str(cli_plugin), str(positive_volume), str(p), "--out", str(out)],
                                 out, str(p))
    assert "NaN" in err
    write_nifti(small_dataset.parent / "images" / "case06.nii.gz", a)  # a test-split case
    _assert_one_line_error(capsys, ["evaluate", str(cli_plugin), str(small_dataset), "--out", str(out)],
                           out, "case06.nii.gz", "NaN")


def test_error_manifest_without_label_column(cli_plugin, small_dataset, tmp_path, capsys):
    rows = _read_csv(small_dataset)
    m = small_dataset.parent / "nolabel.csv"
    with m.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["id", "image", "split"])
        w.writerows([[r["id"], r["image"], r["split"]] for r in rows])
    out = tmp_path / "out"
    _assert_one_line_error(capsys, ["train", str(m), "--out", str(out), "--size", SIZE, "--epochs", "1", "--quiet"],
                           out, str(m), "'label'")
    _assert_one_line_error(capsys, ["evaluate", str(cli_plugin), str(m), "--out", str(out)], out, "'label'")


def test_error_missing_vit_weights(small_dataset, tmp_path, capsys):
    out = tmp_path / "out"
    for verb in ("train", "probe"):
        _assert_one_line_error(capsys, [verb, str(small_dataset), "--backbone", "dinov2_vits14", "--weights",
                                        "/nonexistent.pth", "--out", str(out), "--size", "28"],
                               out, "/nonexistent.pth", "not found")


@pytest.mark.slow  # a fresh interpreter imports torch/timm/monai: 10-25 s on 2 busy cores
def test_error_missing_vit_weights_subprocess(small_dataset, tmp_path):
    out = tmp_path / "out"
    r = subprocess.run([*_cli_cmd(), "train", str(small_dataset), "--backbone", "dinov2_vits14", "--weights",
                        "/nonexistent.pth", "--out", str(out), "--quiet"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("anymc3d: error:") and "/nonexistent.pth" in lines[0]
    assert "Traceback" not in r.stderr and not out.exists()


def test_error_plugin_on_other_weights(cli_plugin, positive_volume, tmp_path, capsys):
    out = tmp_path / "out"
    _assert_one_line_error(capsys, ["predict", str(cli_plugin), str(positive_volume), "--out", str(out),
                                    "--weights", "random"], out, "sha256:")
