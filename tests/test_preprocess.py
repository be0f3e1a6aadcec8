"""Spec round trip, intensity modes, view axes, and the exact slice -> input-grid inversion."""
from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from anymc3d.errors import InputError
from anymc3d.io import read_volume, write_nifti
from anymc3d.preprocess import (
    DEFAULT_CT_WINDOWS,
    VIEW_AXIS,
    VIEWS,
    PreprocessSpec,
    SpatialRecord,
    canonical_to_input,
    canonicalize,
    canonicalize_mask,
    slices_to_canonical,
    to_slices,
)
from anymc3d.volume import Volume

# An LPS-like, permuted, anisotropic, oblique-free input grid: x->L, y->I, z->P.
LPS_AFFINE = np.array(
    [
        [-0.9, 0.0, 0.0, 40.0],
        [0.0, 0.0, -1.3, 25.0],
        [0.0, -2.1, 0.0, -12.0],
        [0.0, 0.0, 0.0, 1.0],
    ]
)
IN_SHAPE = (9, 7, 11)
MARKER = (2, 5, 8)


def _marker_volume(shape=IN_SHAPE, marker=MARKER, affine=LPS_AFFINE, path="img.nii.gz") -> Volume:
    a = np.zeros(shape, np.float32)
    a[marker] = 1.0
    return Volume(a, affine.copy(), {"path": path})


def _world(affine, ijk) -> np.ndarray:
    return (np.asarray(affine) @ np.r_[np.asarray(ijk, float), 1.0])[:3]


@pytest.mark.parametrize(
    "spec",
    [
        PreprocessSpec(),
        PreprocessSpec(intensity="ct", windows=["lung", (-100, 300)], spacing=(0.8, 0.8, None), views=["axial", "sagittal"]),
        PreprocessSpec(orientation=None, intensity="mri", clip_percentiles=(1, 99), size=112, max_slices=64),
        PreprocessSpec(intensity="fixed", scale=255, views=list(VIEWS)),
    ],
)
def test_spec_json_round_trip(spec: PreprocessSpec) -> None:
    text = json.dumps(spec.to_dict())
    back = PreprocessSpec.from_dict(json.loads(text))
    assert back == spec and json.dumps(back.to_dict()) == text


def test_spec_defaults_and_validation() -> None:
    assert PreprocessSpec(intensity="ct").windows == DEFAULT_CT_WINDOWS
    assert PreprocessSpec(intensity="ct", windows="head").out_channels() == 3
    for bad in ({"intensity": "foo"}, {"views": ["top"]}, {"windows": [(0, 1)]}, {"size": 0}, {"orientation": "XYZ"}):
        with pytest.raises(ValueError):
            PreprocessSpec(**bad)
    with pytest.raises(ValueError):
        PreprocessSpec.from_dict({**PreprocessSpec().to_dict(), "surprise": 1})


def test_ct_windows_one_channel_each() -> None:
    hu = np.linspace(-1200, 1200, 4 * 4 * 4, dtype=np.float32).reshape(4, 4, 4)
    hu[0, 0, 0] = 0.0
    out, _ = canonicalize(Volume(hu, np.eye(4), {}), PreprocessSpec(intensity="ct"))
    assert out.shape == (3, 4, 4, 4) and out.dtype == np.float32
    assert out.min() == 0.0 and out.max() == 1.0
    np.testing.assert_allclose(out[:, 0, 0, 0], [1000 / 2000, 150 / 400, 1000 / 1400], rtol=1e-6)
    two, _ = canonicalize(Volume(np.stack([hu, hu]), np.eye(4), {}), PreprocessSpec(intensity="ct", windows="brain"))
    assert two.shape == (2, 4, 4, 4)


def test_other_intensity_modes() -> None:
    rng = np.random.default_rng(0)
    a = rng.normal(100, 20, (6, 6, 6)).astype(np.float32)
    a[:2] = 0  # background
    mm, _ = canonicalize(Volume(a, np.eye(4), {}), PreprocessSpec(intensity="minmax"))
    assert mm.min() == 0 and mm.max() == 1
    mri, _ = canonicalize(Volume(a, np.eye(4), {}), PreprocessSpec(intensity="mri"))
    assert np.all(mri[0, :2] == 0) and abs(mri[0, 2:].mean() - 0.5) < 1e-3 and mri.min() > -0.5 and mri.max() < 1.5
    fx, _ = canonicalize(Volume(np.full((3, 3, 3), 255, np.float32), np.eye(4), {}), PreprocessSpec(intensity="fixed"))
    assert np.all(fx == 1.0)


