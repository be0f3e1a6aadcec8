"""Issue 17: bad input never crashes and never silently changes the task.

The corpus (``tests/badinput_corpus.py``, every file generated) is run through the CLI in-process:
an error case must exit 2 with exactly one stderr line ``anymc3d: error: <file>[:row N]: <cause>``,
no traceback and nothing written; a warning case must exit 0 with one ``anymc3d: warning:`` line.
Then the policies one by one: size limit before allocation (peak memory of a child process),
labels, store integrity, output folders and file permissions.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from anymc3d.cli import main
from anymc3d.data import load_manifest
from anymc3d.errors import InputError
from anymc3d.io import read_volume, reset_reader_options

import badinput_corpus as bc

ERRORS = [e for e in bc.CORPUS if e.kind == "error"]
WARNINGS = [e for e in bc.CORPUS if e.kind == "warning"]


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("badinput")
    plugin = bc.make_plugin(root / "plugin")
    image = bc.nifti(root / "good.nii.gz", bc.volume(0))
    return {"plugin": plugin, "image": image}


@pytest.fixture(autouse=True)
def _fresh_reader_options():
    reset_reader_options()
    yield
    reset_reader_options()


def _snapshot(path: Path) -> dict:
    if path.is_file():
        return {path: path.read_bytes()}
    if path.is_dir():
        return {p: p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}
    return {}


def test_corpus_size():
    names = [e.name for e in bc.CORPUS]
    assert len(names) == len(set(names))
    assert len([e for e in bc.CORPUS if e.from_issue]) >= 14  # every case of the issue
    assert len([e for e in bc.CORPUS if not e.from_issue]) >= 15  # and more of our own
    assert {e.group for e in bc.CORPUS} >= {"nifti", "itk", "dicom", "npy", "manifest", "mask", "plugin", "store",
                                              "output"}


@pytest.mark.parametrize("entry", ERRORS, ids=[e.name for e in ERRORS])
def test_bad_input_is_refused_in_one_line(entry, env, tmp_path, capfd):
    """capfd: file-descriptor level, so a C++ library printing to the terminal is caught too."""
    run = entry.build(tmp_path, env)
    before = _snapshot(run.out)
    kept = {p: p.read_bytes() for p in run.unchanged}
    capfd.readouterr()
    rc = main(run.argv)
    cap = capfd.readouterr()
    assert rc == 2, (rc, cap.err, cap.out)
    assert "Traceback" not in cap.err + cap.out
    lines = cap.err.strip().splitlines()
    assert len(lines) == 1, cap.err
    head = "anymc3d: error: "
    assert lines[0].startswith(head), lines[0]
    msg = lines[0][len(head):]
    prefix = run.file + (f":row {run.row}: " if run.row is not None else ": ")
    assert msg.startswith(prefix), (prefix, msg)
    for w in run.words:
        assert w in msg, (w, msg)
    # no partial output: the output folder is as it was (absent, empty, or the same files and bytes)
    assert _snapshot(run.out) == before, sorted(set(_snapshot(run.out)) ^ set(before))
    for p, data in kept.items():
        assert p.read_bytes() == data, p
    assert not list(tmp_path.rglob(".tmp-*"))


@pytest.mark.parametrize("entry", WARNINGS, ids=[e.name for e in WARNINGS])
def test_questionable_input_is_predicted_with_one_warning(entry, env, tmp_path, capfd):
    run = entry.build(tmp_path, env)
    capfd.readouterr()
    rc = main(run.argv)
    cap = capfd.readouterr()
    assert rc == 0, cap.err
    assert "Traceback" not in cap.err + cap.out
    lines = cap.err.strip().splitlines()
    assert len(lines) == 1, cap.err
    head = f"anymc3d: warning: {run.file}: "
    assert lines[0].startswith(head), lines[0]
    for w in run.words:
        assert w in lines[0], (w, lines[0])
    assert len(list(run.out.glob("*.json"))) == 1


@pytest.mark.parametrize("entry", WARNINGS, ids=[e.name for e in WARNINGS])
def test_warning_is_in_prediction_json(entry, env, tmp_path, capsys):
    """The prediction JSON carries the reader's warnings (``"warnings": [...]``), word for word."""
    run = entry.build(tmp_path, env)
    assert main(run.argv) == 0
    line = capsys.readouterr().err.strip().splitlines()[0]
    res = json.loads(next(run.out.glob("*.json")).read_text())
    assert "warnings" in res, sorted(res)
    assert res["warnings"] == [line[len("anymc3d: warning: "):]]


