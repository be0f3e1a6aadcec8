"""Readers (every format, geometry agreement in world space), one-line InputErrors, atomic writers."""
from __future__ import annotations

import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from anymc3d.errors import InputError
from anymc3d.io import atomic_write, read_volume, register_reader, write_nifti
from anymc3d.io.readers import _keep_locale
from anymc3d.volume import Volume

SHAPE = (5, 6, 4)
MARKER = (3, 1, 2)
# Non-identity, non-RAS (x->L, y->I, z->A: a permuted "LIA" grid), anisotropic, translated.
REF_AFFINE = np.array(
    [
        [-0.8, 0.0, 0.0, 10.0],
        [0.0, 0.0, 1.5, -20.0],
        [0.0, -2.0, 0.0, 30.0],
        [0.0, 0.0, 0.0, 1.0],
    ]
)
# The same geometry written by hand in ITK terms (LPS world; direction columns = index axes).
ITK_SPACING = (0.8, 2.0, 1.5)
ITK_DIRECTION = (1.0, 0.0, 0.0, 0.0, 0.0, -1.0, 0.0, -1.0, 0.0)  # row-major 3x3
ITK_ORIGIN = (-10.0, 20.0, 30.0)


def _ref_array() -> np.ndarray:
    a = (np.arange(np.prod(SHAPE)).reshape(SHAPE) % 50).astype(np.int16)
    a[MARKER] = 1000
    return a


def _itk_image(a: np.ndarray) -> sitk.Image:
    img = sitk.GetImageFromArray(a.transpose(2, 1, 0))  # sitk arrays are (z, y, x)
    img.SetSpacing(ITK_SPACING)
    img.SetDirection(ITK_DIRECTION)
    img.SetOrigin(ITK_ORIGIN)
    return img


def _world(affine: np.ndarray, ijk) -> np.ndarray:
    return (np.asarray(affine) @ np.r_[np.asarray(ijk, float), 1.0])[:3]


def _assert_same_world(vol: Volume, ref_array: np.ndarray, ref_affine: np.ndarray) -> None:
    """Every voxel of ``vol`` holds the reference value at the same world position."""
    assert vol.array.dtype == np.float32
    assert vol.array.size == ref_array.size
    idx = np.indices(vol.array.shape).reshape(3, -1)
    to_ref = np.linalg.inv(ref_affine) @ vol.affine
    ref_idx = to_ref[:3, :3] @ idx + to_ref[:3, 3:4]
    assert np.allclose(ref_idx, np.rint(ref_idx), atol=1e-4)
    ref_idx = np.rint(ref_idx).astype(int)
    np.testing.assert_array_equal(vol.array[tuple(idx)], ref_array[tuple(ref_idx)])
    marker = np.unravel_index(np.argmax(vol.array), vol.array.shape)
    np.testing.assert_allclose(_world(vol.affine, marker), _world(ref_affine, MARKER), atol=1e-4)


def test_nifti_keeps_file_affine(tmp_path: Path) -> None:
    a = _ref_array()
    p = tmp_path / "ref.nii.gz"
    nib.save(nib.Nifti1Image(a, REF_AFFINE), str(p))
    vol = read_volume(p)
    np.testing.assert_array_equal(vol.array, a)
    np.testing.assert_allclose(vol.affine, REF_AFFINE, atol=1e-5)
    assert vol.meta == {"path": str(p), "format": "nifti", "dtype": "int16"}


@pytest.mark.parametrize("suffix", [".nrrd", ".mha"])
def test_sitk_formats_convert_lps_to_ras(tmp_path: Path, suffix: str) -> None:
    a = _ref_array()
    p = tmp_path / f"ref{suffix}"
    img = _itk_image(a)
    sitk.WriteImage(img, str(p))
    vol = read_volume(p)
    np.testing.assert_array_equal(vol.array, a)
    np.testing.assert_allclose(vol.affine, REF_AFFINE, atol=1e-5)
    lps = np.array(img.TransformIndexToPhysicalPoint(tuple(int(i) for i in MARKER)))
    np.testing.assert_allclose(_world(vol.affine, MARKER), lps * [-1, -1, 1], atol=1e-5)
    _assert_same_world(vol, a, REF_AFFINE)


