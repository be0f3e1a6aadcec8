"""The bad-input corpus of issue 17: every file is generated (nothing binary is committed).

Each entry of :data:`CORPUS` is one careless-user mistake: ``build(tmp, env)`` writes the bad
input(s) under ``tmp`` and returns a :class:`Run` — the ``anymc3d`` argv, the file the message must
name (``<file>[:row N]``), words the cause must contain, and the output folder that must stay
empty (or unchanged). ``kind`` is ``"error"`` (exit 2, one ``anymc3d: error:`` line) or
``"warning"`` (exit 0, one ``anymc3d: warning:`` line, the prediction written).

``env`` holds what several cases share: ``plugin`` (a tiny random-weight plugin, predict with
``--weights random``) and ``dataset`` (a function making a tiny binary manifest).
Also used by ``tests/test_fuzz.py`` and ``benchmarks/fuzz/run.py`` for their valid seed files.
"""
from __future__ import annotations

import csv
import gzip
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import nibabel as nib
import numpy as np

SHAPE = (12, 12, 10)
AFFINE = np.diag([1.5, 1.5, 2.0, 1.0])
SIZE = "32"
SERIES_UID = "1.2.826.0.1.3680043.2.1125.1.1717"
OTHER_UID = "1.2.826.0.1.3680043.2.1125.1.1718"


@dataclass
class Run:
    argv: list[str]
    file: str                      # the message must start with this file (``<file>: `` or ``<file>:row N: ``)
    words: tuple[str, ...]         # ...and contain each of these
    out: Path                      # must stay empty / absent (error) or hold the prediction (warning)
    row: Optional[int] = None      # the ``:row N`` the message must carry
    unchanged: list[Path] = field(default_factory=list)  # files that must keep their bytes
    json_warning: bool = False     # warning cases: the prediction JSON must carry "warnings"


@dataclass
class Entry:
    name: str
    group: str                     # nifti | itk | dicom | npy | manifest | mask | plugin | store | output | guard | geometry
    kind: str                      # error | warning
    build: Callable[[Path, dict], Run]
    from_issue: bool = False


# ------------------------------------------------------------------------------------------ files
def volume(seed: int = 0, shape=SHAPE, blob: bool = True) -> np.ndarray:
    rng = np.random.default_rng(seed)
    a = (rng.random(shape) * 0.2).astype(np.float32)
    if blob:
        a[3:6, 3:6, 2:5] = 1.0
    return a


def nifti(path: Path, arr: np.ndarray, affine=AFFINE, cls=nib.Nifti1Image) -> Path:
    nib.save(cls(arr, affine), str(path))
    return path


def header_only_nifti(path: Path, shape, dtype=np.float32, version: int = 1, extra: int = 64) -> Path:
    """A NIfTI whose header declares ``shape`` but holds only ``extra`` bytes of data."""
    h = (nib.Nifti2Header() if version == 2 else nib.Nifti1Header())
    h.set_data_shape(shape)
    h.set_data_dtype(dtype)
    h.set_data_offset(h.sizeof_hdr + 4 if version == 1 else 544)
    blob = h.binaryblock + b"\0" * (int(h.get_data_offset()) - len(h.binaryblock)) + b"\0" * extra
    if path.name.endswith(".gz"):
        with gzip.open(path, "wb") as fh:
            fh.write(blob)
    else:
        path.write_bytes(blob)
    return path


def npy_header_only(path: Path, shape, descr="<f4", extra: int = 64) -> Path:
    with open(path, "wb") as fh:
        np.lib.format.write_array_header_1_0(fh, {"descr": descr, "fortran_order": False, "shape": tuple(shape)})
        fh.write(b"\0" * extra)
    return path


def itk_image(arr: np.ndarray, spacing=(1.5, 1.5, 2.0)):
    import SimpleITK as sitk

    img = sitk.GetImageFromArray(np.ascontiguousarray(arr.transpose(2, 1, 0)))
    img.SetSpacing(spacing)
    return img


from anymc3d.io.readers import _keep_locale  # noqa: E402


def dicom_series(folder: Path, n: int = 8, skip=(), uid: str = SERIES_UID, z=None, shape=(12, 12), seed: int = 0,
                 prefix: str = "slice") -> Path:
    """A CT series of ``n`` slices (2 mm apart unless ``z`` gives the positions), minus the indices in ``skip``."""
    import SimpleITK as sitk

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for k in range(n):
        if k in skip:
            continue
        a = (rng.random(shape) * 200).astype(np.int16)
        a[4:7, 4:7] = 1000
        s = sitk.GetImageFromArray(a)
        s.SetSpacing((0.8, 0.8))
        zk = float(z[k]) if z is not None else 2.0 * k
        s.SetMetaData("0020|000e", uid)
        s.SetMetaData("0020|000d", "1.2.826.0.1.3680043.2.1125.1.99")
        s.SetMetaData("0008|0060", "CT")
        s.SetMetaData("0020|0037", "1\\0\\0\\0\\1\\0")
        s.SetMetaData("0020|0032", f"0\\0\\{zk}")
        s.SetMetaData("0020|0013", str(k + 1))
        s.SetMetaData("0018|0050", "2.0")
        writer.SetFileName(str(folder / f"{prefix}{k:03d}.dcm"))
        with _keep_locale():  # GDCM's writer resets the C locale to "C" (Python's open() would turn ASCII)
            writer.Execute(s)
    return folder


