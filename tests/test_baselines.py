"""Baselines: aggregation modules, the aggregator plugin, 3D CNNs in the plugin trainer, cached frozen heads."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

from anymc3d.baselines.aggregators import POOLINGS, make_pool
from anymc3d.baselines.cnn3d import Volume3DClassifier
from anymc3d.data import load_data
from anymc3d.evaluation.threshold import DEFAULT_POLICY
from anymc3d.plugins import LoraSpec
from anymc3d.training.run import PreprocessOptions
from anymc3d.training.trainer import TrainConfig

from test_bench import fake_medmnist


@pytest.mark.parametrize("kind", POOLINGS)
def test_pools_shapes_masks_and_weights(kind):
    torch.manual_seed(0)
    pool = make_pool(kind, 16, **({"hidden": 8, "heads": 2} if kind == "transformer" else {}))
    h = torch.randn(3, 5, 16)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [1, 0, 0, 0, 0]], dtype=torch.bool)
    pool.eval()
    v, w = pool(h, mask)
    assert v.shape == (3, pool.out_dim) and w.shape == (3, 5)
    assert torch.allclose(w.sum(1), torch.ones(3), atol=1e-5)
    assert (w[~mask] == 0).all()
    # padded slices never change the result
    h2 = h.clone()
    h2[~mask] = 1e3
    assert torch.allclose(pool(h2, mask)[0], v, atol=1e-4)
    if kind == "mean":
        assert torch.allclose(v[1], h[1, :2].mean(0), atol=1e-6)
    if kind == "max":
        assert torch.allclose(v[2], h[2, 0])


def test_unknown_pool():
    with pytest.raises(ValueError, match="unknown pooling"):
        make_pool("median", 4)


@pytest.mark.parametrize("arch, side", [("resnet18", 12), ("densenet121", 12)])
def test_volume3d_classifier_forward(arch, side):
    from anymc3d.plugins.spec import PluginSpec

    spec = PluginSpec(task="t", task_type="multiclass", label_names=["a", "b", "c"], inputs=["image"],
                      preprocess={"image": {"views": ["axial"]}}, backbone="x", backbone_fingerprint="", input_size=side)
    model = Volume3DClassifier(spec, arch, 1)
    x = {"image:axial": torch.rand(2, side, 1, side, side)}
    out = model(x, None, None)
    assert out.logits.shape == (2, 3) and out.slice_weights["image:axial"].shape == (2, side)
    state = model.trainable_state()
    assert any("running_mean" in k for k in state)  # BatchNorm statistics are part of the best state
    model.load_trainable_state(state)
    assert model.n_trainable() > 1e6 and model.lora_parameters() == {}


def flipped(npz: Path) -> Path:
    """The same MedMNIST-shaped volumes with every label flipped (same file name, another folder). A model
    that does not learn from its labels (its ranking fixed by its initialisation) can reach a high AUC on
    one labelling by chance, never on both."""
    d = dict(np.load(npz))
    for split in ("train", "val", "test"):
        d[f"{split}_labels"] = (1 - d[f"{split}_labels"]).astype(np.uint8)
    out = npz.parent / "flipped" / npz.name
    out.parent.mkdir(exist_ok=True)
    np.savez(out, **d)
    return out


@pytest.mark.parametrize("flip", [False, True], ids=["as_given", "flipped"])
def test_cnn3d_and_aggregator_plugin_learn(tmp_path, flip):
    """Both baselines learn the bright-cube toy (class 1 holds a cube) under either labelling, and write
    metrics.json only (no plugin file)."""
    from anymc3d.baselines.variant import train_aggregator_plugin, train_cnn3d

    npz = fake_medmnist(tmp_path / "adrenalmnist3d.npz", n=(16, 8, 8))
    task = load_data(flipped(npz) if flip else npz)
    # BCE: on a few steps the focal loss learns the toy too slowly for a test (seeds 0-2 pass both labellings)
    cfg = TrainConfig(epochs=3, batch_size=4, progress=False, amp=False, loss="bce")
    m = train_cnn3d(task, "resnet18", tmp_path / "cnn", cfg, train_fraction=0.5, log=lambda *a: None)
    assert m["trainable_params"] > 1e6 and m["test"]["ci"]["auc"] is not None
    assert m["auc"] >= 0.8 and m["val"]["auc"] >= 0.8, (m["val"], m["test"])
    assert m["n_train"] == 8 and m["splits"]["test"] == 8  # the fraction thins the training split only
    assert (tmp_path / "cnn" / "metrics.json").is_file() and not (tmp_path / "cnn" / "plugin.safetensors").exists()
    m = train_aggregator_plugin(task, "efficientnet_lite0", tmp_path / "agg", pooling="max", weights="random",
                                preprocess=PreprocessOptions(size=32), lora=LoraSpec(r=2, alpha=4, last_k=1),
                                config=dataclasses.replace(cfg, epochs=2, lr_head=1e-2), log=lambda *a: None)
    assert m["trainable_params"] > 1281 and m["test"]["infer_s_per_volume"] > 0
    assert m["auc"] >= 0.8 and m["val"]["auc"] >= 0.8, (m["val"], m["test"])
    assert m["config"]["threshold"] == DEFAULT_POLICY  # the plugin's threshold policy, not a baseline's own
    assert not (tmp_path / "agg" / "plugin.json").exists()


def test_frozen_heads_on_cached_features(tmp_path):
    from anymc3d.baselines.frozen import FeatureCache, linear_probe_from_cache, train_pool_head
    from anymc3d.bench.methods import _backbone

    npz = fake_medmnist(tmp_path / "adrenalmnist3d.npz", n=(12, 6, 6))
    task = load_data(npz)
    bb = _backbone({"backbone": "efficientnet_lite0", "weights": "random", "size": 32})  # shared with test_bench
    cache = FeatureCache(task, bb, ["axial", "coronal"], 32, tmp_path / "cache", log=lambda *a: None)
    assert cache.data["train"]["emb"].shape == (12, 2, 8, bb.embed_dim)
    again = FeatureCache(task, bb, ["axial", "coronal"], 32, tmp_path / "cache", log=lambda *a: pytest.fail("recomputed"))
    np.testing.assert_array_equal(again.data["test"]["emb"], cache.data["test"]["emb"])
    other = FeatureCache(load_data(flipped(npz)), bb, ["axial", "coronal"], 32, tmp_path / "cache_flipped",
                         log=lambda *a: None)
    for name, c in (("as_given", cache), ("flipped", other)):  # they learn the toy under either labelling
        lp = linear_probe_from_cache(c)
        assert lp["trainable_params"] == 2 * bb.embed_dim + 1 and lp["auc"] >= 0.8, (name, lp["auc"])
        for pooling in ("attention", "transformer"):
            # 12 training cases are one step an epoch: 20 epochs at lr 1e-2 (seeds 0-2 pass both labellings)
            r = train_pool_head(c, pooling=pooling, epochs=20, lr=1e-2)
            assert r["auc"] >= 0.8, (name, pooling, r["auc"])
            assert r["train_s"] >= c.feature_secs("train") and r["infer_s_per_volume"] > 0