def test_clean_input_has_no_warning(env, tmp_path, capsys):
    assert main(["predict", str(env["plugin"]), str(env["image"]), "--out", str(tmp_path / "o"),
                 "--weights", "random"]) == 0
    assert capsys.readouterr().err == ""
    assert not read_volume(env["image"]).meta.get("warnings")


# ------------------------------------------------------------------------------------------ size guard
def test_refusing_a_100000_cubed_header_stays_small(tmp_path):
    """Peak RSS of a child process that refuses a NIfTI-2 header declaring 100000^3 float32 (4 PB)."""
    p = bc.header_only_nifti(tmp_path / "huge.nii", (100000, 100000, 100000), np.float32, version=2)
    code = textwrap.dedent(f"""
        import json, resource
        from anymc3d.errors import InputError
        from anymc3d.io import read_volume
        try:
            read_volume({str(p)!r})
            outcome = "read"
        except InputError as exc:
            outcome = str(exc)
        # VmHWM: the peak of this program; ru_maxrss would include the pytest process it was forked from
        status = dict(line.split(":", 1) for line in open("/proc/self/status") if ":" in line)
        hwm = int(status["VmHWM"].split()[0]) if "VmHWM" in status else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        print(json.dumps({{"outcome": outcome, "maxrss_kb": hwm}}))
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert "limit" in res["outcome"] and "100000x100000x100000" in res["outcome"]
    assert res["maxrss_kb"] / 1024 < 200, res


def test_max_voxels_moves_the_limit(tmp_path):
    p = bc.npy_header_only(tmp_path / "big.npy", (2000, 2000, 2000))
    with pytest.raises(InputError, match="limit"):
        read_volume(p)
    with pytest.raises(InputError, match="truncated"):  # past the size check, the missing data is found
        read_volume(p, max_voxels=9 * 10**9)
    np.save(tmp_path / "ok.npy", bc.volume(0))
    assert read_volume(tmp_path / "ok.npy", max_voxels=12 * 12 * 10).array.shape == bc.SHAPE
    with pytest.raises(InputError, match="1,439"):
        read_volume(tmp_path / "ok.npy", max_voxels=12 * 12 * 10 - 1)


def test_reader_flags_do_not_leak_between_runs(env, tmp_path, capsys):
    d = bc.dicom_series(tmp_path / "gap", n=10, skip=(5,))
    assert main(["predict", str(env["plugin"]), str(d), "--out", str(tmp_path / "a"), "--weights", "random",
                 "--allow-gaps"]) == 0
    assert main(["predict", str(env["plugin"]), str(d), "--out", str(tmp_path / "b"), "--weights", "random"]) == 2
    assert "slice missing" in capsys.readouterr().err
    from anymc3d.io import options

    assert options.current() == options.ReaderOptions()  # nothing left behind for Python callers
    with pytest.raises(InputError, match="slice missing"):
        read_volume(d)


# ------------------------------------------------------------------------------------------ DICOM policy
def test_dicom_series_choice(tmp_path, capsys):
    d = bc.dicom_series(tmp_path / "two", n=8)
    bc.dicom_series(d, n=4, uid=bc.OTHER_UID, prefix="loc", seed=5, z=[0.5, 3.5, 6.5, 9.5])
    v = read_volume(d)
    assert v.meta["dicom_series_uid"] == bc.SERIES_UID and v.spatial_shape == (12, 12, 8)
    assert len(v.meta["warnings"]) == 1
    capsys.readouterr()
    w = read_volume(d, series=bc.OTHER_UID)
    assert w.meta["dicom_series_uid"] == bc.OTHER_UID and w.spatial_shape == (12, 12, 4)
    assert "warnings" not in w.meta and capsys.readouterr().err == ""  # an explicit choice needs no warning
    one = bc.dicom_series(tmp_path / "one", n=6)
    assert "warnings" not in read_volume(one).meta


def test_dicom_gap_reads_with_allow_gaps_and_no_itk_noise(tmp_path, capfd):
    d = bc.dicom_series(tmp_path / "gap", n=10, skip=(5,))
    with pytest.raises(InputError, match="about 1 slice"):
        read_volume(d)
    v = read_volume(d, allow_gaps=True)
    assert v.spatial_shape == (12, 12, 9) and "distorted" in v.meta["warnings"][0]
    err = capfd.readouterr().err  # file descriptor level: ITK's C++ warnings would show here
    assert "WARNING: In" not in err and "ITK" not in err
    assert err.strip().splitlines() == [f"anymc3d: warning: {v.meta['warnings'][0]}"]


# ------------------------------------------------------------------------------------------ labels
def _manifest(tmp_path: Path, labels, task=None) -> Path:
    m = bc.binary_dataset(tmp_path / "d", n=len(labels), labels=labels)
    if task is not None:
        (m.parent / "task.json").write_text(json.dumps(task))
    return m


def test_label_rules(tmp_path):
    ints = _manifest(tmp_path / "a", [0, 1, 2, 0, 1, 2])
    with pytest.raises(InputError, match=r":row 4: .*--task-type multiclass"):
        load_manifest(ints)
    t = load_manifest(ints, task_type="multiclass")
    assert t.task_type == "multiclass" and t.label_names == ["0", "1", "2"]
    assert [int(c.label[0]) for c in t.cases] == [0, 1, 2, 0, 1, 2]
    (ints.parent / "task.json").write_text(json.dumps({"task_type": "multiclass"}))
    assert load_manifest(ints).task_type == "multiclass"  # declared in task.json
    names = load_manifest(_manifest(tmp_path / "b", ["low", "high", "low", "high"]))
    assert names.task_type == "multiclass" and names.label_names == ["high", "low"]  # class names: by design
    floats = load_manifest(_manifest(tmp_path / "c", ["0.0", "1.0", "1", "0"]))
    assert floats.task_type == "binary" and [int(c.label[0]) for c in floats.cases] == [0, 1, 1, 0]
    stray = _manifest(tmp_path / "e", [0, 1, "yes", 1, 0, "2"])
    with pytest.raises(InputError) as ei:
        load_manifest(stray, task_type="binary")
    assert ":row 4: label 'yes'" in str(ei.value) and "7 ('2')" in str(ei.value)
    # prediction does not need labels: odd ones are ignored there, never turned into a task
    pred = load_manifest(stray, require_labels=False)
    assert all(c.label is None for c in pred.cases)


def test_manifest_with_bom_and_spaces_in_header(tmp_path):
    m = bc.binary_dataset(tmp_path / "d", n=4)
    text = m.read_text().replace("id,image,label,split", "id, image ,label,split")
    m.write_bytes(b"\xef\xbb\xbf" + text.encode())
    t = load_manifest(m)
    assert [c.id for c in t.cases] == ["c00", "c01", "c02", "c03"] and t.task_type == "binary"


def test_masks_are_read_without_image_warnings(tmp_path, capsys):
    m = bc.binary_dataset(tmp_path / "d", n=4, masks=True)
    t = load_manifest(m)
    empty = t.cases[0].mask
    assert not read_volume(empty).meta.get("warnings") and capsys.readouterr().err == ""
    assert read_volume(Path(empty)).meta["warnings"]  # the same file given as an image is flagged


# ------------------------------------------------------------------------------------------ store
def test_plugins_list_flags_broken_entries(env, tmp_path, capsys):
    store = tmp_path / "store"
    assert main(["plugins", "add", str(env["plugin"]), "--store", str(store)]) == 0
    bc.copy_plugin(env, store / "no_tensors")
    (store / "no_tensors" / "plugin.safetensors").unlink()
    bc.copy_plugin(env, store / "alien")
    bc.edit_json(store / "alien" / "plugin.json", backbone="resnet9000")
    capsys.readouterr()
    assert main(["plugins", "list", "--store", str(store)]) == 0
    out = capsys.readouterr().out
    lines = {ln.split()[0]: ln for ln in out.splitlines()[1:]}
    assert "UNREADABLE" in lines["no_tensors"] and "plugin tensors not found" in lines["no_tensors"]
    assert "UNREADABLE" in lines["alien"] and "resnet9000" in lines["alien"]
    assert "UNREADABLE" not in lines["tiny"]
    meta = json.loads((store / "store.json").read_text())
    spec = json.loads((env["plugin"] / "plugin.json").read_text())
    assert (meta["backbone"], meta["backbone_fingerprint"]) == (spec["backbone"], spec["backbone_fingerprint"])


def test_store_first_plugin_fingerprint_checked_against_weights(env, tmp_path, capsys):
    from anymc3d.store import PluginStore

    fake = bc.copy_plugin(env, tmp_path / "fake")
    bc.edit_json(fake / "plugin.json", backbone_fingerprint="sha256:0123456789abcdef")
    with pytest.raises(InputError, match="neither that of efficientnet_lite0's default weights"):
        PluginStore(tmp_path / "s").add(fake)
    assert not (tmp_path / "s").exists()
    with pytest.raises(InputError, match="not that of randomly initialised"):
        PluginStore(tmp_path / "s").add(fake, weights="random")
    PluginStore(tmp_path / "s").add(env["plugin"], weights="random")  # the real one is accepted


# ------------------------------------------------------------------------------------------ outputs
def test_train_overwrite_and_resume(env, tmp_path, capsys):
    m = bc.binary_dataset(tmp_path / "d", n=8)
    out = tmp_path / "run"
    args = ["train", str(m), "--out", str(out), "--weights", "random", "--size", bc.SIZE, "--epochs", "1",
            "--batch-size", "4", "--lora-rank", "2", "--quiet", "--no-augment", "--no-select"]
    assert main(args) == 0
    first = (out / "plugin.safetensors").read_bytes()
    assert main(args) == 2 and "already holds a plugin" in capsys.readouterr().err
    assert (out / "plugin.safetensors").read_bytes() == first
    assert main(args + ["--resume"]) == 0  # the finished checkpoint is picked up
    assert main(args + ["--overwrite", "--seed", "1"]) == 0
    assert (out / "plugin.safetensors").read_bytes() != first


def test_files_get_the_usual_permissions(env, tmp_path):
    from anymc3d.io import atomic_write

    old = os.umask(0o022)
    try:
        p = bc.make_plugin(tmp_path / "p")
        assert oct((p / "plugin.safetensors").stat().st_mode & 0o777) == oct(0o644)
        assert oct((p / "plugin.json").stat().st_mode & 0o777) == oct(0o644)
        os.umask(0o027)
        with atomic_write(tmp_path / "x.txt") as tmp:
            tmp.write_text("x")
        assert (tmp_path / "x.txt").stat().st_mode & 0o777 == 0o640
        os.chmod(tmp_path / "x.txt", 0o600)  # a mode the user chose is kept on rewrite
        with atomic_write(tmp_path / "x.txt") as tmp:
            tmp.write_text("y")
        assert (tmp_path / "x.txt").stat().st_mode & 0o777 == 0o600
    finally:
        os.umask(old)


def test_demo_images_get_the_usual_permissions(tmp_path):
    from anymc3d.synthetic import make_task, write_task

    old = os.umask(0o022)
    try:
        write_task(make_task("lesion_binary", 4, seed=0, size=16), tmp_path / "d", seed=0)
    finally:
        os.umask(old)
    modes = {p.name: p.stat().st_mode & 0o777 for p in (tmp_path / "d").rglob("*") if p.is_file()}
    assert set(modes.values()) == {0o644}, modes
