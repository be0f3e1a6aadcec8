"""Issue 27: one allocation guard before memory is taken (resampled grid, slice stacks, heatmaps), the aspect
rule, degenerate geometry and --assume-spacing, manifest ids, and careless manifests.

Each guard is checked twice: through the CLI (exit 2, one ``anymc3d: error: <file>[:row N]: ...`` line, nothing
written; the corpus cases of tests/badinput_corpus.py run the same way in test_bad_input.py) and through the
Python API (an ``InputError``).
"""
from __future__ import annotations

import csv
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
from anymc3d.io import MAX_ASPECT, read_volume, reset_reader_options, set_reader_options
from anymc3d.preprocess import PreprocessSpec, canonicalize, plan_spatial, to_slices
from anymc3d.volume import Volume

import badinput_corpus as bc

NEW = [e for e in bc.CORPUS if e.group in ("guard", "geometry") or e.name.startswith((
    "manifest_id_", "manifest_ids_", "manifest_image_", "manifest_semicolon_separated", "manifest_training_",
    "manifest_class_only"))]


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("guards")
    return {"plugin": bc.make_plugin(root / "plugin"), "image": bc.nifti(root / "good.nii.gz", bc.volume(0))}


@pytest.fixture(autouse=True)
def _fresh_reader_options():
    reset_reader_options()
    yield
    reset_reader_options()


def _one_error_line(capfd) -> str:
    cap = capfd.readouterr()
    assert "Traceback" not in cap.err + cap.out
    lines = cap.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("anymc3d: error: "), cap.err
    return lines[0][len("anymc3d: error: "):]


@pytest.mark.parametrize("entry", [e for e in NEW if e.kind == "error"], ids=lambda e: e.name)
def test_cli_refuses_in_one_line(entry, env, tmp_path, capfd):
    run = entry.build(tmp_path, env)
    capfd.readouterr()
    assert main(run.argv) == 2
    msg = _one_error_line(capfd)
    assert msg.startswith(run.file + (f":row {run.row}: " if run.row is not None else ": ")), msg
    for w in run.words:
        assert w in msg, (w, msg)
    assert not run.out.exists() or not any(run.out.iterdir())


# ------------------------------------------------------------------------------------------ allocation guard
def test_resampled_grid_is_refused_before_resampling():
    spec = PreprocessSpec(size=32, spacing=(1.0, 1.0, 1.0))
    with pytest.raises(InputError, match=r"^big\.nii: resampling its 40x40x40 mm voxels .* 1x2560x2560x2560 .*62\.5 GiB"
                                         r".*--max-voxels"):
        plan_spatial((64, 64, 64), np.diag([40.0, 40.0, 40.0, 1.0]), spec, "big.nii")
    # the same volume at 4 mm: 256^3 fits the default limit, and --max-voxels moves the limit
    assert plan_spatial((64, 64, 64), np.diag([4.0, 4.0, 4.0, 1.0]), spec, "ok.nii").canonical_shape == (256,) * 3
    set_reader_options(max_voxels=256**3 - 1)
    with pytest.raises(InputError, match="limit of 16,777,215"):
        plan_spatial((64, 64, 64), np.diag([4.0, 4.0, 4.0, 1.0]), spec, "ok.nii")
    with pytest.raises(InputError, match=r"3x256x256x256"):  # three CT windows: three values per voxel
        plan_spatial((64, 64, 64), np.diag([4.0, 4.0, 4.0, 1.0]), spec, "ok.nii", channels=3)


