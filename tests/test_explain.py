"""Heatmaps (issue 4): input-space NIfTI maps, attention without register tokens, Grad-CAM for CNNs,
multi-view combination, localisation scores, and the ``explain`` / ``predict --heatmaps`` commands.

Models are built in memory (no training): real EfficientNet-Lite0 weights with an *analytic* head
(the direction "lesion slices minus other slices" in feature space), so a lesion placed off-centre
must be found by the pointing game; ViTs are randomly initialised.
"""
from __future__ import annotations

import csv
import json

import nibabel as nib
import numpy as np
import pytest
import torch

from anymc3d.backbones import create_backbone
from anymc3d.data.cases import Case
from anymc3d.explain import Explainer, localization_scores, random_map
from anymc3d.explain.attention import capture_cls_attention
from anymc3d.explain.localization import pointing_location, voxel_auroc
from anymc3d.runtime.batching import prepare_case, slice_streams
from anymc3d.plugins.model import AnyMC3D
from anymc3d.plugins import LoraSpec
from anymc3d.plugins.spec import PluginSpec
from anymc3d.preprocess import PreprocessSpec, to_slices
from anymc3d.preprocess.spatial import apply_spatial
from anymc3d.volume import Volume

SIZE = 96
SHAPE = (14, 22, 18)
# Not RAS (axes permuted and flipped) and anisotropic (0.9 / 2.0 / 1.5 mm).
AFFINE = np.array([[0, 0, -1.5, 20.0], [-0.9, 0, 0, 10.0], [0, 2.0, 0, -30.0], [0, 0, 0, 1.0]])
LESION = (4, 15, 12)  # voxel index, far from the centre (7, 11, 9)


def phantom(centre=LESION, seed=0):
    rng = np.random.default_rng(seed)
    arr = (rng.random(SHAPE) * 0.1).astype(np.float32)
    g = np.stack(np.meshgrid(*[np.linspace(-1, 1, s) for s in SHAPE], indexing="ij"))
    arr += 0.4 * ((g ** 2).sum(0) < 0.8)
    idx = np.indices(SHAPE)
    # round in millimetres on the anisotropic grid (semi-axes 1.6, 2.6, 2.2 voxels)
    mask = (((idx[0] - centre[0]) / 1.6) ** 2 + ((idx[1] - centre[1]) / 2.6) ** 2
            + ((idx[2] - centre[2]) / 2.2) ** 2) <= 1
    arr[mask] = 1.0
    return arr, mask


@pytest.fixture(scope="module")
def lite0():
    return create_backbone("efficientnet_lite0", input_size=SIZE)


_counter = iter(range(10_000))


def make_model(bb, views=("axial",), spacing=None, task_type="binary", labels=("absent", "present"), size=SIZE,
               lora_r=4):
    pre = PreprocessSpec(views=list(views), size=size, intensity="minmax", spacing=spacing)
    spec = PluginSpec(task="t", task_type=task_type, label_names=list(labels), inputs=["image"],
                      preprocess={"image": pre.to_dict()}, backbone=bb.name, backbone_fingerprint=bb.fingerprint,
                      input_size=size, lora=LoraSpec(r=lora_r))
    torch.manual_seed(0)
    return AnyMC3D(bb, spec, adapter_prefix=f"t{next(_counter)}_").eval()


def analytic_head(model, vol, mask, rows=(0,)):
    """Set head rows to the unit direction mean(lesion-slice embeddings) - mean(other slices)."""
    specs = {"image": PreprocessSpec.from_dict(model.spec.preprocess["image"])}
    pc = prepare_case(Case("c", {"image": vol}), specs)
    stacks = slice_streams(pc, specs, model.streams)
    cm = apply_spatial(mask.astype(np.float32), pc.records["image"], order=0)
    with torch.no_grad():
        feats = torch.cat([model.embed_slices(s, stacks[s])[0] for s in stacks])
        les = torch.cat([to_slices(cm, specs["image"], s.split(":")[1], mode="nearest").flatten(1).amax(1) > 0
                         for s in stacks])
        w = feats[les].mean(0) - feats[~les].mean(0)
        model.head[1].weight.zero_()
        model.head[1].bias.zero_()
        for r in rows:
            model.head[1].weight[r] = w / w.norm()