def write_manifest(path: Path, header: list[str], rows: list[list], task: Optional[dict] = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(header)
        w.writerows(rows)
    if task is not None:
        (path.parent / "task.json").write_text(json.dumps(task))
    return path


def binary_dataset(root: Path, n: int = 8, labels=None, masks: bool = False) -> Path:
    """``n`` tiny NIfTI cases (label i % 2, splits train/val/test) and ``manifest.csv``; returns the manifest."""
    (root / "images").mkdir(parents=True, exist_ok=True)
    splits = ["train"] * (n // 2) + ["val"] * (n // 4)
    splits += ["test"] * (n - len(splits))
    rows = []
    for i in range(n):
        lab = i % 2 if labels is None else labels[i]
        nifti(root / "images" / f"c{i:02d}.nii.gz", volume(i, blob=bool(lab in (1, "1"))))
        row = [f"c{i:02d}", f"images/c{i:02d}.nii.gz", lab, splits[i]]
        if masks:
            m = np.zeros(SHAPE, np.uint8)
            m[3:6, 3:6, 2:5] = 1 if lab in (1, "1") else 0
            nifti(root / "images" / f"c{i:02d}_mask.nii.gz", m)
            row.insert(3, f"images/c{i:02d}_mask.nii.gz")
        rows.append(row)
    header = ["id", "image", "label", "split"] if not masks else ["id", "image", "label", "mask", "split"]
    return write_manifest(root / "manifest.csv", header, rows)


def make_plugin(out: Path, task: str = "tiny", inputs=("image",), fingerprint: Optional[str] = None,
                spacing=None, views=("axial",), size: int = 32) -> Path:
    """An untrained plugin on randomly initialised EfficientNet-Lite0 (32-pixel slices): predict with --weights random.

    ``spacing`` (mm, 3 numbers): the plugin resamples to it; ``views``/``size``: its slices."""
    import torch

    from anymc3d.backbones import create_backbone
    from anymc3d.plugins import LoraSpec, PluginSpec, save_plugin
    from anymc3d.plugins.model import AnyMC3D
    from anymc3d.preprocess import PreprocessSpec

    bb = create_backbone("efficientnet_lite0", weights="random", input_size=size)
    pre = PreprocessSpec(size=size, views=list(views), intensity="minmax", spacing=spacing).to_dict()
    spec = PluginSpec(task=task, task_type="binary", label_names=["absent", "present"], inputs=list(inputs),
                      preprocess={i: pre for i in inputs}, backbone=bb.name,
                      backbone_fingerprint=fingerprint or bb.fingerprint, input_size=size, lora=LoraSpec(r=2))
    torch.manual_seed(0)
    save_plugin(AnyMC3D(bb, spec, adapter_prefix="corpus_"), out)
    return out


def copy_plugin(env: dict, dest: Path) -> Path:
    shutil.copytree(env["plugin"], dest)
    return dest


def edit_json(path: Path, **changes) -> Path:
    d = json.loads(path.read_text())
    d.update(changes)
    path.write_text(json.dumps(d))
    return path


# ------------------------------------------------------------------------------------------ helpers for runs
def predict(env: dict, tmp: Path, image, file=None, words=(), extra=(), **kw) -> Run:
    out = tmp / "out"
    return Run(["predict", str(env["plugin"]), str(image), "--out", str(out), "--weights", "random", *extra],
               str(file if file is not None else image), tuple(words), out, **kw)


def train(tmp: Path, manifest, file=None, words=(), extra=(), out=None, **kw) -> Run:
    out = out or tmp / "run"
    return Run(["train", str(manifest), "--out", str(out), "--weights", "random", "--size", SIZE, "--epochs", "1",
                "--batch-size", "4", "--lora-rank", "2", "--quiet", "--no-select", *extra],
               str(file if file is not None else manifest), tuple(words), out, **kw)


CORPUS: list[Entry] = []


def case(name: str, group: str, kind: str = "error", from_issue: bool = False):
    def deco(fn):
        CORPUS.append(Entry(name, group, kind, fn, from_issue))
        return fn
    return deco


# ------------------------------------------------------------------------------------------ NIfTI
@case("nifti_4d_5_channels", "nifti", from_issue=True)
def _(tmp, env):
    p = nifti(tmp / "five.nii.gz", np.random.default_rng(0).random((*SHAPE, 5)).astype(np.float32))
    return predict(env, tmp, p, words=("5 channels", "1 or 3"))


@case("nifti1_header_declares_32767_cubed", "nifti", from_issue=True)
def _(tmp, env):
    p = header_only_nifti(tmp / "huge1.nii.gz", (32767, 32767, 32767), np.int16)
    return predict(env, tmp, p, words=("32767x32767x32767", "limit", "--max-voxels"))


@case("nifti2_header_declares_100000_cubed", "nifti", from_issue=True)
def _(tmp, env):
    p = header_only_nifti(tmp / "huge2.nii", (100000, 100000, 100000), np.float32, version=2)
    return predict(env, tmp, p, words=("100000x100000x100000", "limit"))


@case("nifti_truncated_data", "nifti")
def _(tmp, env):
    p = header_only_nifti(tmp / "cut.nii", (64, 64, 64), np.int16, extra=1000)
    return predict(env, tmp, p, words=("truncated",))


@case("nifti_gz_cut_in_half", "nifti")
def _(tmp, env):
    p = nifti(tmp / "half.nii.gz", volume(1, shape=(40, 40, 40)))
    p.write_bytes(p.read_bytes()[: len(p.read_bytes()) // 2])
    return predict(env, tmp, p, words=("damaged gzip",))


@case("nifti_gz_one_byte_changed", "nifti")
def _(tmp, env):
    p = nifti(tmp / "flip.nii.gz", volume(1, shape=(40, 40, 40)))
    raw = bytearray(p.read_bytes())
    raw[len(raw) - 12] ^= 0x10  # in the deflate stream near its end: decodes, to other voxel values
    p.write_bytes(bytes(raw))
    return predict(env, tmp, p, words=("damaged gzip",))


@case("nifti_complex_voxels", "nifti")
def _(tmp, env):
    p = nifti(tmp / "complex.nii", (volume(2) + 1j * volume(3)).astype(np.complex64))
    return predict(env, tmp, p, words=("complex64",))


@case("nifti_rgb24", "nifti")
def _(tmp, env):
    rgb = np.zeros(SHAPE, dtype=[("R", "u1"), ("G", "u1"), ("B", "u1")])
    p = nifti(tmp / "rgb.nii", rgb)
    return predict(env, tmp, p, words=("voxel type",))


@case("nifti_single_slice", "nifti")
def _(tmp, env):
    return predict(env, tmp, nifti(tmp / "slice.nii.gz", volume(4, shape=(12, 12, 1))), words=("2D image",))


@case("nifti_zero_spacing", "nifti")
def _(tmp, env):
    p = nifti(tmp / "flat.nii", volume(5))
    raw = bytearray(p.read_bytes())
    h = nib.Nifti1Header.from_fileobj(__import__("io").BytesIO(bytes(raw[:348])))
    h["qform_code"] = 0
    h["sform_code"] = 1
    h["srow_z"] = [0.0, 0.0, 0.0, 0.0]  # a zero z axis (nibabel will not build such an affine itself)
    raw[:348] = h.binaryblock
    p.write_bytes(bytes(raw))
    return predict(env, tmp, p, words=("degenerate",))


@case("nifti_all_nan", "nifti")
def _(tmp, env):
    return predict(env, tmp, nifti(tmp / "nan.nii.gz", np.full(SHAPE, np.nan, np.float32)), words=("NaN",))


@case("nifti_6_dimensions", "nifti")
def _(tmp, env):
    return predict(env, tmp, nifti(tmp / "six.nii", np.zeros((6, 6, 6, 2, 2, 2), np.float32)), words=("dimensions",))


@case("nifti_empty_file", "nifti")
def _(tmp, env):
    p = tmp / "empty.nii.gz"
    p.write_bytes(b"")
    return predict(env, tmp, p, words=("cannot read",))


@case("nifti_2_channels", "nifti")
def _(tmp, env):
    p = nifti(tmp / "two.nii.gz", np.random.default_rng(0).random((*SHAPE, 2)).astype(np.float32))
    return predict(env, tmp, p, words=("2 channels",))


# ------------------------------------------------------------------------------------------ NRRD / MHA
@case("nrrd_header_declares_huge_size", "itk")
def _(tmp, env):
    import SimpleITK as sitk

    p = tmp / "ok.nhdr"
    sitk.WriteImage(itk_image(volume(6)), str(p))
    text = p.read_text().replace("sizes: 12 12 10", "sizes: 60000 60000 60000")
    (tmp / "huge.nhdr").write_text(text)
    return predict(env, tmp, tmp / "huge.nhdr", words=("60000x60000x60000", "limit"))


@case("mha_truncated", "itk")
def _(tmp, env):
    import SimpleITK as sitk

    p = tmp / "cut.mha"
    sitk.WriteImage(itk_image(volume(7)), str(p))
    p.write_bytes(p.read_bytes()[:-500])
    return predict(env, tmp, p, words=("cannot read",))


@case("mhd_without_its_raw_file", "itk")
def _(tmp, env):
    import SimpleITK as sitk

    p = tmp / "lonely.mhd"
    sitk.WriteImage(itk_image(volume(8)), str(p))
    (tmp / "lonely.raw").unlink()
    return predict(env, tmp, p, words=("cannot read",))


@case("nrrd_2d_image", "itk")
def _(tmp, env):
    import SimpleITK as sitk

    p = tmp / "flat.nrrd"
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((12, 12), np.float32)), str(p))
    return predict(env, tmp, p, words=("2D image",))


@case("mha_5_component_vectors", "itk")
def _(tmp, env):
    import SimpleITK as sitk

    p = tmp / "vec.mha"
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((10, 12, 12, 5), np.float32), isVector=True), str(p))
    return predict(env, tmp, p, words=("5 channels",))