def test_views_cut_along_the_right_axes() -> None:
    a = np.zeros((6, 6, 6), np.float32)
    a[1, 2, 3] = 1.0
    spec = PreprocessSpec(intensity="none", size=6)
    canon, record = canonicalize(Volume(a, np.eye(4), {}), spec)  # already RAS: untouched
    assert record.ornt is None and record.resample_ratio is None
    expected = {"axial": (3, (1, 2)), "coronal": (2, (1, 3)), "sagittal": (1, (2, 3))}
    for view, (k, (r, c)) in expected.items():
        s = to_slices(canon, spec, view)
        assert s.shape == (6, 1, 6, 6)
        assert torch.nonzero(s).tolist() == [[k, 0, r, c]], view
        # torch input (as after augmentation) gives the same slices
        torch.testing.assert_close(to_slices(torch.from_numpy(canon), spec, view), s)


def test_neighbours_give_each_slice_its_neighbours_as_channels() -> None:
    """2.5D: channel 1 is the slice, channels 0 and 2 the slices before and after (ends repeat), in
    every view and after max_slices; masks stay one channel; CT windows refuse it; JSON round trip."""
    a = np.random.default_rng(0).random((5, 6, 7)).astype(np.float32)
    for view in ("axial", "coronal", "sagittal"):
        for max_slices in (None, 4):
            plain = to_slices(a, PreprocessSpec(intensity="none", size=8, max_slices=max_slices), view)
            spec = PreprocessSpec(intensity="none", size=8, max_slices=max_slices, neighbours=True)
            s = to_slices(a, spec, view)
            n = plain.shape[0]
            assert s.shape == (n, 3, 8, 8), view
            torch.testing.assert_close(s[:, 1:2], plain)
            torch.testing.assert_close(s[1:, 0:1], plain[:-1])
            torch.testing.assert_close(s[:-1, 2:3], plain[1:])
            torch.testing.assert_close(s[0, 0], plain[0, 0])
            torch.testing.assert_close(s[-1, 2], plain[-1, 0])
            assert to_slices(a > 0.5, spec, view, mode="nearest").shape == (n, 1, 8, 8)
    spec = PreprocessSpec(intensity="none", size=8, neighbours=True)
    assert PreprocessSpec.from_dict(spec.to_dict()) == spec and "neighbours" not in PreprocessSpec().to_dict()
    assert spec.slice_channels(1) == 3 and PreprocessSpec().slice_channels(1) == 1
    with pytest.raises(ValueError, match="CT windows"):
        PreprocessSpec(intensity="ct", neighbours=True)