# ------------------------------------------------------------------------------------------ scores
def test_localization_scores_analytic():
    mask = np.zeros((8, 8, 8), bool)
    mask[2:4, 5:7, 1:3] = True
    perfect = mask.astype(np.float32)
    s = localization_scores(perfect, mask)
    assert s == {"pointing_game": 1.0, "energy_in_mask": 1.0, "auroc": 1.0}
    inv = 1.0 - perfect
    s = localization_scores(inv, mask)
    assert s["pointing_game"] == 0.0 and s["energy_in_mask"] == 0.0 and s["auroc"] == 0.0
    assert voxel_auroc(np.ones_like(perfect), mask) == 0.5  # ties count one half
    # a plateau of maxima points at its centre, not at its first voxel
    plateau = np.zeros((9, 9, 9), np.float32)
    plateau[0:7, 0:7, 0:7] = 1.0
    assert pointing_location(plateau) == (3, 3, 3)
    # pointing tolerance in millimetres (anisotropic spacing)
    near = np.zeros((8, 8, 8), np.float32)
    near[4, 5, 1] = 1.0  # one voxel (2 mm along x) from the mask (x = 2..3)
    assert localization_scores(near, mask)["pointing_game"] == 0.0
    assert localization_scores(near, mask, tolerance_mm=2.0, spacing=(2.0, 1.0, 1.0))["pointing_game"] == 1.0
    r = localization_scores(random_map((8, 8, 8), "case"), mask)
    assert abs(r["auroc"] - 0.5) < 0.2
    assert np.array_equal(random_map((3, 3, 3), "a"), random_map((3, 3, 3), "a"))


# ------------------------------------------------------------------------------------------ CNN
def test_cnn_heatmap_input_space_non_ras_and_pointing(lite0, tmp_path):
    arr, mask = phantom()
    path = tmp_path / "scan.nii.gz"
    nib.save(nib.Nifti1Image(arr, AFFINE), str(path))
    model = make_model(lite0)
    vol = Volume(arr, AFFINE, {"path": str(path)})
    analytic_head(model, vol, mask)
    # total evidence per slice from the last stage, in-plane distribution from LayerCAM at stride 8
    ex = Explainer(model, cam_layers="last|lc-s8")
    assert ex.method == "gradcam"
    hm = ex.explain(path)
    heat = hm.maps["present"]
    assert heat.shape == SHAPE and heat.dtype == np.float32 and heat.max() == pytest.approx(1.0) and heat.min() >= 0
    files = ex.write(hm, tmp_path / "out", figure=True, mask=mask)
    assert [p.name for p in files] == ["scan_heatmap.nii.gz", "scan_heatmap.png"]
    img = nib.load(str(files[0]))
    assert img.shape == SHAPE
    np.testing.assert_allclose(img.affine, AFFINE, atol=1e-5)
    np.testing.assert_allclose(np.asarray(img.dataobj), heat, atol=1e-6)
    s = localization_scores(heat, mask)
    assert s["pointing_game"] == 1.0, pointing_location(heat)
    assert s["auroc"] > 0.9
    assert s["energy_in_mask"] > 5 * mask.mean()
    # the default layers also rank the lesion voxels high
    assert localization_scores(Explainer(model).explain(vol).maps["present"], mask)["auroc"] > 0.8