@case("nrrd_text_that_is_not_nrrd", "itk")
def _(tmp, env):
    p = tmp / "notes.nrrd"
    p.write_text("patient 12: see scan on Monday\n" * 20)
    return predict(env, tmp, p, words=("cannot read",))


# ------------------------------------------------------------------------------------------ DICOM
@case("dicom_slice_missing_in_the_middle", "dicom", from_issue=True)
def _(tmp, env):
    d = dicom_series(tmp / "gap", n=10, skip=(5,))
    return predict(env, tmp, d, words=("slice missing", "--allow-gaps"))


@case("dicom_folder_without_dicom_files", "dicom", from_issue=True)
def _(tmp, env):
    d = tmp / "notdicom"
    d.mkdir()
    (d / "README.txt").write_text("the scans are on the other disk")
    (d / "scan.jpg").write_bytes(b"\xff\xd8\xff\xe0" + b"\0" * 100)
    return predict(env, tmp, d, words=("without a DICOM series",))


@case("dicom_two_acquisitions_same_positions", "dicom")
def _(tmp, env):
    d = dicom_series(tmp / "dup", n=6)
    dicom_series(d, n=6, prefix="again", seed=3)  # same UID, same positions
    return predict(env, tmp, d, words=("same slice position",))


@case("dicom_uneven_spacing", "dicom")
def _(tmp, env):
    d = dicom_series(tmp / "uneven", n=8, z=[0, 2, 4, 6, 8.6, 10.6, 12.6, 14.6])
    return predict(env, tmp, d, words=("uneven slice spacing", "--allow-gaps"))


@case("dicom_single_slice_series", "dicom")
def _(tmp, env):
    d = dicom_series(tmp / "one", n=1)
    return predict(env, tmp, d, words=("single-file",))


@case("dicom_series_uid_not_in_folder", "dicom")
def _(tmp, env):
    d = dicom_series(tmp / "series", n=6)
    return predict(env, tmp, d, words=("has no DICOM series", SERIES_UID), extra=("--series", "1.2.3.4"))


@case("dicom_file_that_is_garbage", "dicom")
def _(tmp, env):
    p = tmp / "scan.dcm"
    p.write_bytes(b"DICM" * 64)
    return predict(env, tmp, p, words=("cannot read",))


@case("dicom_slices_of_different_sizes", "dicom")
def _(tmp, env):
    d = dicom_series(tmp / "sizes", n=6)
    dicom_series(d, n=1, prefix="big", shape=(16, 16), z=[20.0])
    return predict(env, tmp, d, words=("different sizes",))


# ------------------------------------------------------------------------------------------ npy
@case("npy_header_declares_2000_cubed", "npy", from_issue=True)
def _(tmp, env):
    return predict(env, tmp, npy_header_only(tmp / "huge.npy", (2000, 2000, 2000)), words=("2000x2000x2000", "limit"))


@case("npy_pickled_objects", "npy")
def _(tmp, env):
    p = tmp / "objects.npy"
    np.save(p, np.array([{"a": 1}, None, "x"], dtype=object), allow_pickle=True)
    return predict(env, tmp, p, words=("unpickle",))


@case("npy_truncated", "npy")
def _(tmp, env):
    return predict(env, tmp, npy_header_only(tmp / "cut.npy", (50, 50, 50), extra=100), words=("truncated",))


@case("npy_complex", "npy")
def _(tmp, env):
    p = tmp / "complex.npy"
    np.save(p, np.zeros(SHAPE, np.complex64))
    return predict(env, tmp, p, words=("complex64",))


@case("npy_over_the_max_voxels_flag", "npy")
def _(tmp, env):
    p = tmp / "small.npy"
    np.save(p, volume(9))
    return predict(env, tmp, p, words=("12x12x10", "limit of 1,000"), extra=("--max-voxels", "1000"))


@case("npy_structured_dtype", "npy")
def _(tmp, env):
    p = tmp / "records.npy"
    np.save(p, np.zeros(SHAPE, dtype=[("a", "<f4"), ("b", "<i2")]))
    return predict(env, tmp, p, words=("voxel type",))


# ------------------------------------------------------------------------------------------ manifests
def _labels_manifest(tmp: Path, labels, **kw) -> Path:
    return binary_dataset(tmp / "data", n=len(labels), labels=labels, **kw)


@case("manifest_binary_with_a_stray_2", "manifest", from_issue=True)
def _(tmp, env):
    m = _labels_manifest(tmp, [0, 1, 0, 1, 2, 1, 0, 1])
    return train(tmp, m, words=("'2'", "binary", "--task-type multiclass"), row=6)


@case("manifest_binary_with_maybe", "manifest", from_issue=True)
def _(tmp, env):
    m = _labels_manifest(tmp, [0, 1, 0, "maybe", 0, 1, 0, 1])
    return train(tmp, m, words=("'maybe'", "--task-type multiclass"), row=5)


@case("manifest_declared_binary_with_a_stray_2", "manifest")
def _(tmp, env):
    m = _labels_manifest(tmp, [0, 1, 0, 1, 0, 1, 2, 2])
    return train(tmp, m, words=("not 0 or 1", "also row(s) 9"), extra=("--task-type", "binary"), row=8)


@case("manifest_integer_classes_not_declared", "manifest")
def _(tmp, env):
    m = _labels_manifest(tmp, [0, 1, 2, 3, 0, 1, 2, 3])
    return train(tmp, m, words=("never taken as classes", "--task-type multiclass"), row=4)


