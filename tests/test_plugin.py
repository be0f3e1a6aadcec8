"""Plugin = LoRA adapters + task queries + head: placement, init, counts, views, losses, training,
save/load round trip, fingerprint refusal and exact resume."""
from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from peft.tuners.tuners_utils import BaseTunerLayer
from safetensors.torch import load_file
from torch import nn
from torchvision.ops import sigmoid_focal_loss

from anymc3d.backbones import create_backbone
from anymc3d.data import load_data
from anymc3d.errors import InputError
from anymc3d.runtime.batching import prepare_case
from anymc3d.plugins.model import AnyMC3D
from anymc3d.plugins import LoraSpec, PluginSpec, load_plugin, save_plugin
from anymc3d.plugins.lora import activate
from anymc3d.predict import Predictor
from anymc3d.preprocess import PreprocessSpec
from anymc3d.training.losses import classification_loss
from anymc3d.training.trainer import Batcher, TrainConfig, fit
from anymc3d.training import trainer as trainer_mod

SIZE = 32


def make_spec(bb, views=("axial",), r=4, last_k=None, task_type="binary", labels=("negative", "positive"),
              head_dropout=0.2, size=None) -> PluginSpec:
    size = size or bb.input_size
    pre = PreprocessSpec(size=size, views=list(views)).to_dict()
    return PluginSpec(task="t", task_type=task_type, label_names=list(labels), inputs=["image"],
                      preprocess={"image": pre}, backbone=bb.name, backbone_fingerprint=bb.fingerprint,
                      input_size=bb.input_size, lora=LoraSpec(r=r, last_k=last_k), head_dropout=head_dropout)


def adapted_modules(model: nn.Module) -> set[str]:
    return {n for n, m in model.named_modules() if isinstance(m, BaseTunerLayer)}


def lite0(weights="random"):
    return create_backbone("efficientnet_lite0", weights=weights, input_size=SIZE)


def vit():
    return create_backbone("dinov2_vits14", weights="random", input_size=28)


VIT_EXPECTED = {"patch_embed.proj"} | {f"blocks.{i}.attn.{p}" for i in range(12) for p in ("qkv", "proj")}


# ------------------------------------------------------------------------------------------ placement
def test_lora_placement_efficientnet():
    bb = lite0()
    pointwise = {n for n, m in bb.model.named_modules()
                 if isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1) and m.groups == 1}
    others = {n for n, m in bb.model.named_modules() if isinstance(m, nn.Conv2d)} - pointwise
    assert "conv_head" in pointwise and "conv_stem" in others and any("conv_dw" in n for n in others)
    AnyMC3D(bb, make_spec(bb))
    adapted = adapted_modules(bb.model)
    assert adapted == pointwise
    assert not adapted & others
    for n in adapted:
        base = bb.model.get_submodule(n).base_layer
        assert base.kernel_size == (1, 1) and base.groups == 1


def test_lora_placement_vit():
    bb = vit()
    AnyMC3D(bb, make_spec(bb))
    adapted = adapted_modules(bb.model)
    assert adapted == VIT_EXPECTED
    assert not any("mlp" in n for n in adapted)


def test_lora_last_k():
    bb = vit()
    assert set(bb.lora_targets(last_k=2)) == {f"blocks.{i}.attn.{p}" for i in (10, 11) for p in ("qkv", "proj")}
    AnyMC3D(bb, make_spec(bb, last_k=1))
    assert adapted_modules(bb.model) == {"blocks.11.attn.qkv", "blocks.11.attn.proj"}
    with pytest.raises(ValueError, match="lora_last_k"):
        bb.lora_targets(last_k=13)
    cnn = lite0()
    tail = cnn.lora_targets(last_k=1)
    assert "conv_head" in tail and all(n.startswith("blocks.6.") or n == "conv_head" for n in tail)
    assert set(tail) < set(cnn.lora_targets())
    assert len(cnn.lora_targets(last_k=2)) > len(tail)


def test_r0_means_no_lora():
    bb = lite0()
    m = AnyMC3D(bb, make_spec(bb, r=0))
    assert not adapted_modules(bb.model) and not m.lora_parameters()
    assert m.n_trainable() == 1280 * 2 + 1280 + 1