def test_cnn_heatmap_undoes_resampling(lite0):
    arr, mask = phantom()
    model = make_model(lite0, spacing=(1.5, 1.5, 1.5), size=64)
    vol = Volume(arr, AFFINE, {"path": "scan.nii.gz"})
    analytic_head(model, vol, mask)
    hm = Explainer(model).explain(vol)
    assert tuple(hm.record.canonical_shape) != SHAPE  # really resampled and reoriented
    assert hm.maps["present"].shape == SHAPE
    np.testing.assert_allclose(hm.affine, AFFINE)
    assert localization_scores(hm.maps["present"], mask)["auroc"] > 0.85


def test_multiview_combination_keeps_grid(lite0):
    arr, mask = phantom()
    model = make_model(lite0, views=("axial", "coronal", "sagittal"), size=64)
    vol = Volume(arr, AFFINE, {"path": "scan.nii.gz"})
    analytic_head(model, vol, mask)
    with torch.no_grad():  # make the view weights unequal
        model.view_pool.query.normal_(0, 0.3)
    hm = Explainer(model).explain(vol)
    assert set(hm.view_weights) == {"image:axial", "image:coronal", "image:sagittal"}
    assert sum(hm.view_weights.values()) == pytest.approx(1.0, abs=1e-5)
    assert len(set(round(v, 6) for v in hm.view_weights.values())) == 3
    assert hm.maps["present"].shape == SHAPE
    assert localization_scores(hm.maps["present"], mask)["auroc"] > 0.85
    # every view's slice count is its own axis of the canonical grid
    canon = hm.record.canonical_shape
    assert [len(hm.slice_weights[f"image:{v}"]) for v in ("sagittal", "coronal", "axial")] == list(canon)


# ------------------------------------------------------------------------------------------ ViT
def _manual_cls_attention(bb, x):
    """Class-to-patch attention recomputed from the last block's qkv output (and RoPE for Eva)."""
    attn = bb.model.blocks[-1].attn
    cap = {}
    h1 = attn.qkv.register_forward_hook(lambda m, i, o: cap.__setitem__("qkv", o))
    h2 = attn.register_forward_pre_hook(lambda m, a, k: cap.__setitem__("kw", k), with_kwargs=True)
    with torch.no_grad():
        bb(x)
    h1.remove()
    h2.remove()
    b, n, _ = cap["qkv"].shape
    q, k, _v = cap["qkv"].reshape(b, n, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4)
    q, k = attn.q_norm(q), attn.k_norm(k)
    rope = cap["kw"].get("rope")
    if rope is not None:
        from timm.layers import apply_rot_embed_cat

        p = attn.num_prefix_tokens
        q = torch.cat([q[:, :, :p], apply_rot_embed_cat(q[:, :, p:], rope, half=attn.rotate_half)], 2)
        k = torch.cat([k[:, :, :p], apply_rot_embed_cat(k[:, :, p:], rope, half=attn.rotate_half)], 2)
    a = ((q * attn.scale) @ k.transpose(-2, -1)).softmax(-1)
    return a[:, :, 0].mean(1)  # (B, N) over all tokens