@case("manifest_row_image_missing", "manifest", from_issue=True)
def _(tmp, env):
    m = binary_dataset(tmp / "data", n=8)
    (m.parent / "images" / "c03.nii.gz").unlink()
    return train(tmp, m, words=("images/c03.nii.gz", "not found"), row=5)


@case("manifest_missing_label_cell", "manifest")
def _(tmp, env):
    m = _labels_manifest(tmp, [0, 1, 0, 1, "", 1, 0, 1])
    return train(tmp, m, words=("no value", "'label'"), row=6)


@case("manifest_duplicate_ids", "manifest")
def _(tmp, env):
    m = binary_dataset(tmp / "data", n=8)
    rows = list(csv.reader(m.open()))
    rows[4][0] = rows[2][0]
    write_manifest(m, rows[0], rows[1:])
    return train(tmp, m, words=("'c01'", "row 3"), row=5)


@case("manifest_unknown_split", "manifest")
def _(tmp, env):
    m = binary_dataset(tmp / "data", n=8)
    rows = list(csv.reader(m.open()))
    rows[2][3] = "tset"
    write_manifest(m, rows[0], rows[1:])
    return train(tmp, m, words=("'tset'", "train, val, test"), row=3)


@case("manifest_semicolon_row_in_a_comma_file", "manifest")
def _(tmp, env):
    m = binary_dataset(tmp / "data", n=8)
    with m.open("a") as fh:
        fh.write("c99,images/c00.nii.gz,1,train,extra\n")
    return train(tmp, m, words=("5 fields", "header has 4"), row=10)


@case("manifest_task_json_not_json", "manifest")
def _(tmp, env):
    m = binary_dataset(tmp / "data", n=8)
    (m.parent / "task.json").write_text("{'task_type': 'binary'}")
    return train(tmp, m, file=m.parent / "task.json", words=("not valid JSON",))


@case("manifest_task_json_binary_with_class_names", "manifest")
def _(tmp, env):
    m = _labels_manifest(tmp, ["low", "high", "low", "high", "low", "high", "low", "high"])
    (m.parent / "task.json").write_text(json.dumps({"task_type": "binary"}))
    return train(tmp, m, words=("'low'", "task.json"), row=2)


@case("manifest_multilabel_value_2", "manifest")
def _(tmp, env):
    m = binary_dataset(tmp / "data", n=8)
    rows = list(csv.reader(m.open()))
    header = rows[0][:2] + ["a", "b"] + rows[0][3:]
    body = [r[:2] + [r[2], str(i % 2 if i != 3 else 2)] + r[3:] for i, r in enumerate(rows[1:])]
    write_manifest(m, header, body)
    return train(tmp, m, words=("'2'", "column 'b'"), extra=("--label-columns", "a,b"), row=5)


@case("manifest_is_not_a_csv", "manifest")
def _(tmp, env):
    m = tmp / "data" / "manifest.csv"
    m.parent.mkdir(parents=True)
    m.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4)
    return train(tmp, m, words=("cannot read manifest",))


# ------------------------------------------------------------------------------------------ masks
@case("mask_file_missing", "mask")
def _(tmp, env):
    m = binary_dataset(tmp / "data", n=8, masks=True)
    (m.parent / "images" / "c02_mask.nii.gz").unlink()
    return train(tmp, m, words=("mask", "c02_mask.nii.gz", "not found"), row=4)


@case("mask_on_another_grid", "mask")
def _(tmp, env):
    m = binary_dataset(tmp / "data", n=8, masks=True)
    nifti(m.parent / "images" / "c01_mask.nii.gz", np.zeros((10, 10, 10), np.uint8))
    return train(tmp, m, file=m.parent / "images" / "c01_mask.nii.gz", words=("c01.nii.gz",))


# ------------------------------------------------------------------------------------------ plugins
@case("plugin_folder_does_not_exist", "plugin", from_issue=True)
def _(tmp, env):
    out = tmp / "out"
    missing = tmp / "runs" / "liver"
    return Run(["predict", str(missing), str(env["image"]), "--out", str(out)], str(missing),
               ("no such plugin folder",), out)


@case("plugin_json_edited_to_another_backbone", "plugin", from_issue=True)
def _(tmp, env):
    p = copy_plugin(env, tmp / "plugin")
    edit_json(p / "plugin.json", backbone="dinov2_vits14")
    out = tmp / "out"
    return Run(["predict", str(p), str(env["image"]), "--out", str(out), "--weights", "random"],
               str(p / "plugin.json"), ("dinov2_vits14",), out)


@case("plugin_json_names_unknown_backbone", "plugin")
def _(tmp, env):
    p = copy_plugin(env, tmp / "plugin")
    edit_json(p / "plugin.json", backbone="resnet9000")
    out = tmp / "out"
    return Run(["predict", str(p), str(env["image"]), "--out", str(out), "--weights", "random"],
               str(p / "plugin.json"), ("resnet9000", "not a registered backbone"), out)


@case("plugin_tensors_truncated", "plugin")
def _(tmp, env):
    p = copy_plugin(env, tmp / "plugin")
    edit_json(p / "plugin.json", tensors_sha256="")  # as a plugin written before hashes were recorded
    t = p / "plugin.safetensors"
    t.write_bytes(t.read_bytes()[:-1000])
    out = tmp / "out"
    return Run(["predict", str(p), str(env["image"]), "--out", str(out), "--weights", "random"], str(t),
               ("cannot read plugin tensors",), out)


@case("plugin_tensors_hold_nan", "plugin")
def _(tmp, env):
    import torch
    from safetensors.torch import load_file, save_file

    p = copy_plugin(env, tmp / "plugin")
    t = p / "plugin.safetensors"
    state = load_file(str(t))
    k = sorted(state)[0]
    state[k] = torch.full_like(state[k], float("nan"))
    save_file(state, str(t))
    edit_json(p / "plugin.json", tensors_sha256="")  # a plugin without a recorded hash: the values are checked
    out = tmp / "out"
    return Run(["predict", str(p), str(env["image"]), "--out", str(out), "--weights", "random"], str(t),
               ("NaN",), out)


@case("plugin_tensors_changed_after_training", "plugin")
def _(tmp, env):
    p = copy_plugin(env, tmp / "plugin")
    t = p / "plugin.safetensors"
    raw = bytearray(t.read_bytes())
    raw[-10] ^= 0x01  # one bit of one weight: loads fine, predicts differently
    t.write_bytes(bytes(raw))
    out = tmp / "out"
    return Run(["predict", str(p), str(env["image"]), "--out", str(out), "--weights", "random"], str(t),
               ("does not match plugin.json", "changed or damaged"), out)


@case("plugin_json_threshold_not_a_number", "plugin")
def _(tmp, env):
    p = copy_plugin(env, tmp / "plugin")
    edit_json(p / "plugin.json", threshold="high")
    out = tmp / "out"
    return Run(["predict", str(p), str(env["image"]), "--out", str(out), "--weights", "random"],
               str(p / "plugin.json"), ("not a valid plugin spec", "threshold"), out)