# ------------------------------------------------------------------------------------------ init
@pytest.mark.parametrize("which", ["efficientnet_lite0", "dinov2_vits14"])
def test_zero_init_b_keeps_frozen_output(which):
    bb = lite0(None) if which == "efficientnet_lite0" else vit()
    x = torch.rand(3, 1, bb.input_size, bb.input_size)
    with torch.no_grad():
        frozen = bb(x).cls
    model = AnyMC3D(bb, make_spec(bb, r=4), autocast=False)
    lora = model.lora_parameters()
    assert lora
    for k, p in lora.items():
        if ".lora_B." in k:
            assert torch.count_nonzero(p) == 0, k
        else:
            assert torch.count_nonzero(p) > 0, k
    with torch.no_grad():
        adapted, _ = model.embed_slices("image:axial", x)
        activate(bb.model, None)
        plain = bb(x).cls
    assert torch.allclose(adapted, frozen, atol=1e-6)
    assert torch.allclose(plain, frozen, atol=1e-6)
    # the queries start at zero: pooling is the plain mean over slices
    h = torch.randn(2, 5, bb.embed_dim)
    v, w = model.slice_pool["image__axial"](h)
    assert torch.allclose(w, torch.full((2, 5), 0.2)) and torch.allclose(v, h.mean(1), atol=1e-5)


