"""Multi-view / multi-sequence fusion and the auxiliary mask loss (issue 3)."""
from __future__ import annotations

import csv

import nibabel as nib
import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from anymc3d.backbones import create_backbone
from anymc3d.data import Case
from anymc3d.errors import InputError
from anymc3d.runtime.batching import prepare_case
from anymc3d.plugins.model import AnyMC3D
from anymc3d.plugins import PluginSpec
from anymc3d.training.decoder import SegDecoder3D, dice_ce_loss
from anymc3d.predict import Predictor
from anymc3d.preprocess import PreprocessSpec, to_slices
from anymc3d.synthetic import make_task, write_task
from anymc3d.training.run import PreprocessOptions, train_plugin
from anymc3d.training.trainer import TrainConfig

SIZE = 32


@pytest.fixture(scope="module")
def backbone():
    return create_backbone("efficientnet_lite0", input_size=SIZE)


def _spec(bb, views, inputs=("image",)):
    pre = PreprocessSpec(orientation=None, intensity="minmax", views=list(views), size=SIZE).to_dict()
    return PluginSpec(task="t", task_type="binary", label_names=["neg", "pos"], inputs=list(inputs),
                      preprocess={i: pre for i in inputs}, backbone=bb.name, backbone_fingerprint=bb.fingerprint,
                      input_size=SIZE)


@pytest.mark.parametrize("views", [["axial"], ["axial", "coronal"], ["axial", "coronal", "sagittal"]])
def test_fusion_with_1_2_3_views(backbone, views):
    model = AnyMC3D(backbone, _spec(backbone, views), adapter_prefix=f"v{len(views)}_").eval()
    assert model.streams == [f"image:{v}" for v in views]
    assert len(model.adapters) == len(views)
    x = {s: torch.rand(2, 6, 1, SIZE, SIZE) for s in model.streams}
    with torch.no_grad():
        out = model(x)
    assert out.logits.shape == (2, 1)
    assert out.view_weights.shape == (2, len(views))
    torch.testing.assert_close(out.view_weights.sum(1), torch.ones(2))
    for s in model.streams:
        assert out.slice_weights[s].shape == (2, 6)


def test_streams_have_their_own_adapters(backbone):
    model = AnyMC3D(backbone, _spec(backbone, ["axial", "coronal"]), adapter_prefix="own_").eval()
    x = torch.rand(4, 1, SIZE, SIZE)
    with torch.no_grad():
        before = model.embed_slices("image:coronal", x)[0]
        for name, p in model.lora_parameters().items():
            if name.startswith("lora.image:axial.") and "lora_B" in name:
                p.add_(0.5)
        after_axial = model.embed_slices("image:axial", x)[0]
        after_coronal = model.embed_slices("image:coronal", x)[0]
    torch.testing.assert_close(before, after_coronal)          # coronal adapter untouched
    assert not torch.allclose(after_axial, after_coronal)      # axial adapter changed the output


def _write(path, arr, affine=np.eye(4)):
    nib.save(nib.Nifti1Image(arr.astype(np.float32), affine), str(path))
    return path


def test_missing_sequence_is_masked_out_of_fusion(backbone, tmp_path):
    model = AnyMC3D(backbone, _spec(backbone, ["axial"], inputs=("t1", "t2")), adapter_prefix="seq_").eval()
    pred = Predictor(model)
    rng = np.random.default_rng(0)
    t1 = _write(tmp_path / "t1.nii.gz", rng.random((10, 10, 8)))
    t2 = _write(tmp_path / "t2.nii.gz", rng.random((10, 10, 8)))
    full = pred.predict({"t1": t1, "t2": t2}, case_id="full")
    part = pred.predict({"t1": t1, "t2": None}, case_id="part")
    assert full["views_used"] == ["t1:axial", "t2:axial"]
    assert part["views_used"] == ["t1:axial"] and part["views_missing"] == ["t2:axial"]
    assert "t2:axial" not in part["view_weights"]
    assert part["view_weights"]["t1:axial"] == pytest.approx(1.0)
    # the missing input contributes nothing: the result equals a t1-only fusion
    t1_only = prepare_case(Case("c", {"t1": t1}), pred.specs)
    slices = {"t1:axial": to_slices(t1_only.arrays["t1"], pred.specs["t1"], "axial")[None]}
    with torch.no_grad():
        alone = model(slices, present=torch.tensor([[True, False]]))
    p_alone = float(model.probabilities(alone.logits)[0, 0])
    assert part["probabilities"]["pos"] == pytest.approx(p_alone, abs=1e-5)
    with pytest.raises(InputError):
        pred.predict({"t1": None, "t2": None}, case_id="none")