@case("plugin_json_views_misspelt", "plugin")
def _(tmp, env):
    p = copy_plugin(env, tmp / "plugin")
    d = json.loads((p / "plugin.json").read_text())
    d["preprocess"]["image"]["views"] = ["axail"]
    (p / "plugin.json").write_text(json.dumps(d))
    out = tmp / "out"
    return Run(["predict", str(p), str(env["image"]), "--out", str(out), "--weights", "random"],
               str(p / "plugin.json"), ("preprocess.image", "axail"), out)


# ------------------------------------------------------------------------------------------ stores
def _store_add(tmp: Path, plugin: Path, store: Path, file, words, extra=()) -> Run:
    return Run(["plugins", "add", str(plugin), "--store", str(store), *extra], str(file), tuple(words), store)


@case("store_add_plugin_naming_unknown_backbone", "store", from_issue=True)
def _(tmp, env):
    p = copy_plugin(env, tmp / "plugin")
    edit_json(p / "plugin.json", backbone="efficientnet_lite9")
    return _store_add(tmp, p, tmp / "store", p / "plugin.json", ("efficientnet_lite9", "not a registered backbone"))


@case("store_add_plugin_with_fake_fingerprint", "store", from_issue=True)
def _(tmp, env):
    p = copy_plugin(env, tmp / "plugin")
    edit_json(p / "plugin.json", backbone_fingerprint="sha256:0123456789abcdef")
    return _store_add(tmp, p, tmp / "store", p / "plugin.json", ("refused", "sha256:0123456789abcdef"))


@case("store_add_plugin_for_other_weights_than_the_store", "store")
def _(tmp, env):
    store = tmp / "store"
    store.mkdir()
    (store / "store.json").write_text(json.dumps({"format": "anymc3d-store/1", "backbone": "efficientnet_lite0",
                                                  "backbone_fingerprint": "sha256:325ed36b601d67f4"}))
    run = _store_add(tmp, env["plugin"], store, env["plugin"] / "plugin.json", ("refused", "one store = one backbone"))
    run.unchanged = [store / "store.json"]
    return run


@case("store_add_tensors_that_do_not_fit_the_spec", "store")
def _(tmp, env):
    p = copy_plugin(env, tmp / "plugin")
    d = json.loads((p / "plugin.json").read_text())
    d["lora"]["r"] = 6
    (p / "plugin.json").write_text(json.dumps(d))
    return _store_add(tmp, p, tmp / "store", p / "plugin.safetensors", ("refused", "shape"))


@case("store_json_corrupted", "store")
def _(tmp, env):
    store = tmp / "store"
    shutil.copytree(env["plugin"], store / "tiny")
    (store / "store.json").write_text('{"format": "anymc3d-store/1", "backbone": ')
    return Run(["plugins", "list", "--store", str(store)], str(store / "store.json"), ("not valid JSON",), store,
               unchanged=[store / "store.json", store / "tiny" / "plugin.json"])


@case("store_add_plugin_without_tensors", "store")
def _(tmp, env):
    p = copy_plugin(env, tmp / "plugin")
    (p / "plugin.safetensors").unlink()
    return _store_add(tmp, p, tmp / "store", p / "plugin.safetensors", ("plugin tensors not found",))


# ------------------------------------------------------------------------------------------ output folders
def _trained_folder(tmp: Path, env: dict) -> Path:
    out = tmp / "run"
    shutil.copytree(env["plugin"], out)
    return out


@case("train_into_a_folder_holding_a_plugin", "output", from_issue=True)
def _(tmp, env):
    out = _trained_folder(tmp, env)
    m = binary_dataset(tmp / "data", n=8)
    return train(tmp, m, out=out, file=out / "plugin.json", words=("already holds a plugin", "--overwrite"),
                 unchanged=[out / "plugin.json", out / "plugin.safetensors"])


@case("train_resume_without_checkpoint", "output", from_issue=True)
def _(tmp, env):
    m = binary_dataset(tmp / "data", n=8)
    out = tmp / "run"
    return train(tmp, m, out=out, file=out / "checkpoint.pt", words=("--resume", "none"), extra=("--resume",))


@case("train_resume_and_overwrite", "output")
def _(tmp, env):
    m = binary_dataset(tmp / "data", n=8)
    out = tmp / "run"
    return train(tmp, m, out=out, file=out, words=("--resume", "--overwrite"), extra=("--resume", "--overwrite"))


@case("train_out_is_a_file", "output")
def _(tmp, env):
    m = binary_dataset(tmp / "data", n=8)
    out = tmp / "run.txt"
    out.write_text("notes")
    run = train(tmp, m, out=out, file=out, words=("not a folder",), unchanged=[out])
    return run


@case("train_into_an_unfinished_run_without_resume", "output")
def _(tmp, env):
    m = binary_dataset(tmp / "data", n=8)
    out = tmp / "run"
    out.mkdir()
    (out / "checkpoint.pt").write_bytes(b"pretend checkpoint")
    return train(tmp, m, out=out, file=out / "checkpoint.pt", words=("unfinished run", "--resume"),
                 unchanged=[out / "checkpoint.pt"])


# ------------------------------------------------------------------------------------------ allocation guard
def thin_nifti(path: Path, depth: int = 500000) -> Path:
    """4 x 4 x ``depth`` voxels (NIfTI-2: a NIfTI-1 dim holds at most 32767): 8 M voxels, ~100 KB as .nii.gz."""
    a = np.zeros((4, 4, depth), np.uint8)
    a[1:3, 1:3, ::7] = 9
    nib.save(nib.Nifti2Image(a, np.eye(4)), str(path))
    return path


def resampling_plugin(env: dict) -> Path:
    """A tiny plugin that resamples to 1 mm (made once per env)."""
    if "plugin_1mm" not in env:
        env["plugin_1mm"] = make_plugin(Path(env["plugin"]).parent / "plugin_1mm", spacing=(1.0, 1.0, 1.0))
    return env["plugin_1mm"]


@case("resampling_40mm_voxels_to_1mm", "guard")
def _(tmp, env):
    p = nifti(tmp / "coarse.nii.gz", volume(0, shape=(64, 64, 64)), affine=np.diag([40.0, 40.0, 40.0, 1.0]))
    out = tmp / "out"
    return Run(["predict", str(resampling_plugin(env)), str(p), "--out", str(out), "--weights", "random"], str(p),
               ("2560x2560x2560", "62.5 GiB", "--max-voxels"), out)


@case("thin_volume_4x4x500000", "guard")
def _(tmp, env):
    return predict(env, tmp, thin_nifti(tmp / "thin.nii.gz"), words=("4x4x500000", "125,000 times", "256x"))


@case("slice_stack_over_the_max_voxels_flag", "guard")
def _(tmp, env):
    # 1,440 voxels pass --max-voxels 5000; its 10 axial slices of 32x32 (10,240 values) do not
    return predict(env, tmp, nifti(tmp / "small.nii.gz", volume(1)),
                   words=("axial slices", "10x1x32x32", "--max-voxels"), extra=("--max-voxels", "5000"))