def _write_dicom_series(img: sitk.Image, folder: Path) -> None:
    folder.mkdir()
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    d = img.GetDirection()
    series_uid = "1.2.826.0.1.3680043.2.1125.1.424242"
    for k in range(img.GetDepth()):
        s = img[:, :, k]
        s.SetMetaData("0020|000e", series_uid)
        s.SetMetaData("0008|0060", "CT")
        s.SetMetaData("0020|0037", "\\".join(map(str, (d[0], d[3], d[6], d[1], d[4], d[7]))))
        s.SetMetaData("0020|0032", "\\".join(map(str, img.TransformIndexToPhysicalPoint((0, 0, k)))))
        s.SetMetaData("0020|0013", str(k + 1))
        s.SetMetaData("0018|0050", str(img.GetSpacing()[2]))
        writer.SetFileName(str(folder / f"slice{k:03d}.dcm"))
        with _keep_locale():  # GDCM's writer resets the C locale to "C" (later UTF-8 open() calls would fail)
            writer.Execute(s)


def test_dicom_series_world_coordinates_agree(tmp_path: Path) -> None:
    # REF geometry has det<0, which DICOM cannot store in slice order: GDCM re-sorts the slices.
    # The voxel order may therefore differ, but every world position must hold the same value.
    a = _ref_array()
    folder = tmp_path / "series"
    _write_dicom_series(_itk_image(a), folder)
    vol = read_volume(folder)
    assert vol.meta["format"] == "dicom" and vol.meta["dicom_n_files"] == SHAPE[2]
    _assert_same_world(vol, a, REF_AFFINE)


def test_npy_identity_affine_and_override(tmp_path: Path) -> None:
    a = _ref_array()
    p = tmp_path / "ref.npy"
    np.save(p, a)
    vol = read_volume(p)
    np.testing.assert_array_equal(vol.affine, np.eye(4))
    np.testing.assert_array_equal(vol.array, a)
    _assert_same_world(read_volume(p, affine=REF_AFFINE), a, REF_AFFINE)
    # 4D channels-first
    np.save(tmp_path / "c.npy", np.stack([a, -a]))
    assert read_volume(tmp_path / "c.npy").array.shape == (2, *SHAPE)


def test_nifti_4d_channels_last_becomes_channels_first(tmp_path: Path) -> None:
    a = np.random.default_rng(0).random((*SHAPE, 3)).astype(np.float32)
    nib.save(nib.Nifti1Image(a, REF_AFFINE), str(tmp_path / "c.nii"))
    vol = read_volume(tmp_path / "c.nii")
    np.testing.assert_array_equal(vol.array, np.moveaxis(a, -1, 0))


def _one_line_error(path: Path, fragment: str, **kw) -> None:
    with pytest.raises(InputError) as exc:
        read_volume(path, **kw)
    msg = str(exc.value)
    assert "\n" not in msg and str(path) in msg and fragment in msg, msg