def test_seg_loss_only_on_cases_with_masks():
    torch.manual_seed(0)
    logits = torch.randn(3, 4, 8, 8, requires_grad=True)
    target = (torch.rand(3, 4, 8, 8) > 0.7).float()
    valid = torch.tensor([True, False, True])
    loss = dice_ce_loss(logits, target, valid)
    loss.backward()
    assert torch.all(logits.grad[1] == 0)          # the case without a mask gets no gradient
    assert logits.grad[0].abs().sum() > 0
    sub = dice_ce_loss(logits.detach()[[0, 2]], target[[0, 2]], torch.tensor([True, True]))
    assert loss.item() == pytest.approx(sub.item())
    none = dice_ce_loss(logits, target, torch.tensor([False, False, False]))
    assert none.item() == 0.0 and none.requires_grad  # zero, but still part of the graph


def test_decoder_shapes_and_params():
    dec = SegDecoder3D(1280, 32)
    out = dec(torch.randn(2, 5, 2, 2, 1280), (16, 16))
    assert out.shape == (2, 5, 16, 16)
    assert sum(p.numel() for p in dec.parameters()) < 100_000


def test_mask_shape_mismatch_is_a_clear_error(tmp_path):
    img = _write(tmp_path / "img.nii.gz", np.random.default_rng(0).random((10, 10, 8)))
    mask = _write(tmp_path / "mask.nii.gz", np.zeros((10, 10, 7)))
    specs = {"image": PreprocessSpec(views=["axial"], size=SIZE)}
    with pytest.raises(InputError) as err:
        prepare_case(Case("c", {"image": img}, mask=mask), specs)
    assert "mask.nii.gz" in str(err.value) and "img.nii.gz" in str(err.value)


def test_masks_for_some_cases_train_and_decoder_not_saved(tmp_path):
    ds = make_task("lesion_binary", 16, seed=1, size=16)
    manifest = write_task(ds, tmp_path / "data")
    rows = list(csv.DictReader(open(manifest)))
    for i, r in enumerate(rows):           # keep masks for a third of the cases only
        if i % 3:
            r["mask"] = ""
    with open(manifest, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    pre = PreprocessOptions(size=SIZE, intensity="ct", windows="abdomen")
    cfg = TrainConfig(epochs=1, batch_size=4, progress=False)
    with_mask = train_plugin(manifest, "efficientnet_lite0", tmp_path / "seg", preprocess=pre, config=cfg)
    assert with_mask["seg_decoder_params"] > 0
    assert 0 < with_mask["n_train_with_mask"] < with_mask["n_train"]
    assert "train_seg_loss" in with_mask["history"][0]
    cfg0 = TrainConfig(epochs=1, batch_size=4, progress=False, seg_weight=0.0)
    without = train_plugin(manifest, "efficientnet_lite0", tmp_path / "noseg", preprocess=pre, config=cfg0)
    assert without["seg_decoder_params"] == 0
    keys_seg = set(load_file(str(tmp_path / "seg" / "plugin.safetensors")))
    keys_plain = set(load_file(str(tmp_path / "noseg" / "plugin.safetensors")))
    assert keys_seg == keys_plain                   # the decoder is not part of the inference plugin