# ------------------------------------------------------------------------------------------ geometry
def nifti_with_header(path: Path, arr: np.ndarray, **fields) -> Path:
    """A NIfTI-1 file whose header fields are set afterwards, as written (nibabel's own checks bypassed)."""
    import io as _io

    nifti(path, arr, affine=np.eye(4))
    raw = bytearray(path.read_bytes())
    h = nib.Nifti1Header.from_fileobj(_io.BytesIO(bytes(raw[:348])), check=False)
    for k, v in fields.items():
        if k == "pixdim":
            h["pixdim"][1:4] = v
        else:
            h[k] = v
    raw[:348] = h.binaryblock
    path.write_bytes(bytes(raw))
    return path


@case("nifti_pixdim_zero_without_qform_or_sform", "geometry")
def _(tmp, env):
    p = nifti_with_header(tmp / "nospacing.nii", volume(5), pixdim=(0, 0, 0), qform_code=0, sform_code=0)
    return predict(env, tmp, p, words=("zero voxel size", "0x0x0", "1 mm", "--assume-spacing"))


@case("nifti_qform_with_negative_pixdim", "geometry")
def _(tmp, env):
    p = nifti_with_header(tmp / "negative.nii", volume(5), pixdim=(1.5, -1.5, 2), qform_code=1, sform_code=0)
    return predict(env, tmp, p, words=("negative voxel size", "qform", "--assume-spacing"))


@case("mha_zero_spacing", "geometry")
def _(tmp, env):
    import SimpleITK as sitk

    p = tmp / "flat.mha"
    sitk.WriteImage(itk_image(volume(6)), str(p))
    p.write_bytes(p.read_bytes().replace(b"ElementSpacing = 1.5 1.5 2", b"ElementSpacing = 1.5 0 2"))
    return predict(env, tmp, p, words=("zero voxel size", "1.5x0x2"))


@case("dicom_pixel_spacing_zero", "geometry")
def _(tmp, env):
    import pydicom

    d = dicom_series(tmp / "series", n=6)
    for f in sorted(d.iterdir()):
        ds = pydicom.dcmread(str(f))
        ds.PixelSpacing = [0, 0]
        ds.save_as(str(f))
    return predict(env, tmp, d, words=("PixelSpacing", "zero voxel size", "--assume-spacing"))


# ------------------------------------------------------------------------------------------ manifest ids and paths
def _edited_manifest(tmp: Path, edit) -> Path:
    m = binary_dataset(tmp / "data", n=8)
    rows = list(csv.reader(m.open()))
    edit(rows)
    write_manifest(m, rows[0], rows[1:])
    return m


def _predict_manifest(env: dict, tmp: Path, m: Path, words, row) -> Run:
    out = tmp / "out"
    return Run(["predict", str(env["plugin"]), str(m), "--out", str(out), "--weights", "random"], str(m),
               tuple(words), out, row=row)


@case("manifest_id_climbs_out_of_the_output_folder", "manifest", from_issue=True)
def _(tmp, env):
    m = _edited_manifest(tmp, lambda r: r[2].__setitem__(0, "../escaped"))
    return _predict_manifest(env, tmp, m, ("'../escaped'", "path separator"), row=3)


@case("manifest_id_with_a_control_character", "manifest")
def _(tmp, env):
    m = _edited_manifest(tmp, lambda r: r[1].__setitem__(0, "c\x01x"))
    return _predict_manifest(env, tmp, m, ("control character",), row=2)


@case("manifest_ids_differ_only_in_case", "manifest")
def _(tmp, env):
    m = _edited_manifest(tmp, lambda r: r[3].__setitem__(0, "C00"))
    return _predict_manifest(env, tmp, m, ("'C00'", "'c00'", "case-insensitive"), row=4)


@case("manifest_image_cell_empty", "manifest")
def _(tmp, env):
    m = _edited_manifest(tmp, lambda r: r[4].__setitem__(1, ""))
    return train(tmp, m, words=("no image", "'image'"), row=5)


@case("manifest_image_is_a_folder_of_niftis", "manifest")
def _(tmp, env):
    m = _edited_manifest(tmp, lambda r: r[2].__setitem__(1, "images"))
    return train(tmp, m, words=("folder of image files", "c00.nii.gz"), row=3)


@case("manifest_image_is_the_manifest_itself", "manifest")
def _(tmp, env):
    m = _edited_manifest(tmp, lambda r: r[1].__setitem__(1, "manifest.csv"))
    return train(tmp, m, words=("the manifest itself",), row=2)


@case("manifest_image_path_with_tilde", "manifest")
def _(tmp, env):
    m = _edited_manifest(tmp, lambda r: r[1].__setitem__(1, "~/scans/c00.nii.gz"))
    return train(tmp, m, words=("not found", "not expanded"), row=2)


@case("manifest_semicolon_separated", "manifest")
def _(tmp, env):
    m = binary_dataset(tmp / "data", n=8)
    m.write_text(m.read_text().replace(",", ";"))
    return train(tmp, m, words=("missing column 'id'", "';'-separated"))


@case("manifest_training_split_has_one_class", "manifest")
def _(tmp, env):
    m = _labels_manifest(tmp, [0, 0, 0, 0, 0, 1, 0, 1])  # train rows 0-3: all 0
    return train(tmp, m, words=("every one of the 4 training cases", "both labels"))


@case("manifest_class_only_in_the_test_split", "manifest")
def _(tmp, env):
    m = _labels_manifest(tmp, ["low", "high", "low", "high", "low", "high", "mid", "low"])
    return train(tmp, m, words=("'mid'", "test split", "none of the 4 training cases"))


# ------------------------------------------------------------------------------------------ warnings
@case("constant_volume", "nifti", kind="warning", from_issue=True)
def _(tmp, env):
    p = nifti(tmp / "constant.nii.gz", np.full(SHAPE, 7.0, np.float32))
    return predict(env, tmp, p, words=("constant", "every voxel is 7"), json_warning=True)


@case("nearly_empty_volume", "nifti", kind="warning")
def _(tmp, env):
    a = np.zeros((20, 20, 20), np.float32)
    a[10, 10, 10] = 5.0
    return predict(env, tmp, nifti(tmp / "speck.nii.gz", a), words=("nearly empty", "1 of 8,000"), json_warning=True)


@case("dicom_two_series_in_one_folder", "dicom", kind="warning", from_issue=True)
def _(tmp, env):
    d = dicom_series(tmp / "two", n=8)
    dicom_series(d, n=4, uid=OTHER_UID, prefix="loc", seed=5)
    return predict(env, tmp, d, words=("2 DICOM series", f"reading {SERIES_UID} (8 files)", OTHER_UID, "--series"),
                   json_warning=True)


@case("nifti_zero_spacing_read_with_assume_spacing", "geometry", kind="warning")
def _(tmp, env):
    p = nifti_with_header(tmp / "nospacing.nii", volume(5), pixdim=(0, 0, 0), qform_code=0, sform_code=0)
    return predict(env, tmp, p, words=("zero voxel size", "assumed spacing 1x1x2 mm", "--assume-spacing"),
                   extra=("--assume-spacing", "1,1,2"), json_warning=True)