# ------------------------------------------------------------------------------------------ counts
def _expected_lora(bb, targets, r):
    total = 0
    for n in targets:
        m = bb.model.get_submodule(n)
        if isinstance(m, nn.Linear):
            total += r * (m.in_features + m.out_features)
        else:
            kh, kw = m.kernel_size
            total += r * (m.in_channels // m.groups * kh * kw) + m.out_channels * r
    return total


@pytest.mark.parametrize("which,views,r,task", [
    ("efficientnet_lite0", ("axial",), 8, "binary"),
    ("efficientnet_lite0", ("axial", "coronal"), 4, "multiclass"),
    ("dinov2_vits14", ("axial", "coronal", "sagittal"), 4, "binary"),
])
def test_parameter_counts(which, views, r, task):
    bb = lite0() if which == "efficientnet_lite0" else vit()
    targets = bb.lora_targets()
    per_stream = _expected_lora(bb, targets, r)
    if which == "efficientnet_lite0":  # all 1x1: sum r * (in + out)
        assert per_stream == sum(r * (bb.model.get_submodule(n).in_channels + bb.model.get_submodule(n).out_channels)
                                 for n in targets)
    labels = ("negative", "positive") if task == "binary" else ("a", "b", "c")
    model = AnyMC3D(bb, make_spec(bb, views=views, r=r, task_type=task, labels=labels))
    d, v = bb.embed_dim, len(views)
    n_out = 1 if task == "binary" else 3
    lora = sum(p.numel() for p in model.lora_parameters().values())
    head = sum(p.numel() for p in model.head_parameters().values())
    assert lora == v * per_stream
    assert head == d * v + d + d * n_out + n_out  # one query per stream + fusion query + linear head
    assert model.n_trainable() == lora + head
    assert len(model.lora_parameters()) == 2 * len(targets) * v
    # only plugin parameters are trainable after set_trainable
    model.set_trainable(True)
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert trainable == {id(p) for p in {**model.lora_parameters(), **model.head_parameters()}.values()}


# ------------------------------------------------------------------------------------------ multi-view
def test_three_views_three_adapters():
    bb = lite0()
    views = ("axial", "coronal", "sagittal")
    model = AnyMC3D(bb, make_spec(bb, views=views, r=2), autocast=False)
    assert model.streams == [f"image:{v}" for v in views]
    names = set(model.adapters.values())
    assert len(names) == 3
    assert set(bb.model.conv_head.lora_A) == names
    x = torch.rand(4, 1, SIZE, SIZE)
    with torch.no_grad():
        before = {s: model.embed_slices(s, x)[0] for s in model.streams}
    for s in model.streams[1:]:
        assert torch.allclose(before[s], before[model.streams[0]], atol=1e-6)
    torch.manual_seed(0)
    with torch.no_grad():
        for k, p in model.lora_parameters().items():
            if k.startswith("lora.image:coronal.") and ".lora_B." in k:
                p.normal_(0, 0.05)
        after = {s: model.embed_slices(s, x)[0] for s in model.streams}
    assert torch.allclose(after["image:axial"], before["image:axial"], atol=1e-6)
    assert torch.allclose(after["image:sagittal"], before["image:sagittal"], atol=1e-6)
    assert not torch.allclose(after["image:coronal"], before["image:coronal"], atol=1e-3)
    # the whole forward: per-stream slice weights, a fusion weight per view
    slices = {s: torch.rand(2, n, 1, SIZE, SIZE) for s, n in zip(model.streams, (5, 4, 3))}
    model.eval()
    with torch.no_grad():
        out = model(slices)
    assert out.logits.shape == (2, 1) and out.view_weights.shape == (2, 3)
    assert torch.allclose(out.view_weights.sum(1), torch.ones(2))
    assert {s: tuple(w.shape) for s, w in out.slice_weights.items()} == {
        "image:axial": (2, 5), "image:coronal": (2, 4), "image:sagittal": (2, 3)}
    # a missing view is masked out of the fusion
    with torch.no_grad():
        out2 = model({s: slices[s] for s in model.streams[:2]},
                     present=torch.tensor([[True, True, False]] * 2))
    assert torch.all(out2.view_weights[:, 2] == 0)


# ------------------------------------------------------------------------------------------ losses
def test_losses():
    torch.manual_seed(0)
    logits = torch.randn(6, 1)
    y = torch.tensor([0, 1, 1, 0, 1, 0])
    focal = classification_loss(logits, y, "binary", "focal", gamma=2.0, alpha=0.25)
    ref = sigmoid_focal_loss(logits, y.float().view(6, 1), alpha=0.25, gamma=2.0, reduction="mean")
    assert torch.allclose(focal, ref)
    assert torch.allclose(classification_loss(logits, y, "binary", "bce"),
                          F.binary_cross_entropy_with_logits(logits, y.float().view(6, 1)))
    # focal with gamma 0 and no alpha is BCE
    assert torch.allclose(classification_loss(logits, y, "binary", "focal", gamma=0.0, alpha=-1),
                          F.binary_cross_entropy_with_logits(logits, y.float().view(6, 1)))
    pw = torch.tensor([3.0])
    assert torch.allclose(classification_loss(logits, y, "binary", "bce", class_weights=pw),
                          F.binary_cross_entropy_with_logits(logits, y.float().view(6, 1), pos_weight=pw))
    # confident right answers cost less than confident wrong ones, focal discounts easy examples more
    good, bad = (y.float().view(6, 1) * 2 - 1) * 4, -(y.float().view(6, 1) * 2 - 1) * 4
    for kind in ("focal", "bce"):
        assert classification_loss(good, y, "binary", kind) < classification_loss(bad, y, "binary", kind)
    assert (classification_loss(good, y, "binary", "focal") / classification_loss(bad, y, "binary", "focal")
            < classification_loss(good, y, "binary", "bce") / classification_loss(bad, y, "binary", "bce"))
    # multiclass
    lm = torch.randn(6, 3)
    ym = torch.tensor([0, 1, 2, 2, 1, 0])
    assert torch.allclose(classification_loss(lm, ym, "multiclass", "ce"), F.cross_entropy(lm, ym))
    assert torch.allclose(classification_loss(lm, ym.view(6, 1), "multiclass", "focal", gamma=0.0), F.cross_entropy(lm, ym))
    assert classification_loss(lm, ym, "multiclass", "focal") < F.cross_entropy(lm, ym)
    cw = torch.tensor([1.0, 2.0, 0.5])
    # class weights scale each case's CE; the mean is over cases (not torch's weight-normalised mean)
    assert torch.allclose(classification_loss(lm, ym, "multiclass", "ce", class_weights=cw),
                          (cw[ym] * F.cross_entropy(lm, ym, reduction="none")).mean())
    with pytest.raises(ValueError):
        classification_loss(lm, ym, "multiclass", "bce")
    with pytest.raises(ValueError):
        classification_loss(logits, y, "binary", "ce")
    # multilabel
    ll = torch.randn(4, 2)
    yl = torch.tensor([[1, 0], [0, 1], [1, 1], [0, 0]])
    assert torch.allclose(classification_loss(ll, yl, "multilabel", "bce"),
                          F.binary_cross_entropy_with_logits(ll, yl.float()))
    assert classification_loss(ll, yl, "multilabel", "focal").ndim == 0


# ------------------------------------------------------------------------------------------ data helpers
@pytest.fixture(scope="module")
def prepared_binary(binary_manifest):
    task = load_data(binary_manifest)
    specs = {"image": PreprocessSpec(size=SIZE, views=["axial"])}
    return {s: [prepare_case(c, specs) for c in task.cases if c.split == s] for s in ("train", "val", "test")}, specs


def test_optimisation_reduces_training_loss(prepared_binary):
    prepared, specs = prepared_binary
    bb = lite0(None)
    model = AnyMC3D(bb, make_spec(bb, r=4, head_dropout=0.0))
    model.set_trainable(True)
    batcher = Batcher(model, specs)
    b = batcher.batch(prepared["train"])
    slices, masks, present, y = b.slices, b.masks, b.present, b.labels

    def loss_now():
        out = model(slices, masks, present)
        return classification_loss(out.logits.float(), y, "binary", "bce")

    model.train()
    with torch.no_grad():
        start = float(loss_now())
    opt = torch.optim.AdamW([{"params": list(model.lora_parameters().values()), "lr": 1e-3},
                             {"params": list(model.head_parameters().values()), "lr": 1e-2}])
    for _ in range(10):
        loss = loss_now()
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        end = float(loss_now())
    assert end < 0.7 * start, (start, end)
    assert any(torch.count_nonzero(p) > 0 for k, p in model.lora_parameters().items() if ".lora_B." in k)


def test_fit_writes_log_and_checkpoint(prepared_binary, tmp_path):
    prepared, specs = prepared_binary
    bb = lite0(None)
    model = AnyMC3D(bb, make_spec(bb, r=4))
    cfg = TrainConfig(epochs=2, batch_size=4, progress=False, lr_head=1e-2)
    summary = fit(model, specs, prepared["train"], prepared["val"], cfg, tmp_path)
    assert summary["epochs_run"] == 2 and len(summary["history"]) == 2
    assert (tmp_path / "train_log.csv").is_file() and (tmp_path / "checkpoint.pt").is_file()
    header = (tmp_path / "train_log.csv").read_text().splitlines()[0].split(",")
    assert {"epoch", "train_loss", "val_auc", "val_acc", "lr_head"} <= set(header)
    ck = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    best = ck["best_state"]
    # the best-by-validation state is left loaded in the model
    for k, v in model.trainable_state().items():
        assert torch.equal(v, best[k]), k
    assert not model.training


# ------------------------------------------------------------------------------------------ save / load
@pytest.mark.parametrize("views", [("axial",), ("axial", "coronal")])
def test_save_load_round_trip(tmp_path, positive_volume, negative_volume, views):
    bb = lite0(None)
    model = AnyMC3D(bb, make_spec(bb, views=views, r=4))
    torch.manual_seed(1)
    with torch.no_grad():
        for p in {**model.lora_parameters(), **model.head_parameters()}.values():
            p.normal_(0, 0.02)
    model.eval()
    jpath, tpath = save_plugin(model, tmp_path / "plugin")
    assert jpath.name == "plugin.json" and tpath.name == "plugin.safetensors"
    stored = load_file(str(tpath))
    assert set(stored) == set(model.trainable_state())
    assert sum(v.numel() for v in stored.values()) == model.n_trainable()
    assert not any(k.startswith(("conv", "blocks", "bn")) for k in stored)  # no backbone weights
    spec = json.loads(jpath.read_text())
    assert spec["backbone_fingerprint"] == bb.fingerprint and spec["preprocess"]["image"]["views"] == list(views)

    loaded = load_plugin(tmp_path / "plugin")  # backbone rebuilt from the spec (packaged weights)
    assert loaded.backbone is not bb and loaded.backbone.fingerprint == bb.fingerprint
    for k, v in model.trainable_state().items():
        assert torch.equal(loaded.trainable_state()[k], v), k
    a = Predictor(model).predict_many([positive_volume, negative_volume])
    b = Predictor(loaded).predict_many([positive_volume, negative_volume])
    for ra, rb in zip(a, b):
        assert ra["probabilities"] == rb["probabilities"]
        assert ra["slice_weights"] == rb["slice_weights"]
    # the .json or the .safetensors path work as well as the folder
    again = load_plugin(tpath)
    assert torch.equal(again.trainable_state()["head.1.weight"], model.trainable_state()["head.1.weight"])


def test_load_on_other_weights_is_refused(trained_plugin):
    spec = json.loads((trained_plugin / "plugin.json").read_text())
    with pytest.raises(InputError) as ei:
        load_plugin(trained_plugin, weights="random")
    msg = str(ei.value)
    random_fp = create_backbone("efficientnet_lite0", weights="random", input_size=SIZE).fingerprint
    assert spec["backbone_fingerprint"] in msg and random_fp in msg and "\n" not in msg
    with pytest.raises(InputError, match=spec["backbone_fingerprint"]):
        load_plugin(trained_plugin, backbone=vit())


def test_load_broken_plugin_files(trained_plugin, tmp_path):
    d = tmp_path / "p"
    d.mkdir()
    (d / "plugin.json").write_text((trained_plugin / "plugin.json").read_text())
    with pytest.raises(InputError, match="plugin tensors not found"):
        load_plugin(d)
    (d / "plugin.safetensors").write_bytes(b"garbage")
    with pytest.raises(InputError, match="cannot read plugin tensors"):
        load_plugin(d)
    state = load_file(str(trained_plugin / "plugin.safetensors"))
    state.pop("query.fusion")
    from safetensors.torch import save_file
    save_file(state, str(d / "plugin.safetensors"))
    with pytest.raises(InputError, match="do not match the spec"):
        load_plugin(d)
    (d / "plugin.json").write_text("{not json")
    with pytest.raises(InputError, match="not a valid plugin spec"):
        load_plugin(d)
    with pytest.raises(InputError, match="plugin spec not found"):
        load_plugin(tmp_path / "nothing")


# ------------------------------------------------------------------------------------------ resume
class _Interrupted(Exception):
    pass


def _trainable_equal(a: dict, b: dict, atol=1e-6):
    assert set(a) == set(b)
    worst = max(float((a[k].float() - b[k].float()).abs().max()) for k in a)
    assert worst <= atol, worst


@pytest.mark.parametrize("head_dropout,ema,mixup", [(0.0, 0.0, 0.0), (0.2, 0.0, 0.0), (0.0, 0.9, 0.0), (0.0, 0.0, 0.4)])
def test_resume_matches_uninterrupted(prepared_binary, tmp_path, monkeypatch, head_dropout, ema, mixup):
    prepared, specs = prepared_binary
    train, val = prepared["train"], prepared["val"]
    cfg = TrainConfig(epochs=2, batch_size=4, progress=False, lr_lora=1e-3, lr_head=1e-2, augment=True, ema=ema,
                      mixup=mixup)

    def new_model():
        bb = lite0(None)
        torch.manual_seed(0)  # LoRA A is initialised from the global RNG
        return AnyMC3D(bb, make_spec(bb, r=4, head_dropout=head_dropout))

    # uninterrupted: 2 epochs in one go
    full = new_model()
    fit(full, specs, train, val, cfg, tmp_path / "full")
    ck_full = torch.load(tmp_path / "full" / "checkpoint.pt", weights_only=True)

    # interrupted right after epoch 1 was checkpointed (first batch of epoch 2), then resumed in a fresh model
    calls_per_epoch = 2 + 1  # 8 train cases / 4 + one validation batch
    original = Batcher.batch
    count = {"n": 0}

    def interrupting(self, *args, **kwargs):
        count["n"] += 1
        if count["n"] > calls_per_epoch:
            raise _Interrupted
        return original(self, *args, **kwargs)

    with monkeypatch.context() as mp:
        mp.setattr(trainer_mod.Batcher, "batch", interrupting)
        with pytest.raises(_Interrupted):
            fit(new_model(), specs, train, val, cfg, tmp_path / "resumed")
    ck1 = torch.load(tmp_path / "resumed" / "checkpoint.pt", weights_only=True)
    assert ck1["epoch"] == 0
    resumed = new_model()
    summary = fit(resumed, specs, train, val, cfg, tmp_path / "resumed", resume=True)
    ck_res = torch.load(tmp_path / "resumed" / "checkpoint.pt", weights_only=True)
    assert summary["epochs_run"] == 2 and ck_res["epoch"] == 1
    h_full, h_res = json.loads(ck_full["history"]), json.loads(ck_res["history"])
    assert [r["epoch"] for r in h_res] == [1, 2]
    assert np.allclose([r["train_loss"] for r in h_full], [r["train_loss"] for r in h_res], atol=1e-5)
    _trainable_equal(ck_full["trainable"], ck_res["trainable"])  # state after the last epoch
    _trainable_equal(full.trainable_state(), resumed.trainable_state())  # best state, loaded at the end
    if ema:  # the weights' average went through the checkpoint too
        _trainable_equal(ck_full["ema"], ck_res["ema"])


def test_ema_weights_are_validated_and_saved(prepared_binary, tmp_path):
    """With ``ema`` the plugin keeps the averaged weights it validated (one epoch: the best is the only one),
    not the live weights training ended with; without it, the live ones."""
    prepared, specs = prepared_binary
    bb = lite0(None)
    for ema in (0.0, 0.5):
        cfg = TrainConfig(epochs=1, batch_size=4, progress=False, lr_lora=1e-3, lr_head=1e-2, augment=False, ema=ema)
        torch.manual_seed(0)
        model = AnyMC3D(bb, make_spec(bb, r=4), adapter_prefix=f"e{int(ema * 10)}_")
        fit(model, specs, prepared["train"], prepared["val"], cfg, tmp_path / str(ema))
        ck = torch.load(tmp_path / str(ema) / "checkpoint.pt", weights_only=True)
        saved, live = model.trainable_state(), ck["trainable"]
        moved = max(float((saved[k] - live[k]).abs().max()) for k in live)
        if not ema:
            assert "ema" not in ck and moved == 0.0
            continue
        assert moved > 1e-4  # the average lags the live weights
        _trainable_equal({k: saved[k] for k in ck["ema"]}, ck["ema"])


def test_resume_refuses_other_training_settings(prepared_binary, tmp_path):
    """A checkpoint continues only under the settings that wrote it (progress / cache location may change)."""
    from anymc3d.errors import InputError

    prepared, specs = prepared_binary
    cfg = TrainConfig(epochs=1, batch_size=4, progress=False, augment=False)
    bb = lite0(None)
    fit(AnyMC3D(bb, make_spec(bb, r=4)), specs, prepared["train"], prepared["val"], cfg, tmp_path)
    other = dataclasses.replace(cfg, lr_lora=1e-3, epochs=2)
    with pytest.raises(InputError, match=r"checkpoint.pt: written with other training settings \(epochs: 1 -> 2; "
                                         r"lr_lora: 0.0005 -> 0.001\)"):
        fit(AnyMC3D(bb, make_spec(bb, r=4), adapter_prefix="p1_"), specs, prepared["train"], prepared["val"], other,
            tmp_path, resume=True)
    same = dataclasses.replace(cfg, progress=True, cache_dir=str(tmp_path / "cache"))
    summary = fit(AnyMC3D(bb, make_spec(bb, r=4), adapter_prefix="p2_"), specs, prepared["train"], prepared["val"],
                  same, tmp_path, resume=True)
    assert summary["epochs_run"] == 1  # the finished run is picked up, nothing retrained


def test_train_plugin_is_reproducible(binary_manifest, tmp_path):
    """Same data, same seed -> the same plugin tensors (LoRA init, shuffling, augmentation, dropout)."""
    from anymc3d.training.run import PreprocessOptions, train_plugin

    states = []
    for name in ("a", "b"):
        train_plugin(binary_manifest, "efficientnet_lite0", tmp_path / name, preprocess=PreprocessOptions(size=SIZE),
                     config=TrainConfig(epochs=1, batch_size=4, progress=False), log=lambda *a, **k: None)
        states.append(load_file(str(tmp_path / name / "plugin.safetensors")))
    _trainable_equal(*states, atol=0.0)