@pytest.mark.parametrize("name,size", [("dinov2_vits14_reg", 56), ("dinov3_vits16", 64)])
def test_vit_attention_excludes_register_tokens(name, size):
    bb = create_backbone(name, weights="random", input_size=size)
    assert bb.num_prefix_tokens == 5  # class + 4 registers
    x = torch.rand(2, 3, size, size)
    with torch.no_grad():
        ref = bb(x).cls
        with capture_cls_attention(bb) as store:
            out = bb(x).cls
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)  # capturing does not change the model
    grid = (size // bb.patch_size) ** 2
    got = torch.cat(store)
    assert got.shape == (2, grid)
    full = _manual_cls_attention(bb, x)
    assert full.shape[1] == grid + 5
    torch.testing.assert_close(got, full[:, 5:], atol=1e-5, rtol=1e-4)
    # the excluded prefix (class + register) share is exactly what is missing from the row
    torch.testing.assert_close(got.sum(1) + full[:, :5].sum(1), torch.ones(2), atol=1e-5, rtol=0)
    assert bool((full[:, 1:5].sum(1) > 0).all())


def test_vit_attention_heatmap_comes_from_adapted_model():
    bb = create_backbone("dinov2_vits14_reg", weights="random", input_size=28)
    model = make_model(bb, size=28, lora_r=2)
    arr, _ = phantom()
    vol = Volume(arr, AFFINE, {"path": "scan.nii.gz"})
    ex = Explainer(model)
    assert ex.method == "attention"
    before = ex.explain(vol).maps["present"]
    assert before.shape == SHAPE and np.isfinite(before).all() and before.max() == pytest.approx(1.0)
    with torch.no_grad():  # a non-zero LoRA update on the last block's qkv changes the attention
        for n, p in model.backbone.model.named_parameters():
            if "lora_B" in n and "blocks.11.attn.qkv" in n:
                p.normal_(0, 0.5)
    after = ex.explain(vol).maps["present"]
    assert not np.allclose(before, after, atol=1e-4)
    # Grad-CAM also runs on a ViT (tokens reshaped to the patch grid, registers dropped)
    cam = Explainer(model, method="gradcam").explain(vol).maps["present"]
    assert cam.shape == SHAPE


# ------------------------------------------------------------------------------------------ CLI
def _write_case(folder, name, centre, seed):
    arr, mask = phantom(centre, seed)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    (folder / "masks").mkdir(exist_ok=True)
    nib.save(nib.Nifti1Image(arr, AFFINE), str(folder / "images" / f"{name}.nii.gz"))
    nib.save(nib.Nifti1Image(mask.astype(np.uint8), AFFINE), str(folder / "masks" / f"{name}_mask.nii.gz"))
    return arr, mask


def test_explain_cli_multilabel_manifest_and_predict_heatmaps(lite0, tmp_path):
    from anymc3d.cli import main
    from anymc3d.plugins.file import save_plugin

    data = tmp_path / "data"
    arr, mask = _write_case(data, "c0", LESION, 0)
    _write_case(data, "c1", (9, 6, 5), 1)
    with (data / "manifest.csv").open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["id", "image", "a", "b", "mask"])
        w.writerow(["c0", "images/c0.nii.gz", 1, 0, "masks/c0_mask.nii.gz"])
        w.writerow(["c1", "images/c1.nii.gz", 1, 1, "masks/c1_mask.nii.gz"])
    (data / "task.json").write_text(json.dumps({"label_columns": ["a", "b"]}))
    model = make_model(lite0, task_type="multilabel", labels=("a", "b"), size=64)
    analytic_head(model, Volume(arr, AFFINE, {"path": "x"}), mask, rows=(0, 1))
    plugin = tmp_path / "plugin"
    save_plugin(model, plugin)

    out = tmp_path / "explain"
    assert main(["explain", str(plugin), str(data / "manifest.csv"), "--out", str(out), "--top-k", "2"]) == 0
    for cid in ("c0", "c1"):
        for lab in ("a", "b"):
            img = nib.load(str(out / f"{cid}_{lab}_heatmap.nii.gz"))
            assert img.shape == SHAPE
            np.testing.assert_allclose(img.affine, AFFINE, atol=1e-5)
            assert (out / f"{cid}_{lab}_heatmap.png").stat().st_size > 1000
    loc = json.loads((out / "localization.json").read_text())
    assert loc["n_cases"] == 2 and loc["n_scored"] == 3  # c0 scores label a; c1 labels a and b
    assert set(loc["mean"]) == set(loc["random"]) == {"pointing_game", "energy_in_mask", "auroc"}
    assert loc["mean"]["auroc"] > loc["random"]["auroc"]
    assert (out / "localization.csv").is_file() and (out / "explain.json").is_file()
    # predict --heatmaps over the same manifest scores the same maps per volume and merges the same table
    out4 = tmp_path / "pred_manifest"
    assert main(["predict", str(plugin), str(data / "manifest.csv"), "--out", str(out4), "--heatmaps"]) == 0
    loc4 = json.loads((out4 / "localization.json").read_text())
    assert (loc4["n_cases"], loc4["n_scored"]) == (2, 3)
    for key in ("mean", "random"):
        for score, value in loc[key].items():
            assert abs(loc4[key][score] - value) < 1e-6, (key, score)
    assert json.loads((out4 / "c1.json").read_text())["heatmaps"]["scores"][0]["id"] == "c1"
    assert (out4 / "localization.csv").is_file()

    # a binary plugin, a folder of images with a mask folder; and predict --heatmaps
    bmodel = make_model(lite0, size=64)
    analytic_head(bmodel, Volume(arr, AFFINE, {"path": "x"}), mask)
    bplugin = tmp_path / "bplugin"
    save_plugin(bmodel, bplugin)
    out2 = tmp_path / "explain2"
    assert main(["explain", str(bplugin), str(data / "images"), "--masks", str(data / "masks"), "--out", str(out2),
                 "--no-figure"]) == 0
    loc2 = json.loads((out2 / "localization.json").read_text())
    assert loc2["n_cases"] == 2 and loc2["mean"]["auroc"] > max(0.7, loc2["random"]["auroc"])
    assert sorted(p.name for p in out2.glob("*.nii.gz")) == ["c0_heatmap.nii.gz", "c1_heatmap.nii.gz"]
    out3 = tmp_path / "pred"
    assert main(["predict", str(bplugin), str(data / "images" / "c0.nii.gz"), "--out", str(out3), "--heatmaps"]) == 0
    assert (out3 / "c0.json").is_file() and (out3 / "c0_heatmap.png").is_file()
    assert nib.load(str(out3 / "c0_heatmap.nii.gz")).shape == SHAPE
    # a label the plugin does not have fails with one line and exit code 2
    assert main(["explain", str(bplugin), str(data / "images"), "--labels", "nope", "--out", str(out2)]) == 2