@case("dicom_gap_read_with_allow_gaps", "dicom", kind="warning")
def _(tmp, env):
    d = dicom_series(tmp / "gap", n=10, skip=(5,))
    return predict(env, tmp, d, words=("slice missing", "--allow-gaps"), extra=("--allow-gaps",), json_warning=True)


# ================================================================================== fuzzing
# Valid seed files, mutations, and the calls they are fed to (tests/test_fuzz.py, benchmarks/fuzz/run.py).
# A case passes when the call raises InputError or succeeds with a result that keeps the contract
# ("no silent change"): see FuzzTarget.check.

#: values that break header fields: zero, negative, huge, just past a limit, NaN/Inf bit patterns
INTERESTING_INTS = (0, 1, -1, 2, 3, 4, 7, 8, 127, 128, 255, 256, 0x7FFF, 0x8000, 0xFFFF, 0x10000, 0x7FFFFFFF,
                    0x80000000, 0xFFFFFFFF, 0x7FC00000, 0x7F800000, 10**6, 10**9)
INTERESTING_TOKENS = ("0", "1", "2", "-1", "maybe", "", "1e309", "nan", "inf", "-0", "99999999999", "3.5", "yes",
                      "\"", ",", "\\x00", "train", "test", "tset", "null", "true", "[]", "{}", "sha256:00",
                      "efficientnet_lite0", "dinov2_vits14", "axial", "coronal", "multiclass", "binary", "1.0")
FUZZ_MAX_VOXELS = 2_000_000  # mutated headers must not make a fuzz case allocate gigabytes


def mutate(data: bytes, ops, header: int = 512, text: bool = False) -> bytes:
    """Apply mutation ops: ("flip", pos, bit), ("set", pos, byte), ("int", pos, width, value),
    ("truncate", pos), ("insert", pos, bytes), ("delete", pos, n), ("token", k, token), ("dupline", k),
    ("dropline", k). Positions are taken modulo the size (``header``: of the first bytes when pos < 0)."""
    import re
    import struct

    b = bytearray(data)
    for op in ops:
        kind, args = op[0], op[1:]
        if not b and kind not in ("insert",):
            continue

        def at(pos: int, span: int = 1) -> int:
            n = min(len(b), header) if pos < 0 else len(b)
            return (abs(pos) % max(1, n - span + 1)) if n >= span else 0

        if kind == "flip":
            i = at(args[0])
            b[i] ^= 1 << (args[1] % 8)
        elif kind == "set":
            b[at(args[0])] = args[1] % 256
        elif kind == "int":
            width, value = args[1], args[2]
            if len(b) >= width:
                i = at(args[0], width)
                fmt = {2: "<H", 4: "<I", 8: "<Q"}[width]
                b[i:i + width] = struct.pack(fmt, value % (1 << (8 * width)))
        elif kind == "truncate":
            del b[at(args[0]):]
        elif kind == "insert":
            i = at(args[0]) if b else 0
            b[i:i] = args[1]
        elif kind == "delete":
            i = at(args[0])
            del b[i:i + args[1]]
        elif kind in ("token", "dupline", "dropline") and text:
            s = b.decode("latin-1")
            if kind == "token":
                toks = list(re.finditer(r"[A-Za-z0-9_.:+-]+", s))
                if toks:
                    m = toks[args[0] % len(toks)]
                    s = s[:m.start()] + args[1] + s[m.end():]
            else:
                lines = s.split("\n")
                k = args[0] % len(lines)
                lines[k:k + 1] = [lines[k]] * 2 if kind == "dupline" else []
                s = "\n".join(lines)
            b = bytearray(s.encode("latin-1", "replace"))
    return bytes(b)


@dataclass
class FuzzTarget:
    name: str
    folder: Path                   # a working copy of the seed files
    mutated: list[Path]            # the file(s) a case mutates (one chosen per case)
    call: Callable[[Path], object]
    check: Callable[[object, bool], Optional[str]]  # (result, bytes unchanged) -> description of a silent change
    text: bool = False
    header: int = 512
    originals: dict = field(default_factory=dict)

    def __post_init__(self):
        self.originals = {p: p.read_bytes() for p in self.mutated}

    def run(self, which: int, ops) -> str:
        """'refused' (InputError), 'accepted', or 'silent: ...'. Any other exception propagates (a crash)."""
        from anymc3d.errors import InputError

        p = self.mutated[which % len(self.mutated)]
        data = mutate(self.originals[p], ops, self.header, self.text)
        p.write_bytes(data)
        try:
            try:
                result = self.call(self.folder)
            except InputError:
                return "refused"
            problem = self.check(result, data == self.originals[p])
            return f"silent: {problem}" if problem else "accepted"
        finally:
            p.write_bytes(self.originals[p])


def _volume_contract(limit: int):
    from anymc3d.volume import Volume

    def check(vol, unchanged: bool) -> Optional[str]:
        if not isinstance(vol, Volume):
            return f"returned {type(vol).__name__}"
        a = vol.array
        if a.dtype != np.float32 or a.ndim not in (3, 4) or min(a.shape[-3:]) < 2 or a.size > limit:
            return f"array {a.dtype} {a.shape}"
        if not np.isfinite(a).all():
            return "non-finite voxels"
        if a.ndim == 4 and a.shape[0] not in (1, 3):
            return f"{a.shape[0]} channels"
        aff = np.asarray(vol.affine)
        if aff.shape != (4, 4) or not np.isfinite(aff).all() or abs(np.linalg.det(aff[:3, :3])) < 1e-12:
            return "bad affine"
        return None
    return check


