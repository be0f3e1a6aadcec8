"""Tests of the synthetic lesion phantoms (tiny sizes; the whole file runs in a few seconds)."""
from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from scipy.ndimage import binary_dilation

from anymc3d.errors import InputError
from anymc3d.synthetic import ANATOMY_LABELS, TASKS, make_task, task_knobs, write_task

S = 24  # tiny grid for speed


@pytest.fixture(scope="module")
def binary():
    return make_task("lesion_binary", 12, seed=3, size=S)


def _ring_mean(img, mask, organ_map, code):
    """Mean intensity of the organ in a shell around the lesion (excluding the lesion's soft edge)."""
    m = mask.astype(bool)
    near = binary_dilation(m, iterations=5) & ~binary_dilation(m, iterations=2) & (organ_map == code)
    if near.sum() < 5:
        near = (organ_map == code) & ~binary_dilation(m, iterations=2)
    return float(img[near].mean())


def test_registry_and_knobs():
    assert set(TASKS) == {"lesion_binary", "lesion_location", "lesion_types", "elongated", "t2_only"}
    for name in TASKS:
        k = task_knobs(name)
        assert {"size", "spacing", "noise", "contrast"} <= set(k)
    with pytest.raises(InputError):
        make_task("nope", 4)
    with pytest.raises(InputError):
        make_task("lesion_binary", 4, size=S, not_a_knob=1)
    with pytest.raises(InputError):
        make_task("lesion_binary", 0, size=S)
    with pytest.raises(InputError):
        make_task("lesion_binary", 4, size=8)


def test_determinism_and_seed_difference(binary):
    again = make_task("lesion_binary", 12, seed=3, size=S)
    assert np.array_equal(binary.labels, again.labels)
    for a, b in zip(binary.images["image"], again.images["image"]):
        assert a.dtype == np.float32 and a.shape == (S, S, S)
        assert np.array_equal(a, b)
    for a, b in zip(binary.masks, again.masks):
        assert np.array_equal(a, b)
    other = make_task("lesion_binary", 12, seed=4, size=S)
    assert not np.array_equal(binary.images["image"][0], other.images["image"][0])
    # cases within one dataset differ too (anatomy jitter, not only noise)
    assert not np.array_equal(binary.anatomy[0], binary.anatomy[1]) or not np.array_equal(
        binary.anatomy[1], binary.anatomy[2])


def test_binary_balance_and_masks(binary):
    assert binary.task_type == "binary" and binary.intensity == "ct"
    assert binary.labels.shape == (12,) and binary.labels.sum() == 6
    body_codes = [v for k, v in ANATOMY_LABELS.items() if k != "background"]
    for y, m, anat in zip(binary.labels, binary.masks, binary.anatomy):
        assert m.dtype == np.uint8 and m.shape == (S, S, S)
        if y:
            assert m.sum() > 0
            assert np.isin(anat[m > 0], body_codes).all()
            assert (anat[m > 0] == ANATOMY_LABELS["liver"]).all()
        else:
            assert m.sum() == 0
    p = make_task("lesion_binary", 10, seed=0, size=S, prevalence=0.3)
    assert p.labels.sum() == 3


def test_anatomy_hu_ranges(binary):
    img, anat = binary.images["image"][0], binary.anatomy[0]
    assert abs(np.median(img[anat == 0]) + 1000) < 20
    assert abs(np.median(img[anat == ANATOMY_LABELS["liver"]]) - 60) < 25
    assert np.median(img[anat == ANATOMY_LABELS["spine"]]) > 300
    assert np.median(img[anat == ANATOMY_LABELS["fat"]]) < -30


@pytest.mark.parametrize("contrast", [-80.0, 80.0])
def test_lesion_visible_with_contrast(contrast):
    ds = make_task("lesion_binary", 6, seed=1, size=32, contrast=contrast, prevalence=1.0, noise=5.0,
                   lesion_radius=3.5)
    liver = ANATOMY_LABELS["liver"]
    for img, m, anat in zip(ds.images["image"], ds.masks, ds.anatomy):
        diff = float(img[m > 0].mean()) - _ring_mean(img, m, anat, liver)
        assert np.sign(diff) == np.sign(contrast)
        assert 0.5 * abs(contrast) < abs(diff) < 1.3 * abs(contrast), diff


def test_location_multiclass():
    ds = make_task("lesion_location", 9, seed=2, size=S)
    assert ds.task_type == "multiclass"
    assert ds.label_names == ["liver", "left_kidney", "right_kidney"]
    assert np.bincount(ds.labels, minlength=3).tolist() == [3, 3, 3]
    for y, m, anat in zip(ds.labels, ds.masks, ds.anatomy):
        assert m.sum() > 0
        assert (anat[m > 0] == ANATOMY_LABELS[ds.label_names[y]]).all()
    # left kidney is at +x (RAS: patient's left), right kidney at -x
    for y, meta in zip(ds.labels, ds.meta):
        x = meta["lesions"][0]["centre_vox"][0]
        if ds.label_names[y] == "left_kidney":
            assert x > S / 2
        elif ds.label_names[y] == "right_kidney":
            assert x < S / 2


