"""Shared fixtures: tiny NIfTI datasets + manifests, one trained tiny plugin, random ViT checkpoints.

Everything is sized for 2 CPU cores: 12x12x10 volumes, 16 cases, 32-pixel slices, 1 epoch.
"""
from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

torch.set_num_threads(1)
os.environ.setdefault("TQDM_DISABLE", "1")

SHAPE = (12, 12, 10)
AFFINE = np.diag([1.5, 1.5, 2.0, 1.0])
# Blob centres (x, y, z) used to encode labels: A is "the" lesion for binary tasks.
BLOB_A = (4, 4, 3)
BLOB_B = (8, 8, 7)


def random_plugin(bb, out: Path, task: str, seed: int, r=4, last_k=None, views=("axial",), inputs=("image",),
                  task_type="binary", labels=("neg", "pos"), size=64, intensity="minmax", prefix="rp",
                  **spec_fields) -> Path:
    """An untrained plugin with random (non-zero) LoRA, queries and head, saved like a trained one as
    ``out/task`` (``spec_fields``: more PluginSpec fields, e.g. ``metrics``, ``training``)."""
    from anymc3d.plugins import LoraSpec, PluginSpec, save_plugin
    from anymc3d.plugins.model import AnyMC3D
    from anymc3d.preprocess import PreprocessSpec

    pre = PreprocessSpec(size=size, views=list(views), intensity=intensity).to_dict()
    spec = PluginSpec(task=task, task_type=task_type, label_names=list(labels), inputs=list(inputs),
                      preprocess={k: pre for k in inputs}, backbone=bb.name, backbone_fingerprint=bb.fingerprint,
                      input_size=bb.input_size, lora=LoraSpec(r=r, last_k=last_k), **spec_fields)
    torch.manual_seed(seed)
    model = AnyMC3D(bb, spec, adapter_prefix=f"{prefix}{seed}_")
    with torch.no_grad():
        for p in {**model.lora_parameters(), **model.head_parameters()}.values():
            p.copy_(torch.randn_like(p) * 0.2)
    save_plugin(model, out / task)
    return out / task


def make_volume(rng: np.random.Generator, blobs=(), shape=SHAPE) -> np.ndarray:
    """Dim noisy background + one bright 3x3x3 cube per blob centre."""
    a = (rng.random(shape) * 0.2).astype(np.float32)
    for cx, cy, cz in blobs:
        a[cx - 1:cx + 2, cy - 1:cy + 2, cz - 1:cz + 2] = 1.0 + 0.1 * rng.random()
    return a


def write_nifti(path: Path, arr: np.ndarray, affine=AFFINE) -> Path:
    nib.save(nib.Nifti1Image(arr, affine), str(path))
    return path


def _splits(n: int) -> list[str]:
    # 16 cases: 8 train, 4 val, 4 test; labels alternate so every split holds every class.
    base = ["train"] * (n // 2) + ["val"] * (n // 4)
    return base + ["test"] * (n - len(base))


def _write_manifest(path: Path, header: list[str], rows: list[list]) -> Path:
    with path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(header)
        w.writerows(rows)
    return path


def build_binary_dataset(root: Path, n: int = 16, seed: int = 0) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "images").mkdir(exist_ok=True)
    rng = np.random.default_rng(seed)
    rows = []
    for i, split in enumerate(_splits(n)):
        label = i % 2
        arr = make_volume(rng, [BLOB_A] if label else [])
        write_nifti(root / "images" / f"case{i:02d}.nii.gz", arr)
        rows.append([f"case{i:02d}", f"images/case{i:02d}.nii.gz", label, split])
    return _write_manifest(root / "manifest.csv", ["id", "image", "label", "split"], rows)