def fuzz_targets(root: Path) -> dict[str, FuzzTarget]:
    """One working folder per target under ``root``, each with a valid seed."""
    import SimpleITK as sitk

    from anymc3d.data import load_manifest
    from anymc3d.io import read_volume

    root.mkdir(parents=True, exist_ok=True)
    contract = _volume_contract(FUZZ_MAX_VOXELS)
    targets: dict[str, FuzzTarget] = {}

    def vol_target(name: str, filename: str, write, header=512, text=False, check=None):
        d = root / name
        d.mkdir(exist_ok=True)
        p = d / filename
        write(p)
        targets[name] = FuzzTarget(name, d, [p], lambda folder, p=p: read_volume(p, max_voxels=FUZZ_MAX_VOXELS),
                                   check or contract, text=text, header=header)

    a16 = (volume(0) * 1000).astype(np.int16)
    vol_target("nifti", "seed.nii", lambda p: nifti(p, a16), header=352)

    seed_gz = root / "nifti_gz_seed.nii.gz"
    nifti(seed_gz, a16)
    reference = read_volume(seed_gz)

    def gz_check(vol, unchanged):
        problem = contract(vol, unchanged)
        if problem:
            return problem
        # gzip's CRC covers the voxel data: a damaged .nii.gz must be refused, never read as other values
        if vol.array.shape == reference.array.shape and not np.array_equal(vol.array, reference.array):
            return "a damaged .nii.gz was read as different voxel values"
        return None

    vol_target("nifti_gz", "seed.nii.gz", lambda p: shutil.copy(seed_gz, p), header=64, check=gz_check)
    vol_target("nrrd", "seed.nrrd", lambda p: sitk.WriteImage(itk_image(volume(1)), str(p)), header=300)
    vol_target("nhdr", "seed.nhdr", lambda p: sitk.WriteImage(itk_image(volume(1)), str(p)), header=300, text=True)
    vol_target("mha", "seed.mha", lambda p: sitk.WriteImage(itk_image(volume(2)), str(p)), header=400)
    vol_target("npy", "seed.npy", lambda p: np.save(p, volume(3)), header=128)

    d = dicom_series(root / "dicom" / "series", n=4)
    targets["dicom"] = FuzzTarget("dicom", d, sorted(d.iterdir()), lambda folder: read_volume(folder), contract,
                                  header=800)

    # manifest (+ task.json) of a binary task: a mutation must never turn it into another task silently
    m = binary_dataset(root / "manifest", n=8)

    def manifest_check(task, unchanged):
        if task.task_type == "multiclass" and any(_is_number_text(n) for n in task.label_names):
            return f"numeric labels {task.label_names} became a multi-class task without being declared"
        if task.task_type == "binary" and any(c.label is None or int(c.label[0]) not in (0, 1) for c in task.cases):
            return "a binary task with labels outside 0/1"
        if task.task_type not in ("binary", "multiclass", "multilabel"):
            return f"task type {task.task_type!r}"
        if any(v is not None and not Path(v).exists() for c in task.cases for v in c.images.values()):
            return "a case whose image does not exist"
        if unchanged and (task.task_type != "binary" or len(task.cases) != 8):
            return "the unchanged manifest changed"
        return None

    targets["manifest"] = FuzzTarget("manifest", m.parent, [m], lambda folder: load_manifest(folder / "manifest.csv"),
                                     manifest_check, text=True)
    tj = root / "task_json"
    binary_dataset(tj, n=8)
    (tj / "task.json").write_text(json.dumps({"task": "t", "image_columns": ["image"], "label_columns": ["label"],
                                              "task_type": "binary", "label_names": ["absent", "present"]}))
    targets["task_json"] = FuzzTarget("task_json", tj, [tj / "task.json"],
                                      lambda folder: load_manifest(folder / "manifest.csv"), manifest_check, text=True)

    # plugins: the spec (text) and the tensors, with and without a recorded hash
    plugin = make_plugin(root / "plugin_seed")
    from safetensors.torch import load_file

    seed_state = load_file(str(plugin / "plugin.safetensors"))
    for name, keep_hash in (("plugin_json", True), ("safetensors", True), ("safetensors_nohash", False)):
        d = root / name
        shutil.copytree(plugin, d, dirs_exist_ok=True)
        if not keep_hash:
            edit_json(d / "plugin.json", tensors_sha256="")
        files = [d / "plugin.json"] if name == "plugin_json" else [d / "plugin.safetensors"]

        def plugin_check(res, unchanged, keep_hash=keep_hash):
            spec, state = res
            if keep_hash and (set(state) != set(seed_state)
                              or any(not bool((state[k] == seed_state[k]).all()) for k in state)):
                return "tensors differ from the ones plugin.json records"
            return None

        targets[name] = FuzzTarget(name, d, files, load_plugin_checked, plugin_check, text=name == "plugin_json",
                                   header=256 if name != "plugin_json" else 10**6)
    return targets


def _is_number_text(v: str) -> bool:
    try:
        float(v)
    except ValueError:
        return False
    return True


_MODELS: dict = {}


def load_plugin_checked(folder: Path, full: bool = False):
    """What ``load_plugin`` does, on a cached randomly initialised backbone + model per spec structure (building
    one per case would take 0.5 s); ``full=True`` calls the real ``load_plugin`` (fresh backbone)."""
    from anymc3d.backbones import create_backbone
    from anymc3d.errors import InputError
    from anymc3d.plugins.file import (check_fingerprint, check_tensor_hash, load_plugin, load_tensors, plugin_paths,
                                      read_spec)
    from anymc3d.plugins.model import AnyMC3D

    if full:
        model = load_plugin(folder, weights="random")
        return model.spec, {k: v.detach() for k, v in model.trainable_state().items()}
    jpath, tpath = plugin_paths(folder)
    spec = read_spec(folder)
    if not tpath.is_file():
        raise InputError(f"{tpath}: plugin tensors not found")
    state = load_tensors(tpath)
    key = json.dumps({k: v for k, v in spec.to_dict().items()
                      if k not in ("threshold", "metrics", "training", "version", "task", "tensors_sha256")},
                     sort_keys=True, default=str)
    if key not in _MODELS:
        try:
            bb = create_backbone(spec.backbone, weights="random", input_size=spec.input_size)
        except InputError as exc:
            raise InputError(f"{jpath}: cannot load its backbone {spec.backbone}: {exc}") from exc
        check_fingerprint(spec, bb, str(jpath))
        try:
            _MODELS[key] = AnyMC3D(bb, spec, adapter_prefix="fz_")
        except (ValueError, KeyError, IndexError, TypeError) as exc:
            raise InputError(f"{jpath}: the spec cannot be built ({exc})") from exc
        if len(_MODELS) > 16:
            _MODELS.pop(next(iter(_MODELS)))
    model = _MODELS[key]
    check_fingerprint(spec, model.backbone, str(jpath))
    try:
        model.load_trainable_state(state)
    except KeyError as exc:
        raise InputError(f"{tpath}: {exc.args[0]}") from exc
    check_tensor_hash(spec, jpath, tpath)
    return spec, state


def ops_strategy():
    """Hypothesis strategy for a list of 1-4 mutation ops (see :func:`mutate`); negative positions aim at headers."""
    from hypothesis import strategies as st

    pos = st.integers(-(10**6), 10**6)
    return st.lists(st.one_of(
        st.tuples(st.just("flip"), pos, st.integers(0, 7)),
        st.tuples(st.just("set"), pos, st.integers(0, 255)),
        st.tuples(st.just("int"), pos, st.sampled_from([2, 4, 8]), st.sampled_from(INTERESTING_INTS)),
        st.tuples(st.just("truncate"), st.integers(0, 10**6)),
        st.tuples(st.just("insert"), pos, st.binary(min_size=1, max_size=16)),
        st.tuples(st.just("delete"), pos, st.integers(1, 64)),
        st.tuples(st.just("token"), st.integers(0, 10**4), st.sampled_from(INTERESTING_TOKENS)),
        st.tuples(st.just("dupline"), st.integers(0, 1000)),
        st.tuples(st.just("dropline"), st.integers(0, 1000)),
    ), min_size=1, max_size=4)