def test_slice_stack_counts_what_is_allocated():
    spec = PreprocessSpec(size=224, views=["axial", "coronal"])
    vol = Volume(np.zeros((4, 4, 30000), np.float32), np.eye(4), {"path": "thin.nii"})
    set_reader_options(max_voxels=10**8)
    # axial: 30000 slices of 224^2 (1.5e9 values); max_slices caps the stack, the coronal square does not
    with pytest.raises(InputError, match=r"^thin\.nii: the volume the model sees is 4x4x30000 voxels: .*7,500 times"):
        canonicalize(vol, spec)
    x = np.zeros((1, 40, 40, 3000), np.float32)  # 75x: passes the aspect rule
    with pytest.raises(InputError, match=r"axial slices .* 3000x1x224x224"):
        to_slices(x, spec, "axial", source="a.nii")
    capped = PreprocessSpec(size=224, views=["axial"], max_slices=32)
    assert to_slices(x, capped, "axial").shape == (32, 1, 224, 224)
    with pytest.raises(InputError, match=r"coronal slices .* 32x1x3000x3000"):  # max_slices caps S, not the 3000^2 square
        to_slices(x, PreprocessSpec(size=224, views=["coronal"], max_slices=32), "coronal", source="a.nii")


def test_aspect_rule_lets_real_scans_through():
    ct = PreprocessSpec(size=224, spacing=(1.0, 1.0, 1.0))
    r = plan_spatial((512, 512, 20), np.diag([0.7, 0.7, 5.0, 1.0]), ct, "ct.nii")
    assert r.canonical_shape == (358, 358, 100)
    plan_spatial((512, 512, 20), np.diag([0.7, 0.7, 5.0, 1.0]), PreprocessSpec(), "ct.nii")  # 25.6x, no resampling
    plan_spatial((512, 512, 2), np.eye(4), PreprocessSpec(), "two.nii")  # 256x: the limit itself passes
    with pytest.raises(InputError, match=f"more than {MAX_ASPECT}x"):
        plan_spatial((513, 512, 2), np.eye(4), PreprocessSpec(), "two.nii")


def test_heatmap_guard(env, tmp_path, capfd):
    from anymc3d.explain.heatmap import Explainer, check_heatmaps
    from anymc3d.predict import load

    rec = plan_spatial((12, 12, 10), np.eye(4), PreprocessSpec(), "h.nii")
    check_heatmaps("h.nii", rec, 1)
    set_reader_options(max_voxels=2 * 1440 - 1)
    with pytest.raises(InputError, match=r"^h\.nii: its heatmaps .* 2x12x12x10"):
        check_heatmaps("h.nii", rec, 2)
    reset_reader_options()
    ex = Explainer(load(env["plugin"], weights="random", device="cpu"))
    assert ex.explain(env["image"]).maps["present"].shape == bc.SHAPE
    set_reader_options(max_voxels=1500)  # the volume (1,440) passes, its 10x32x32 slices do not
    with pytest.raises(InputError, match="axial slices"):
        ex.explain(env["image"])
    reset_reader_options()
    # CLI: predict --heatmaps is refused by the input check, before anything is written
    out = tmp_path / "o"
    capfd.readouterr()
    assert main(["predict", str(env["plugin"]), str(env["image"]), "--out", str(out), "--weights", "random",
                 "--heatmaps", "--max-voxels", "1500"]) == 2
    assert "axial slices" in _one_error_line(capfd) and not out.exists()


def test_input_check_plans_every_volume_before_writing(env, tmp_path, capfd):
    """The second volume is too thin: with the input check, the first is not written either."""
    good = bc.nifti(tmp_path / "a.nii.gz", bc.volume(0))
    thin = bc.thin_nifti(tmp_path / "b.nii.gz", depth=4000)
    out = tmp_path / "out"
    capfd.readouterr()
    assert main(["predict", str(env["plugin"]), str(good), str(thin), "--out", str(out), "--weights", "random"]) == 2
    assert _one_error_line(capfd).startswith(f"{thin}: ") and not out.exists()