def test_types_multilabel():
    ds = make_task("lesion_types", 16, seed=0, size=32)
    assert ds.task_type == "multilabel" and ds.label_names == ["hypodense", "hyperdense", "calcified"]
    assert ds.labels.shape == (16, 3) and set(np.unique(ds.labels)) <= {0, 1}
    assert ds.labels.sum(axis=0).tolist() == [8, 8, 8]
    for row, m, meta in zip(ds.labels, ds.masks, ds.meta):
        assert len(meta["lesions"]) == int(row.sum())
        assert (m.sum() > 0) == bool(row.any())
        assert sorted(les["type"] for les in meta["lesions"]) == sorted(
            n for n, on in zip(ds.label_names, row) if on)


def test_elongated_longer_along_z():
    ds = make_task("elongated", 8, seed=5, size=32, noise=0.0)
    assert ds.label_names == ["round", "elongated"] and ds.labels.sum() == 4
    for y, m in zip(ds.labels, ds.masks):
        idx = np.argwhere(m > 0)
        ext = idx.max(axis=0) - idx.min(axis=0) + 1
        if y:
            assert ext[2] >= 1.6 * max(ext[0], ext[1]), ext
        else:
            assert ext[2] <= 1.3 * max(ext[0], ext[1]), ext


def test_t2_only_visible_only_in_t2():
    ds = make_task("t2_only", 6, seed=0, size=32, prevalence=1.0, noise=5.0)
    assert ds.intensity == "mri" and set(ds.images) == {"t1", "t2"}
    liver = ANATOMY_LABELS["liver"]
    contrast = task_knobs("t2_only")["contrast"]
    for t1, t2, m, anat in zip(ds.images["t1"], ds.images["t2"], ds.masks, ds.anatomy):
        assert m.sum() > 0 and t1.min() >= 0 and t2.min() >= 0
        d1 = float(t1[m > 0].mean()) - _ring_mean(t1, m, anat, liver)
        d2 = float(t2[m > 0].mean()) - _ring_mean(t2, m, anat, liver)
        assert abs(d1) < 0.15 * contrast, d1
        assert d2 > 0.5 * contrast, d2
        # same anatomy, different contrasts
        assert not np.allclose(t1, t2)


def test_anisotropic_spacing_affine():
    ds = make_task("lesion_binary", 2, seed=0, size=(S, S, 16), spacing=(1.0, 1.0, 2.0), prevalence=1.0)
    assert ds.images["image"][0].shape == (S, S, 16)
    assert np.allclose(np.diag(ds.affine)[:3], [1.0, 1.0, 2.0])
    assert np.any(ds.affine[:3, 3] != 0)
    semi = ds.meta[0]["lesions"][0]["semi_axes_vox"]
    assert semi[2] == pytest.approx(semi[0] / 2.0)  # round in mm -> half as many voxels along z


def test_write_task_binary(tmp_path, binary):
    nib = pytest.importorskip("nibabel")
    manifest = write_task(binary, tmp_path / "bin")
    assert manifest.name == "manifest.csv"
    rows = list(csv.DictReader(open(manifest)))
    assert len(rows) == len(binary)
    assert set(rows[0]) == {"id", "image", "label", "mask", "split"}
    assert {r["split"] for r in rows} == {"train", "val", "test"}
    # stratified: both classes in train
    assert {r["label"] for r in rows if r["split"] == "train"} == {"0", "1"}
    for i, r in enumerate(rows[:3]):
        for col in ("image", "mask"):
            p = manifest.parent / r[col]
            assert p.exists()
            img = nib.load(str(p))
            assert np.allclose(img.affine, binary.affine)
        arr = np.asarray(nib.load(str(manifest.parent / r["image"])).dataobj)
        assert np.array_equal(arr, binary.images["image"][i])
        m = np.asarray(nib.load(str(manifest.parent / r["mask"])).dataobj)
        assert np.array_equal(m, binary.masks[i])
        assert int(r["label"]) == int(binary.labels[i])
    spec = json.loads((manifest.parent / "task.json").read_text())
    assert spec["task"] == "lesion_binary" and spec["task_type"] == "binary"
    assert spec["label_columns"] == ["label"] and spec["image_columns"] == ["image"]
    assert spec["mask_column"] == "mask" and spec["intensity"] == "ct"
    assert not [p for p in (manifest.parent).rglob(".*")]  # no temp files left behind


def test_write_task_multi(tmp_path):
    ds = make_task("t2_only", 4, seed=0, size=S)
    manifest = write_task(ds, tmp_path / "t2")
    rows = list(csv.DictReader(open(manifest)))
    assert set(rows[0]) == {"id", "t1", "t2", "label", "mask", "split"}
    for r in rows:
        for col in ("t1", "t2", "mask"):
            assert (manifest.parent / r[col]).exists()
    spec = json.loads((manifest.parent / "task.json").read_text())
    assert spec["image_columns"] == ["t1", "t2"] and spec["intensity"] == "mri"

    ml = make_task("lesion_types", 5, seed=0, size=S)
    rows = list(csv.DictReader(open(write_task(ml, tmp_path / "ml"))))
    assert set(rows[0]) == {"id", "image", "hypodense", "hyperdense", "calcified", "mask", "split"}
    assert all(r[c] in ("0", "1") for r in rows for c in ml.label_names)

    mc = make_task("lesion_location", 6, seed=0, size=S)
    rows = list(csv.DictReader(open(write_task(mc, tmp_path / "mc"))))
    assert {r["label"] for r in rows} == set(mc.label_names)