def build_multiclass_dataset(root: Path, n: int = 18, seed: int = 1) -> Path:
    """Classes: clear (no blob), low (blob A), high (blob B)."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    names = ["clear", "low", "high"]
    blobs = {"clear": [], "low": [BLOB_A], "high": [BLOB_B]}
    splits = ["train"] * 9 + ["val"] * 3 + ["test"] * 6
    rows = []
    for i in range(n):
        name = names[i % 3]
        write_nifti(root / f"m{i:02d}.nii.gz", make_volume(rng, blobs[name]))
        rows.append([f"m{i:02d}", f"m{i:02d}.nii.gz", name, splits[i]])
    return _write_manifest(root / "manifest.csv", ["id", "image", "label", "split"], rows)


def build_multilabel_dataset(root: Path, n: int = 16, seed: int = 2) -> Path:
    """Two labels: has_a (blob A), has_b (blob B); the label columns are declared in task.json."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    rows = []
    for i, split in enumerate(_splits(n)):
        a, b = i % 2, (i // 2) % 2
        write_nifti(root / f"l{i:02d}.nii.gz", make_volume(rng, [BLOB_A] * a + [BLOB_B] * b))
        rows.append([f"l{i:02d}", f"l{i:02d}.nii.gz", a, b, split])
    (root / "task.json").write_text(json.dumps({"label_columns": ["has_a", "has_b"]}))
    return _write_manifest(root / "manifest.csv", ["id", "image", "has_a", "has_b", "split"], rows)


# ------------------------------------------------------------------------------------------ data
@pytest.fixture(scope="session")
def binary_manifest(tmp_path_factory) -> Path:
    return build_binary_dataset(tmp_path_factory.mktemp("binary"))


@pytest.fixture(scope="session")
def multiclass_manifest(tmp_path_factory) -> Path:
    return build_multiclass_dataset(tmp_path_factory.mktemp("multiclass"))


@pytest.fixture(scope="session")
def multilabel_manifest(tmp_path_factory) -> Path:
    return build_multilabel_dataset(tmp_path_factory.mktemp("multilabel"))


@pytest.fixture(scope="session")
def positive_volume(binary_manifest) -> Path:
    return binary_manifest.parent / "images" / "case01.nii.gz"


@pytest.fixture(scope="session")
def negative_volume(binary_manifest) -> Path:
    return binary_manifest.parent / "images" / "case00.nii.gz"


# ------------------------------------------------------------------------------------------ plugin
TINY_SIZE = 32


@pytest.fixture(scope="session")
def trained_plugin(binary_manifest, tmp_path_factory) -> Path:
    """A plugin trained once (efficientnet_lite0 real weights, 32-pixel slices, 1 epoch)."""
    from anymc3d.training.run import PreprocessOptions, train_plugin
    from anymc3d.training.trainer import TrainConfig

    out = tmp_path_factory.mktemp("plugin")
    train_plugin(binary_manifest, "efficientnet_lite0", out, preprocess=PreprocessOptions(size=TINY_SIZE),
                 config=TrainConfig(epochs=1, batch_size=4, progress=False), log=lambda *a, **k: None)
    return out


# ------------------------------------------------------------------------------------------ ViT files
def dinov2_original_state(arch: str = "vit_small_patch14_dinov2", grid: int = 37) -> dict[str, torch.Tensor]:
    """A randomly initialised DINOv2 state dict in the facebookresearch key layout.

    timm's DINOv2 keys already match the original ones except that the original has a pretrain-only
    ``mask_token`` (1, D) and a position embedding for the 518-pixel grid (37x37 + class token).
    """
    import timm

    torch.manual_seed(123)
    m = timm.create_model(arch, pretrained=False, num_classes=0, img_size=grid * 14)
    sd = {k: v.clone() for k, v in m.state_dict().items()}
    d = sd["cls_token"].shape[-1]
    assert sd["pos_embed"].shape == (1, grid * grid + 1, d)
    sd["mask_token"] = torch.zeros(1, d)
    return sd


def dinov3_original_state(arch: str = "vit_small_patch16_dinov3") -> dict[str, torch.Tensor]:
    """A randomly initialised DINOv3 state dict in the facebookresearch layout (inverse of timm's eva filter).

    timm -> original: reg_token -> storage_tokens, gamma_1/gamma_2 -> ls1.gamma/ls2.gamma; the original
    also carries mask_token (1, D), rope_embed.periods, and per block attn.qkv.bias + attn.qkv.bias_mask
    (ViT-S/16 was trained without qkv bias: zeros that timm drops).
    """
    import timm

    torch.manual_seed(321)
    m = timm.create_model(arch, pretrained=False, num_classes=0)
    sd = {}
    d = m.num_features
    for k, v in m.state_dict().items():
        if k in ("cls_token", "reg_token") or "gamma" in k:
            v = torch.randn_like(v) * 0.1  # distinctive values, so a wrong mapping is caught
        k2 = (k.replace("reg_token", "storage_tokens").replace("gamma_1", "ls1.gamma").replace("gamma_2", "ls2.gamma"))
        sd[k2] = v.clone()
    sd["mask_token"] = torch.zeros(1, d)
    sd["rope_embed.periods"] = torch.arange(1, d // 12 // 4 + 1, dtype=torch.float32)
    for i in range(len(m.blocks)):
        sd[f"blocks.{i}.attn.qkv.bias"] = torch.zeros(3 * d)
        sd[f"blocks.{i}.attn.qkv.bias_mask"] = torch.ones(3 * d)
    return sd


@pytest.fixture(scope="session")
def dinov2_checkpoint(tmp_path_factory) -> Path:
    """``dinov2_vits14_pretrain.pth``-style file (random weights, original key layout)."""
    p = tmp_path_factory.mktemp("vit") / "dinov2_vits14_pretrain.pth"
    torch.save(dinov2_original_state(), p)
    return p


@pytest.fixture(scope="session")
def dinov3_checkpoint(tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("vit3") / "dinov3_vits16_pretrain_lvd1689m-random.pth"
    torch.save(dinov3_original_state(), p)
    return p