def test_voxel_problems_stop_the_run_at_that_volume(env, tmp_path, capfd):
    """The input check reads headers only: a NaN volume passes it and stops the run, with the one line,
    when it is read for its prediction (nothing of its own is written)."""
    good = bc.nifti(tmp_path / "a.nii.gz", bc.volume(0))
    arr = bc.volume(1)
    arr[2, 3, 4] = np.nan
    nan = bc.nifti(tmp_path / "b.nii.gz", arr)
    out = tmp_path / "out"
    capfd.readouterr()
    assert main(["predict", str(env["plugin"]), str(good), str(nan), "--out", str(out), "--weights", "random"]) == 2
    line = _one_error_line(capfd)
    assert line.startswith(f"{nan}: ") and "NaN" in line
    assert not (out / "b.json").exists()


def test_python_api_raises(env, tmp_path):
    from anymc3d.predict import load

    thin = bc.thin_nifti(tmp_path / "thin.nii.gz", depth=4000)
    with pytest.raises(InputError, match=r"4x4x4000 voxels: one axis is 1,000 times"):
        load(env["plugin"], weights="random", device="cpu").predict(str(thin))


def test_refusal_is_cheap(tmp_path):
    """Peak RSS and time of refusing the thin volume and the resampling case in a child process."""
    thin = bc.thin_nifti(tmp_path / "thin.nii.gz")
    coarse = bc.nifti(tmp_path / "coarse.nii.gz", bc.volume(0, shape=(64, 64, 64)),
                      affine=np.diag([40.0, 40.0, 40.0, 1.0]))
    code = textwrap.dedent(f"""
        import json, time
        from anymc3d.errors import InputError
        from anymc3d.io import read_volume
        from anymc3d.preprocess import PreprocessSpec, canonicalize
        out = {{}}
        for name, path, spec in (("thin", {str(thin)!r}, PreprocessSpec(size=224)),
                                 ("coarse", {str(coarse)!r}, PreprocessSpec(size=224, spacing=(1.0, 1.0, 1.0)))):
            t0 = time.perf_counter()
            try:
                canonicalize(read_volume(path), spec)
                out[name] = "accepted"
            except InputError as exc:
                out[name] = str(exc)
            out[name + "_s"] = time.perf_counter() - t0
        status = dict(line.split(":", 1) for line in open("/proc/self/status") if ":" in line)
        out["hwm_kb"] = int(status["VmHWM"].split()[0])
        print(json.dumps(out))
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert "times longer" in res["thin"] and "2560x2560x2560" in res["coarse"], res
    assert res["hwm_kb"] / 1024 < 800, res  # torch + the 8 M-voxel volume; the refused arrays would be 62+ GiB


# ------------------------------------------------------------------------------------------ geometry
def test_degenerate_geometry_python_api(tmp_path):
    p = bc.nifti_with_header(tmp_path / "z.nii", bc.volume(5), pixdim=(0, 0, 0), qform_code=0, sform_code=0)
    with pytest.raises(InputError, match=r"zero voxel size \(0x0x0 mm\).*--assume-spacing"):
        read_volume(p)
    v = read_volume(p, assume_spacing=(0.5, 0.5, 2))
    assert np.allclose(v.affine, np.diag([0.5, 0.5, 2.0, 1.0])) and "assumed spacing 0.5x0.5x2" in v.meta["warnings"][0]
    nan = bc.nifti_with_header(tmp_path / "n.nii", bc.volume(5), pixdim=(float("nan"), 1, 1), qform_code=1,
                               sform_code=0)
    with pytest.raises(InputError, match="non-finite voxel size"):
        read_volume(nan)
    # an sform defines the geometry: pixdim does not matter then
    ok = bc.nifti_with_header(tmp_path / "s.nii", bc.volume(5), pixdim=(0, 0, 0), qform_code=0, sform_code=2)
    assert np.allclose(read_volume(ok).affine, np.eye(4))
    sing = bc.nifti_with_header(tmp_path / "sing.nii", bc.volume(5), qform_code=0, sform_code=1,
                                srow_x=[1.0, 1.0, 0, 0], srow_y=[1.0, 1.0, 0, 0], srow_z=[0, 0, 1.0, 0])
    with pytest.raises(InputError, match="collinear"):
        read_volume(sing)
    np.save(tmp_path / "a.npy", bc.volume(0))
    assert np.allclose(read_volume(tmp_path / "a.npy").affine, np.eye(4))  # .npy: identity, no warning
    assert "warnings" not in read_volume(tmp_path / "a.npy").meta


def test_dicom_without_pixel_spacing(tmp_path):
    import pydicom

    d = bc.dicom_series(tmp_path / "s", n=6)
    for f in sorted(d.iterdir()):
        ds = pydicom.dcmread(str(f))
        del ds.PixelSpacing
        ds.save_as(str(f))
    with pytest.raises(InputError, match="no PixelSpacing"):
        read_volume(d)
    v = read_volume(d, assume_spacing=0.8)
    assert np.allclose(v.spacing, (0.8, 0.8, 0.8))


def test_assume_spacing_reaches_predictions(env, tmp_path, capsys):
    p = bc.nifti_with_header(tmp_path / "z.nii", bc.volume(5), pixdim=(0, 0, 0), qform_code=0, sform_code=0)
    out = tmp_path / "out"
    assert main(["predict", str(env["plugin"]), str(p), "--out", str(out), "--weights", "random",
                 "--assume-spacing", "2"]) == 0
    res = json.loads((out / "z.json").read_text())
    assert len(res["warnings"]) == 1 and "assumed spacing 2x2x2 mm" in res["warnings"][0]
    with pytest.raises(SystemExit):  # argparse refuses a zero spacing
        main(["predict", str(env["plugin"]), str(p), "--out", str(tmp_path / "o2"), "--weights", "random",
              "--assume-spacing", "1,0,1"])
    assert "positive" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------ manifests
def _manifest(tmp_path: Path, ids) -> Path:
    m = bc.binary_dataset(tmp_path / "d", n=len(ids))
    rows = list(csv.reader(m.open()))
    for r, i in zip(rows[1:], ids):
        r[0] = i
    return bc.write_manifest(m, rows[0], rows[1:])


def test_common_ids_are_kept(tmp_path):
    ids = ["case001", "sub-01_ses-1", "1.2.840.113619.2.55", "Patient 7"]
    assert [c.id for c in load_manifest(_manifest(tmp_path, ids)).cases] == ids


@pytest.mark.parametrize("bad", ["../x", "a/b", "a\\b", "..", ".hidden", "x\x00y", "tab\there", "Müller", "a..b"])
def test_unsafe_ids_are_refused(tmp_path, bad):
    with pytest.raises(InputError, match=r"manifest\.csv:row 2: id "):
        load_manifest(_manifest(tmp_path, [bad, "c1", "c2", "c3"]))


def test_ids_from_file_names_stay(env, tmp_path):
    img = bc.nifti(tmp_path / "scan (1).nii.gz", bc.volume(0))
    out = tmp_path / "out"
    assert main(["predict", str(env["plugin"]), str(img), "--out", str(out), "--weights", "random"]) == 0
    assert (out / "scan (1).json").is_file()
    from anymc3d.batch_predict import PluginJob, predict_to_folder
    from anymc3d.predict import load

    with pytest.raises(InputError, match="cannot name a file"):  # the Python API's ids are checked too
        predict_to_folder(PluginJob(load(env["plugin"], weights="random", device="cpu")), [("../x", str(img))],
                          tmp_path / "o2")
    assert not (tmp_path / "x.json").exists() and not (tmp_path / "o2").exists()


def test_training_label_checks_python_api(tmp_path):
    from anymc3d.data import check_training_labels
    from anymc3d.training.run import assign_splits

    t = load_manifest(bc.binary_dataset(tmp_path / "a", n=8, labels=[0, 0, 0, 0, 0, 1, 0, 1]))
    with pytest.raises(InputError, match="both labels"):
        check_training_labels(t, assign_splits(t, 0))
    ok = load_manifest(bc.binary_dataset(tmp_path / "b", n=8))
    check_training_labels(ok, assign_splits(ok, 0))