def test_predict_heatmaps_reads_and_runs_each_volume_once(lite0, tmp_path, monkeypatch):
    """``predict --heatmaps`` reports the pass that made the heatmaps: the same result as ``predict``
    (probabilities, slice and view weights), from one full read of the volume."""
    from anymc3d.cli import main
    from anymc3d.io.readers import registry
    from anymc3d.plugins.file import save_plugin

    _write_case(tmp_path / "data", "c0", LESION, 0)
    model = make_model(lite0, size=64)  # its random head answers well inside (0, 1)
    plugin = tmp_path / "plugin"
    save_plugin(model, plugin)
    image = tmp_path / "data" / "images" / "c0.nii.gz"
    reads = []
    real = registry._read_volume

    def counted(p, affine, content_warnings, header_only=False):
        reads.append(header_only)
        return real(p, affine, content_warnings, header_only)

    monkeypatch.setattr(registry, "_read_volume", counted)
    results = {}
    for name, extra in (("plain", []), ("heat", ["--heatmaps"])):
        reads.clear()
        out = tmp_path / name
        assert main(["predict", str(plugin), str(image), "--out", str(out), "--engine", "torch", *extra]) == 0
        assert reads.count(False) == 1, (name, reads)  # one full read (the input check reads the header)
        results[name] = json.loads((out / "c0.json").read_text())
    plain, heat = results["plain"], results["heat"]
    assert 0.01 < plain["probabilities"]["present"] < 0.99
    assert "heatmaps" in heat and (tmp_path / "heat" / "c0_heatmap.nii.gz").is_file()
    for k, v in plain["probabilities"].items():
        assert abs(heat["probabilities"][k] - v) < 1e-6, k
    assert heat["predicted"] == plain["predicted"]
    for s, w in plain["slice_weights"].items():
        np.testing.assert_allclose(heat["slice_weights"][s], w, atol=1e-6)
