"""anymc3d bench: tiny suite -> both tables, resume, quoted rows, suite validation."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from anymc3d.bench import load_suite, run_bench
from anymc3d.bench.runner import cell_path
from anymc3d.cli import main
from anymc3d.errors import InputError

OPTS = {"weights": "random", "size": 32, "head_epochs": 40}


def fake_medmnist(path: Path, n=(16, 6, 8), side=8, seed=0) -> Path:
    """A MedMNIST-shaped .npz: class 1 has a bright cube, class 0 not."""
    rng = np.random.default_rng(seed)
    d = {}
    for split, k in zip(("train", "val", "test"), n):
        y = np.arange(k) % 2
        x = (rng.random((k, side, side, side)) * 40).astype(np.uint8)
        x[y == 1, 2:5, 2:5, 2:5] = 255
        d[f"{split}_images"], d[f"{split}_labels"] = x, y.reshape(-1, 1).astype(np.uint8)
    np.savez(path, **d)
    return path


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench")
    npz = fake_medmnist(root / "adrenalmnist3d.npz")  # the stem matches the quoted AdrenalMNIST3D rows
    suite = load_suite(f"medmnist3d:{npz}")
    out = root / "out"
    summary = run_bench(suite, ["linear_probe", "frozen_mean"], 1, out, options=OPTS, progress=False, verbose=False)
    return suite, out, summary


def test_runner_writes_both_tables(tiny):
    suite, out, summary = tiny
    assert summary == {**summary, "ran": 2, "failed": 0, "skipped": 0}
    rows = list(csv.DictReader((out / "results.csv").open()))
    measured = [r for r in rows if r["source"] == "measured"]
    assert {r["method"] for r in measured} == {"linear_probe", "frozen_mean"}
    for col in ("method", "task", "auc_mean", "auc_std", "acc_mean", "trainable_params", "train_s",
                "infer_s_per_volume", "source"):
        assert col in rows[0]
    for r in measured:
        assert r["task"] == "adrenalmnist3d_28"
        # a bright cube or none on a random backbone: the probe separates the 8 test volumes, the trained
        # head nearly (0.875 after 40 epochs; it scored 0.0 after 5, before it had learned)
        floor = {"linear_probe": 0.9, "frozen_mean": 0.8}[r["method"]]
        assert float(r["auc_mean"]) >= floor and int(r["trainable_params"]) > 0, (r["method"], r["auc_mean"])
        assert float(r["auc_ci_lo"]) <= float(r["auc_mean"]) <= float(r["auc_ci_hi"])
        assert r["auc_std"] == ""  # one seed: no std, never a made-up 0
    md = (out / "results.md").read_text()
    assert "| `linear_probe` |" in md and "adrenalmnist3d_28 AUC" in md
    cell = json.loads(cell_path(out, "adrenalmnist3d_28", "linear_probe", 0).read_text())
    assert cell["status"] == "ok" and cell["result"]["ci"]["auc"] is not None


def test_quoted_rows_are_labelled_and_separate(tiny):
    _, out, _ = tiny
    rows = list(csv.DictReader((out / "results.csv").open()))
    quoted = [r for r in rows if r["source"] == "quoted"]
    assert any(r["method"] == "ResNet-18+3D" and float(r["auc_mean"]) == pytest.approx(0.827) for r in quoted)
    assert all("MedMNIST v2" in r["citation"] and r["trainable_params"] == "" for r in quoted)
    md = (out / "results.md").read_text()
    measured_part, quoted_part = md.split("## Published reference numbers (quoted, NOT measured here)")
    assert "ResNet-18+3D" not in measured_part and "ResNet-18+3D" in quoted_part
    assert "| `linear_probe` |" not in quoted_part


def test_resume_skips_finished_cells(tiny):
    suite, out, _ = tiny
    p = cell_path(out, "adrenalmnist3d_28", "linear_probe", 0)
    before = p.read_text()
    summary = run_bench(suite, ["linear_probe", "frozen_mean"], 1, out, options=OPTS, progress=False, verbose=False)
    assert summary["ran"] == 0 and summary["skipped"] == 2
    assert p.read_text() == before
    # a failed cell is retried; a changed option recomputes only the cells it affects
    bad = json.loads(p.read_text())
    bad.update(status="error", error="boom")
    p.write_text(json.dumps(bad))
    summary = run_bench(suite, ["linear_probe", "frozen_mean"], 1, out, options={**OPTS, "epochs": 3},
                        progress=False, verbose=False)
    assert summary["ran"] == 1 and summary["skipped"] == 1  # epochs does not affect cached methods
    assert json.loads(p.read_text())["status"] == "ok"


def test_cli_restricts_methods_and_tasks(tiny, capsys):
    suite, out, _ = tiny
    npz = suite.tasks[0].data
    rc = main(["bench", f"medmnist3d:{npz}", "--methods", "linear_probe", "--tasks", "adrenalmnist3d_28",
               "--out", str(out), "--weights", "random", "--size", "32", "--set", "head_epochs=40", "--quiet"])
    assert rc == 0
    assert "0 ran, 1 already done" in capsys.readouterr().out


def test_shared_trunk_plugin_fills_the_trunk_cache(tiny, tmp_path):
    """plugin_lastk1 without augmentation keeps its frozen trunk activations in DIR/cache/trunk, and a
    second seed reads them back instead of recomputing (same entries, no new ones)."""
    suite, _, _ = tiny
    out = tmp_path / "o"
    opts = {**OPTS, "epochs": 1, "augment": False, "patience": 1}
    s = run_bench(suite, ["plugin_lastk1"], 1, out, options=opts, progress=False, verbose=False)
    assert s["ran"] == 1 and s["failed"] == 0
    entries = sorted((out / "cache" / "trunk").rglob("*.safetensors"))
    assert len(entries) == 16 + 6 + 8  # one per case (train, val, test), axial stream
    mtimes = [e.stat().st_mtime_ns for e in entries]
    s = run_bench(suite, ["plugin_lastk1"], 2, out, options=opts, progress=False, verbose=False)
    assert s["ran"] == 1 and s["skipped"] == 1
    again = sorted((out / "cache" / "trunk").rglob("*.safetensors"))
    assert again == entries and [e.stat().st_mtime_ns for e in again] == mtimes


def test_interrupted_training_cell_resumes_and_stale_checkpoints_are_dropped(tiny, tmp_path):
    """A killed plugin cell continues from runs/.../checkpoint.pt when its options are unchanged; a
    checkpoint that other options wrote is deleted instead of being resumed."""
    suite, _, _ = tiny
    out = tmp_path / "o"
    opts = {**OPTS, "epochs": 2, "augment": False, "patience": 5}
    assert run_bench(suite, ["plugin_lastk1"], 1, out, options=opts, progress=False, verbose=False)["failed"] == 0
    cell = cell_path(out, "adrenalmnist3d_28", "plugin_lastk1", 0)
    first = json.loads(cell.read_text())["result"]
    cell.unlink()  # as if the job had been killed after its last checkpoint, before the cell was written
    s = run_bench(suite, ["plugin_lastk1"], 1, out, options=opts, progress=False, verbose=False)
    again = json.loads(cell.read_text())["result"]
    assert s["ran"] == 1 and again["epochs_run"] == 2
    assert again["train_s"] == first["train_s"]  # the recorded training time: nothing was retrained
    s = run_bench(suite, ["plugin_lastk1"], 1, out, options={**opts, "lr_lora": 5e-4}, progress=False, verbose=False)
    assert s["failed"] == 0  # the old checkpoint (other lr_lora) was dropped, not resumed or refused
    assert json.loads(cell.read_text())["result"]["train_s"] != first["train_s"]


def test_cli_seed_list_runs_only_those_seeds(tiny, tmp_path, capsys):
    suite, _, _ = tiny
    out = tmp_path / "o"
    rc = main(["bench", f"medmnist3d:{suite.tasks[0].data}", "--methods", "linear_probe", "--seeds", "2,1",
               "--out", str(out), "--weights", "random", "--size", "32", "--quiet"])
    assert rc == 0 and "2 ran" in capsys.readouterr().out
    assert sorted(p.name for p in (out / "cells").glob("*.json")) == [
        "adrenalmnist3d_28__linear_probe__s1.json", "adrenalmnist3d_28__linear_probe__s2.json"]
    with pytest.raises(SystemExit):
        main(["bench", "synthetic", "--seeds", "1,x", "--out", str(out)])
    assert "expected N or a comma list of seeds" in capsys.readouterr().err


def test_method_fixed_size_overrides_the_run_option(tmp_path):
    """A method registered with ``size=...`` runs at that size whatever --size says, and its fingerprint
    carries it, so rows at two slice sizes can share one bench folder."""
    from anymc3d.bench.methods import METHODS, register_method
    from anymc3d.bench.runner import fingerprint

    seen = []
    m = register_method("_size_probe", lambda task, out, seed, o, views=("axial",): seen.append((o["size"], views)),
                        "plugin", "test only", size=48, views=("coronal",))
    METHODS.pop("_size_probe")  # keep the registry as users see it
    m.run(None, tmp_path, 0, {"size": 32, "epochs": 1})
    assert seen == [(48, ("coronal",))]
    assert m.relevant_options({"size": 32})["size"] == 48
    entry = load_suite(f"medmnist3d:{fake_medmnist(tmp_path / 'a.npz')}").tasks[0]
    assert (fingerprint("plugin_lastk1_s112", {"size": 32}, entry, "cpu")
            == fingerprint("plugin_lastk1_s112", {"size": 64}, entry, "cpu"))
    assert fingerprint("plugin_lastk1", {"size": 32}, entry, "cpu") != fingerprint("plugin_lastk1", {"size": 64}, entry, "cpu")


def test_medmnist_task_names_carry_the_release_size(tmp_path):
    """A file whose name does not end in its size (e.g. a training subset) is named from its arrays."""
    a = load_suite(f"medmnist3d:{fake_medmnist(tmp_path / 'sub_train300.npz', n=(2, 2, 2), side=64)}").tasks[0]
    b = load_suite(f"medmnist3d:{fake_medmnist(tmp_path / 'small.npz', n=(2, 2, 2))}").tasks[0]
    c = load_suite(f"medmnist3d:{fake_medmnist(tmp_path / 'organ_64.npz', n=(2, 2, 2))}").tasks[0]
    assert (a.name, b.name, c.name) == ("sub_train300_64", "small_28", "organ_64")


def write_yaml(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)


@pytest.mark.parametrize("text, message", [
    ("tasks: []\n", "'tasks' must be a non-empty list"),
    ("tasks:\n  - name: a\n    data: missing.csv\n", "data file not found"),
    ("tasks:\n  - name: a\n    dta: x.csv\n", "unknown key(s) ['dta']"),
    ("tasks:\n  - name: a\n", "give exactly one of 'data'"),
    ("tasks:\n  - name: a\n    synthetic: {task: nope}\n", "synthetic.task must be one of"),
    ("tasks:\n  - name: a\n    synthetic: {task: lesion_binary, knobs: {radius: 3}}\n", "unknown knob(s) ['radius']"),
    ("tasks:\n  - name: a\n    synthetic: {task: lesion_binary}\n  - name: a\n    synthetic: {task: elongated}\n",
     "duplicate task name(s) ['a']"),
    ("methods: [plugin, nope]\ntasks:\n  - name: a\n    synthetic: {task: lesion_binary}\n", "unknown method(s) ['nope']"),
    ("options: {epochz: 3}\ntasks:\n  - name: a\n    synthetic: {task: lesion_binary}\n", "unknown option(s) ['epochz']"),
    ("tasks:\n  - name: a\n    synthetic: {task: lesion_binary}\n    quoted: nomnist\n", "quoted: unknown key"),
    ("tasks: [\n", "not valid YAML"),
])
def test_suite_validation_errors(tmp_path, text, message):
    with pytest.raises(InputError) as exc:
        load_suite(write_yaml(tmp_path / "s.yaml", text))
    assert message in str(exc.value) and "s.yaml" in str(exc.value)


def test_suite_yaml_ok_and_cli_error_line(tmp_path, capsys):
    fake_medmnist(tmp_path / "adrenalmnist3d_64.npz")
    (tmp_path / "m.csv").write_text("id,image,label\n")
    s = load_suite(write_yaml(tmp_path / "ok.yaml", "name: mine\nseeds: 2\nmethods: [linear_probe]\noptions: {size: 32}\n"
                              "tasks:\n  - name: adr\n    data: adrenalmnist3d_64.npz\n"
                              "  - name: syn\n    synthetic: {task: elongated, n_cases: 40, knobs: {size: 16}}\n"))
    assert [t.name for t in s.tasks] == ["adr", "syn"] and s.tasks[0].quoted == "adrenalmnist3d_64"
    assert s.seeds == 2 and s.options == {"size": 32} and s.tasks[1].quoted is None
    assert len(load_suite("synthetic").tasks) == 6
    rc = main(["bench", write_yaml(tmp_path / "bad.yaml", "tasks:\n  - name: a\n    data: nope.npz\n"),
               "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.startswith("anymc3d: error:") and "nope.npz" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "o").exists()
    rc = main(["bench", "synthetic", "--methods", "plugin,nope", "--out", str(tmp_path / "o")])
    assert rc == 2 and "unknown method(s) ['nope']" in capsys.readouterr().err
