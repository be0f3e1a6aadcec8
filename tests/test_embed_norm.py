"""Slice-embedding normalisation (anymc3d.plugins.embed_norm): statistics, training, plugin file,
defaults per backbone, bench fingerprints."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from sklearn.metrics import roc_auc_score

from anymc3d.backbones import create_backbone, default_embed_norm
from anymc3d.bench.methods import get_method
from anymc3d.data import load_data
from anymc3d.plugins import LoraSpec, PluginSpec, load_plugin, save_plugin
from anymc3d.plugins.embed_norm import EmbedNorm, resolve_embed_norm
from anymc3d.plugins.model import AnyMC3D
from anymc3d.plugins.spec import validate_spec_dict
from anymc3d.predict import Predictor
from anymc3d.preprocess import PreprocessSpec
from anymc3d.runtime.batching import prepare_case
from anymc3d.store.store import tensor_summary
from anymc3d.training.losses import classification_loss
from anymc3d.training import trainer as trainer_mod
from anymc3d.training.trainer import TrainConfig, fit

SIZE = 32


def lite0():
    return create_backbone("efficientnet_lite0", weights="random", input_size=SIZE)


def spec_for(bb, views=("axial",), r=4, last_k=None, embed_norm="center_scale") -> PluginSpec:
    pre = PreprocessSpec(size=SIZE, views=list(views)).to_dict()
    return PluginSpec(task="t", task_type="binary", label_names=["neg", "pos"], inputs=["image"],
                      preprocess={"image": pre}, backbone=bb.name, backbone_fingerprint=bb.fingerprint,
                      input_size=bb.input_size, lora=LoraSpec(r=r, last_k=last_k), embed_norm=embed_norm)


def test_statistics_are_those_of_the_real_slices():
    torch.manual_seed(0)
    norm = EmbedNorm(5)
    h = torch.randn(3, 4, 5) * torch.tensor([1.0, 2.0, 0.5, 3.0, 1.0]) + torch.arange(5.0)
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0]], dtype=torch.bool)
    padded = h.clone()
    padded[~mask] = 1e6  # padding rows must not enter the statistics
    assert torch.equal(norm(h), h)  # identity before fitting
    norm.start_fit()
    assert torch.equal(norm(padded, mask), padded)  # identity while fitting
    norm.finish_fit()
    rows = h[mask].double()
    mean = rows.mean(0)
    scale = ((rows - mean) ** 2).mean(0).mean().sqrt()
    assert torch.allclose(norm.mean.double(), mean, atol=1e-5)
    assert torch.allclose(norm.scale.double(), scale, atol=1e-5)
    out = norm(h)
    assert torch.allclose(out, (h - norm.mean) / norm.scale)
    # one scalar for every dimension: their relative spreads are kept
    sd = out[mask].std(0, unbiased=False)
    assert torch.allclose(sd / sd[0], rows.std(0, unbiased=False).float() / rows[:, 0].std(unbiased=False).float(),
                          atol=1e-4)
    with pytest.raises(ValueError, match="no slice embeddings"):
        norm.start_fit()
        norm.finish_fit()


def _train_head(model, emb, y, steps=150):
    """Task query + head on fixed slice embeddings (the part the normalisation changes), bench LR."""
    opt = torch.optim.AdamW(list(model.head_parameters().values()), lr=1e-3)
    model.train()
    for _ in range(steps):
        loss = classification_loss(model.pool_and_classify({"image:axial": emb}).logits, y, "binary", "focal")
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        return roc_auc_score(y[:, 0].numpy(), model.pool_and_classify({"image:axial": emb}).logits[:, 0].numpy())


def test_offset_dominated_embeddings_learn_only_with_the_normalisation():
    """Embeddings like LiteMedSAM's (a large shared offset, a tiny spread that carries the label):
    the plain task query + head barely moves at the default learning rate, the normalised one learns."""
    g = torch.Generator().manual_seed(0)
    bb = lite0()
    n, s, d = 64, 8, bb.embed_dim
    y = (torch.arange(n) % 2).float().view(-1, 1)
    offset = torch.rand(d, generator=g)
    direction = torch.randn(d, generator=g)
    emb = offset + 0.01 * torch.randn(n, s, d, generator=g) + 0.002 * y.view(n, 1, 1) * direction
    aucs = {}
    for norm in ("none", "center_scale"):
        torch.manual_seed(0)
        model = AnyMC3D(bb, spec_for(bb, r=0, embed_norm=norm))
        with model.fitting_embed_norm():  # nothing to fit without a normalisation
            model.pool_and_classify({"image:axial": emb})
        aucs[norm] = _train_head(model, emb, y)
    assert aucs["center_scale"] > 0.95, aucs
    assert aucs["none"] < 0.8, aucs


@pytest.fixture(scope="module")
def prepared(binary_manifest):
    task = load_data(binary_manifest)
    specs = {"image": PreprocessSpec(size=SIZE, views=["axial", "coronal"])}
    return {s: [prepare_case(c, specs) for c in task.cases if c.split == s] for s in ("train", "val")}, specs


def test_fit_sets_the_statistics_and_the_plugin_file_keeps_them(prepared, tmp_path, positive_volume, negative_volume):
    cases, specs = prepared
    bb = lite0()
    model = AnyMC3D(bb, spec_for(bb, views=("axial", "coronal"), r=4, last_k=1))
    before = {k: v.clone() for k, v in model.norm_buffers().items()}
    assert set(before) == {f"norm.image:{v}.{k}" for v in ("axial", "coronal") for k in ("mean", "scale")}
    n_params = model.n_trainable()
    fit(model, specs, cases["train"], cases["val"], TrainConfig(epochs=1, batch_size=4, progress=False), tmp_path / "run")
    assert model.n_trainable() == n_params  # statistics are not parameters
    after = model.norm_buffers()
    for k, v in after.items():
        assert not torch.equal(v, before[k]), k  # fitted: no longer mean 0 / scale 1
        assert torch.isfinite(v).all()
    assert float(after["norm.image:axial.scale"]) > 0
    # they are the statistics of the frozen embeddings of the training slices
    from anymc3d.runtime.engine import frozen_embeddings
    rows, _ = frozen_embeddings(bb, cases["train"], specs, ["axial", "coronal"], amp=True)
    ax = torch.from_numpy(np.concatenate([r[0] for r in rows])).double()
    assert torch.allclose(after["norm.image:axial.mean"].double(), ax.mean(0), atol=2e-3)

    jpath, tpath = save_plugin(model, tmp_path / "plugin")
    stored = load_file(str(tpath))
    assert torch.equal(stored["norm.image:coronal.mean"], after["norm.image:coronal.mean"].cpu())
    assert json.loads(jpath.read_text())["embed_norm"] == "center_scale"
    assert tensor_summary(tmp_path / "plugin")["parameters"] == n_params  # the store counts parameters only
    loaded = load_plugin(tmp_path / "plugin", weights="random")
    for k, v in after.items():
        assert torch.equal(loaded.norm_buffers()[k].cpu(), v.cpu()), k
    a = Predictor(model).predict_many([positive_volume, negative_volume])
    b = Predictor(loaded).predict_many([positive_volume, negative_volume])
    assert [r["probabilities"] for r in a] == [r["probabilities"] for r in b]
    # a file whose statistics were dropped does not load as if nothing happened
    broken = {k: v for k, v in stored.items() if not k.startswith("norm.")}
    from safetensors.torch import save_file
    save_file(broken, str(tpath))
    with pytest.raises(Exception, match="norm.image"):
        load_plugin(tmp_path / "plugin", weights="random")


def test_resume_keeps_the_statistics(prepared, tmp_path, monkeypatch):
    cases, specs = prepared
    cfg = TrainConfig(epochs=1, batch_size=4, progress=False)
    bb = lite0()
    first = AnyMC3D(bb, spec_for(bb, r=0))
    fit(first, specs, cases["train"], cases["val"], cfg, tmp_path)

    def refit(*_a, **_k):
        raise AssertionError("a resumed run must take its statistics from the checkpoint")

    monkeypatch.setattr(trainer_mod, "fit_embed_norm", refit)
    bb2 = lite0()
    again = AnyMC3D(bb2, spec_for(bb2, r=0))
    fit(again, specs, cases["train"], cases["val"], cfg, tmp_path, resume=True)
    for k, v in first.norm_buffers().items():
        assert torch.equal(again.norm_buffers()[k], v), k


def test_defaults_per_backbone_and_spec_validation():
    assert default_embed_norm("litemedsam_tinyvit") == "center_scale"  # no head norm
    assert default_embed_norm("efficientnet_lite0") == "none"
    bb = lite0()
    assert resolve_embed_norm("auto", bb) == "none" and resolve_embed_norm("center_scale", bb) == "center_scale"
    tv = create_backbone("litemedsam_tinyvit", weights="random", input_size=32)  # the registered default
    assert resolve_embed_norm("auto", tv) == "center_scale" and resolve_embed_norm("none", tv) == "none"
    with pytest.raises(ValueError):
        resolve_embed_norm("batchnorm", bb)
    d = spec_for(bb).to_dict()
    validate_spec_dict(d)
    old = {k: v for k, v in d.items() if k != "embed_norm"}  # plugin files from before the field
    assert PluginSpec.from_dict(old).embed_norm == "none"
    with pytest.raises(ValueError, match="embed_norm"):
        validate_spec_dict({**d, "embed_norm": "zscore"})


def test_bench_fingerprint_names_the_normalisation_only_where_there_is_one():
    m = get_method("plugin_lastk1")
    base = {"backbone": "efficientnet_lite0", "embed_norm": "auto"}
    assert "embed_norm" not in m.relevant_options(base)  # cells measured before it keep their fingerprint
    assert m.relevant_options({**base, "embed_norm": "center_scale"})["embed_norm"] == "center_scale"
    assert m.relevant_options({"backbone": "litemedsam_tinyvit", "embed_norm": "auto"})["embed_norm"] == "center_scale"
    assert "embed_norm" not in m.relevant_options({"backbone": "litemedsam_tinyvit", "embed_norm": "none"})
    assert "embed_norm" not in get_method("linear_probe").relevant_options({"backbone": "litemedsam_tinyvit"})