def test_errors_are_one_line_and_name_the_file(tmp_path: Path) -> None:
    _one_line_error(tmp_path / "missing.nii.gz", "not found")
    (tmp_path / "x.png").write_bytes(b"\x89PNG")
    _one_line_error(tmp_path / "x.png", "unknown file type")
    for name in ("bad.nii.gz", "bad.nii", "bad.mha", "bad.nrrd", "bad.npy"):
        (tmp_path / name).write_bytes(b"this is not an image at all" * 10)
        _one_line_error(tmp_path / name, "cannot read")
    np.save(tmp_path / "flat.npy", np.zeros((4, 4)))
    _one_line_error(tmp_path / "flat.npy", "2 dimensions")
    np.save(tmp_path / "five.npy", np.zeros((2, 2, 2, 2, 2)))
    _one_line_error(tmp_path / "five.npy", "5 dimensions")
    np.save(tmp_path / "slice.npy", np.zeros((8, 8, 1)))
    _one_line_error(tmp_path / "slice.npy", "2D image")
    np.save(tmp_path / "empty.npy", np.zeros((0, 3, 3)))
    _one_line_error(tmp_path / "empty.npy", "empty")
    nan = np.ones((3, 3, 3), np.float32)
    nan[1, 1, 1] = np.nan
    np.save(tmp_path / "nan.npy", nan)
    _one_line_error(tmp_path / "nan.npy", "NaN")
    inf = np.ones((3, 3, 3), np.float32)
    inf[0, 0, 0] = np.inf
    nib.save(nib.Nifti1Image(inf, np.eye(4)), str(tmp_path / "inf.nii.gz"))
    _one_line_error(tmp_path / "inf.nii.gz", "1 Inf")
    (tmp_path / "empty_dir").mkdir()
    _one_line_error(tmp_path / "empty_dir", "without a DICOM series")
    with pytest.raises(ValueError):  # an override for a file that has its own geometry
        nib.save(nib.Nifti1Image(np.ones((3, 3, 3), np.float32), np.eye(4)), str(tmp_path / "ok.nii"))
        read_volume(tmp_path / "ok.nii", affine=np.eye(4))


def test_register_reader_plugs_in_a_format(tmp_path: Path) -> None:
    @register_reader(".fake3d", overwrite=True)
    def _read(path: Path) -> Volume:
        return Volume(np.full((2, 3, 4), 7, np.uint8), np.eye(4), {"format": "fake"})

    (tmp_path / "a.FAKE3D").write_text("x")
    vol = read_volume(tmp_path / "a.FAKE3D")
    assert vol.array.dtype == np.float32 and vol.meta["dtype"] == "uint8" and vol.meta["format"] == "fake"
    with pytest.raises(ValueError):
        register_reader(".fake3d", lambda p: vol)