def test_train_refuses_neighbours_with_ct_windows_in_one_line(binary_manifest, tmp_path, capsys) -> None:
    from anymc3d.cli import main

    out = tmp_path / "ct_nb"
    assert main(["train", str(binary_manifest), "--out", str(out), "--intensity", "ct", "--neighbours",
                 "--no-plan", "--epochs", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"anymc3d: error: {binary_manifest}: --neighbours:"), err
    assert not out.exists()


def test_pad_square_and_resize_and_max_slices() -> None:
    spec = PreprocessSpec(intensity="none", size=8, max_slices=4)
    x = torch.ones(2, 4, 8, 10)
    s = to_slices(x, spec, "axial")  # slices (x, y) = 4 x 8, padded to 8 x 8 centred
    assert s.shape == (4, 2, 8, 8)
    assert torch.all(s[:, :, 2:6, :] == 1) and torch.all(s[:, :, :2] == 0) and torch.all(s[:, :, 6:] == 0)
    mask = to_slices(torch.ones(4, 8, 10, dtype=torch.uint8), spec, "coronal", mode="nearest")
    assert mask.shape == (4, 1, 8, 8) and set(mask.unique().tolist()) <= {0.0, 1.0}


def test_canonical_is_ras_and_world_preserved() -> None:
    vol = _marker_volume()
    canon, rec = canonicalize(vol, PreprocessSpec(intensity="none"))
    assert nib.aff2axcodes(rec.canonical_affine) == ("R", "A", "S")
    assert canon.shape[1:] == rec.canonical_shape == (9, 11, 7)
    idx = np.unravel_index(np.argmax(canon[0]), rec.canonical_shape)
    np.testing.assert_allclose(_world(rec.canonical_affine, idx), _world(LPS_AFFINE, MARKER), atol=1e-6)


@pytest.mark.parametrize("view", VIEWS)
def test_marker_round_trip_exact_grid(view: str, tmp_path: Path) -> None:
    vol = _marker_volume()
    spec = PreprocessSpec(intensity="minmax", size=16, views=[view])
    canon, record = canonicalize(vol, spec)  # the prediction path (runtime.batching: prepare_case, slice_streams)
    maps = to_slices(canon, spec, view)[:, 0]  # (S, size, size) "heatmap"
    canon = slices_to_canonical(maps, spec, view, record)
    assert canon.shape == record.canonical_shape
    back = canonical_to_input(canon, record)
    assert back.shape == IN_SHAPE
    assert np.unravel_index(np.argmax(back), back.shape) == MARKER
    # written with the input affine it overlays the input file exactly
    out = read_volume(write_nifti(back, record.input_affine, tmp_path / "heat.nii.gz"))
    np.testing.assert_allclose(out.affine, LPS_AFFINE, atol=1e-5)
    assert np.unravel_index(np.argmax(out.array), out.array.shape) == MARKER


@pytest.mark.parametrize("view", VIEWS)
def test_round_trip_with_resampling_and_max_slices(view: str) -> None:
    # a smooth blob survives linear resampling; its peak must come back to the same voxel
    g = np.stack(np.meshgrid(*[np.arange(n) for n in IN_SHAPE], indexing="ij"))
    d2 = sum(((g[i] - MARKER[i]) * abs(LPS_AFFINE[:3, i]).sum()) ** 2 for i in range(3))
    vol = Volume(np.exp(-d2 / (2 * 2.5**2)).astype(np.float32), LPS_AFFINE.copy(), {"path": "blob.nii"})
    spec = PreprocessSpec(intensity="none", spacing=(1.5, 1.0, 1.7), size=24, max_slices=6, views=[view])
    canon, rec = canonicalize(vol, spec)
    slices = to_slices(canon, spec, view)
    assert rec.resample_ratio is not None
    np.testing.assert_allclose(np.sqrt((rec.canonical_affine[:3, :3] ** 2).sum(0)), [1.5, 1.0, 1.7])
    n_view = rec.canonical_shape[VIEW_AXIS[view]]  # x: 5, y: 14, z: 9 canonical voxels
    assert slices.shape[0] == min(n_view, 6)
    back = canonical_to_input(slices_to_canonical(slices[:, 0], spec, view, rec), rec)
    assert back.shape == IN_SHAPE
    assert np.unravel_index(np.argmax(back), back.shape) == MARKER
    rec2 = SpatialRecord.from_dict(json.loads(json.dumps(rec.to_dict())))
    np.testing.assert_allclose(canonical_to_input(np.zeros(rec.canonical_shape), rec2), 0)
    assert rec2.canonical_shape == rec.canonical_shape


def test_mask_follows_image_and_mismatch_names_both_files() -> None:
    img = _marker_volume(path="case1_img.nii.gz")
    spec = PreprocessSpec(intensity="none", spacing=(1.0, 1.0, 1.0))
    canon, rec = canonicalize(img, spec)
    m = np.zeros(IN_SHAPE, np.float32)
    m[MARKER] = 3
    lab = canonicalize_mask(Volume(m, LPS_AFFINE.copy(), {"path": "case1_mask.nii.gz"}), spec, rec)
    assert lab.dtype == np.uint8 and lab.shape == rec.canonical_shape and set(np.unique(lab)) <= {0, 3}
    assert lab[np.unravel_index(np.argmax(canon[0]), lab.shape)] == 3  # label sits where the image marker went
    with pytest.raises(InputError, match=r"case1_mask.*case1_img"):
        canonicalize_mask(Volume(np.zeros((9, 7, 10)), LPS_AFFINE, {"path": "case1_mask.nii.gz"}), spec, rec)
    shifted = LPS_AFFINE.copy()
    shifted[0, 3] += 0.5
    with pytest.raises(InputError, match=r"case1_mask.*affine.*case1_img"):
        canonicalize_mask(Volume(m, shifted, {"path": "case1_mask.nii.gz"}), spec, rec)