def test_atomic_write_success_and_failure(tmp_path: Path) -> None:
    target = tmp_path / "sub" / "out.json"
    with atomic_write(target) as tmp:
        assert tmp.parent == target.parent and tmp.name.endswith("out.json") and tmp != target
        tmp.write_text("{}")
    assert target.read_text() == "{}"

    with pytest.raises(RuntimeError):
        with atomic_write(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("crash mid-write")
    assert target.read_text() == "{}"  # old content intact
    assert sorted(os.listdir(target.parent)) == ["out.json"]  # no temporary left

    fresh = tmp_path / "never.csv"
    with pytest.raises(KeyboardInterrupt):
        with atomic_write(fresh) as tmp:
            tmp.write_text("a,b")
            raise KeyboardInterrupt
    assert not fresh.exists() and os.listdir(tmp_path) == ["sub"]


def test_write_nifti_round_trip(tmp_path: Path) -> None:
    a = np.random.default_rng(1).random(SHAPE)  # float64 -> stored float32
    p = write_nifti(a, REF_AFFINE, tmp_path / "h.nii.gz")
    vol = read_volume(p)
    np.testing.assert_allclose(vol.array, a.astype(np.float32))
    np.testing.assert_allclose(vol.affine, REF_AFFINE, atol=1e-5)
    c = np.stack([a, 2 * a]).astype(np.float32)
    vol4 = read_volume(write_nifti(c, REF_AFFINE, tmp_path / "c.nii"))
    np.testing.assert_allclose(vol4.array, c)
    assert sorted(os.listdir(tmp_path)) == ["c.nii", "h.nii.gz"]
    with pytest.raises(InputError):
        write_nifti(a, REF_AFFINE, tmp_path / "h.png")


def _formats(tmp_path: Path) -> list[Path]:
    """The reference volume in every format with a header reader, plus 4D NIfTI, ITK and .npy inputs."""
    a = _ref_array()
    paths = [tmp_path / "ref.nii", tmp_path / "ref.nii.gz"]
    for p in paths:
        nib.save(nib.Nifti1Image(a, REF_AFFINE), str(p))
    for suffix in (".nrrd", ".mha"):
        sitk.WriteImage(_itk_image(a), str(tmp_path / f"ref{suffix}"))
        paths.append(tmp_path / f"ref{suffix}")
    np.save(tmp_path / "ref.npy", a)
    np.save(tmp_path / "c.npy", np.stack([a, -a, a]).astype(np.float32))
    nib.save(nib.Nifti1Image(np.stack([a, -a, a], -1).astype(np.float32), REF_AFFINE), str(tmp_path / "c.nii"))
    vec = sitk.Compose(*[_itk_image(a.astype(np.float32) * k) for k in (1, 2, 3)])
    sitk.WriteImage(vec, str(tmp_path / "c.mha"))
    return paths + [tmp_path / "ref.npy", tmp_path / "c.npy", tmp_path / "c.nii", tmp_path / "c.mha"]


def test_header_only_reads_agree_with_full_reads(tmp_path: Path) -> None:
    """``header_only=True``: the shape and affine a full read gives, and no voxel in memory."""
    for p in _formats(tmp_path):
        full, head = read_volume(p), read_volume(p, header_only=True)
        assert head.meta["header_only"] and "header_only" not in full.meta, p
        assert head.array.shape == full.array.shape, p
        np.testing.assert_allclose(head.affine, full.affine, atol=1e-6, err_msg=str(p))
        assert head.array.strides == (0,) * head.array.ndim and not head.array.flags.writeable, p


def test_dicom_series_header_only_reads_no_pixel_data(tmp_path: Path, monkeypatch) -> None:
    """A DICOM series folder checked from its headers: the full read's shape, affine and series, and the
    same refusals (a missing slice), without pydicom decoding a pixel."""
    from anymc3d.io.readers import dicom

    a = _ref_array()
    folder = tmp_path / "series"
    _write_dicom_series(_itk_image(a), folder)
    full = read_volume(folder)
    monkeypatch.setattr(dicom, "_pydicom_volume", lambda *a, **k: pytest.fail("the pixel data was read"))
    head = read_volume(folder, header_only=True)
    assert head.meta["header_only"] and head.meta["format"] == "dicom"
    assert head.array.shape == full.array.shape and head.array.strides == (0,) * head.array.ndim
    np.testing.assert_allclose(head.affine, full.affine, atol=1e-6)
    assert head.meta["dicom_series_uid"] == full.meta["dicom_series_uid"]
    assert head.meta["dicom_n_files"] == full.meta["dicom_n_files"] == SHAPE[2]
    sorted(folder.iterdir())[1].unlink()  # an inner slice missing: refused from the headers too
    with pytest.raises(InputError, match="uneven slice spacing.*--allow-gaps"):  # 3 files: the median is the gap
        read_volume(folder, header_only=True)


def test_header_only_refuses_what_the_header_shows_and_leaves_the_voxels(tmp_path: Path) -> None:
    a = _ref_array().astype(np.float32)
    big = tmp_path / "big.nii.gz"
    nib.save(nib.Nifti1Image(a, REF_AFFINE), str(big))
    for kw in ({}, {"header_only": True}):  # the same refusal from the header as from a full read
        with pytest.raises(InputError, match="declares"):
            read_volume(big, max_voxels=100, **kw)
    flat = tmp_path / "flat.nii"
    nib.save(nib.Nifti1Image(a[:, :, :1], REF_AFFINE), str(flat))
    with pytest.raises(InputError, match="2D image"):
        read_volume(flat, header_only=True)
    # NaN voxels: only a full read sees them
    a[1, 2, 3] = np.nan
    nan = tmp_path / "nan.nii.gz"
    nib.save(nib.Nifti1Image(a, REF_AFFINE), str(nan))
    assert read_volume(nan, header_only=True).array.shape == SHAPE
    with pytest.raises(InputError, match="1 NaN"):
        read_volume(nan)
