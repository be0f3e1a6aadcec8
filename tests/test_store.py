"""Issue 5: plugin store, predict-all on one backbone (shared trunk), disk activation cache."""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from anymc3d.backbones import create_backbone
from anymc3d.cli import main
from anymc3d.errors import InputError
from anymc3d.plugins.model import AnyMC3D
from anymc3d.plugins import LoraSpec, PluginSpec, load_plugin
from anymc3d.predict import Predictor
from anymc3d.preprocess import PreprocessSpec
from anymc3d.store import MultiPredictor, PluginStore
from anymc3d.runtime.cache import ActivationCache, PluginActivations
from anymc3d.volume import Volume

from conftest import random_plugin

SIZE = 32
AFFINE = np.diag([1.5, 1.5, 2.0, 1.0])


def lite0(weights="random"):
    return create_backbone("efficientnet_lite0", weights=weights, input_size=SIZE)


def make_plugin(bb, out: Path, task: str, seed: int, r=4, last_k=None, views=("axial",), size=SIZE,
                intensity="minmax") -> Path:
    """A random binary plugin (conftest.random_plugin) with test metrics and a training record, as a store lists them."""
    return random_plugin(bb, out, task, seed, r=r, last_k=last_k, views=views, size=size, intensity=intensity,
                         prefix="mk", metrics={"test": {"auc": 0.5 + seed / 100, "acc": 0.5, "n": 10}},
                         training={"epochs_run": 1, "train_wall_s": 1.0, "n_train": 8})


@pytest.fixture(scope="module")
def plugin_dir(tmp_path_factory) -> dict[str, Path]:
    """Five tasks on one random EfficientNet-Lite0: full-depth, two sharing the k=1 trunk (one with two
    views), k=2 on another slice size, and a pooling-only one; plus one for another backbone."""
    out = tmp_path_factory.mktemp("plugins")
    bb = lite0()
    paths = {
        "full": make_plugin(bb, out, "full", 1),
        "k1": make_plugin(bb, out, "k1", 2, last_k=1),
        "k1_views": make_plugin(bb, out, "k1_views", 3, last_k=1, views=("axial", "coronal")),
        "k2_small": make_plugin(bb, out, "k2_small", 4, last_k=2, size=24),
        "frozen": make_plugin(bb, out, "frozen", 5, r=0),
    }
    vit = create_backbone("dinov2_vits14", weights="random", input_size=28)
    paths["vit"] = make_plugin(vit, out, "vit", 6, last_k=1, size=28)
    return paths


@pytest.fixture(scope="module")
def store(plugin_dir, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("store") / "store"
    s = PluginStore(root)
    for name in ("full", "k1", "k1_views", "k2_small", "frozen"):
        s.add(plugin_dir[name])
    return root


def volume(seed: int) -> Volume:
    rng = np.random.default_rng(seed)
    a = (rng.random((12, 12, 10)) * 0.2).astype(np.float32)
    a[3:6, 3:6, 2:5] = 1.0
    return Volume(a, AFFINE, {"path": f"vol{seed}.nii.gz"})


# ------------------------------------------------------------------------------------------ store
def test_store_list_info_remove(store, plugin_dir, tmp_path, capsys):
    s = PluginStore(store)
    assert [e.name for e in s.entries()] == ["frozen", "full", "k1", "k1_views", "k2_small"]
    assert s.pinned_backbone()[0] == "efficientnet_lite0"
    d = s.info("k1_views")
    assert d["task"] == "k1_views" and d["labels"] == ["neg", "pos"]
    assert d["views"] == ["axial", "coronal"] and d["streams"] == ["image:axial", "image:coronal"]
    model = load_plugin(store / "k1_views", weights="random")
    assert d["parameters"] == model.n_trainable()
    assert d["backbone"] == "efficientnet_lite0" and d["backbone_fingerprint"] == model.backbone.fingerprint
    assert d["compatible_with_store_backbone"] is True and d["lora"]["last_k"] == 1
    assert d["metrics"]["test"]["auc"] == pytest.approx(0.53) and d["training"]["epochs_run"] == 1

    assert main(["plugins", "list", "--store", str(store)]) == 0
    out = capsys.readouterr().out
    assert all(n in out for n in ("frozen", "full", "k1_views", "last_k=2", "r=0")) and "INCOMPATIBLE" not in out
    assert main(["plugins", "--store", str(store), "info", "k2_small", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["preprocess"]["image"]["size"] == 24

    # add / remove on a scratch store through the CLI; a duplicate name is refused
    scratch = tmp_path / "s2"
    assert main(["plugins", "add", str(plugin_dir["k1"]), "--store", str(scratch)]) == 0
    assert main(["plugins", "add", str(plugin_dir["k1"]), "--store", str(scratch)]) == 2
    assert main(["plugins", "add", str(plugin_dir["k1"] / "plugin.json"), "--name", "again", "--store", str(scratch)]) == 0
    assert main(["plugins", "remove", "k1", "--store", str(scratch)]) == 0
    assert [e.name for e in PluginStore(scratch).entries()] == ["again"]
    assert main(["plugins", "info", "nope", "--store", str(scratch)]) == 2


def test_plugin_for_another_backbone_is_refused(store, plugin_dir, tmp_path, capsys):
    with pytest.raises(InputError, match="refused"):
        PluginStore(store).add(plugin_dir["vit"])
    assert main(["plugins", "add", str(plugin_dir["vit"]), "--store", str(store)]) == 2
    assert "refused" in capsys.readouterr().err
    # copied in by hand: listed as incompatible, reported and skipped by predict, never run
    import shutil

    mixed = tmp_path / "mixed"
    shutil.copytree(store, mixed)
    shutil.copytree(plugin_dir["vit"], mixed / "vit")
    (mixed / "broken").mkdir()
    (mixed / "broken" / "plugin.json").write_text("{not json")
    assert main(["plugins", "list", "--store", str(mixed)]) == 0
    out = capsys.readouterr().out
    assert "INCOMPATIBLE" in out and "UNREADABLE" in out
    mp = MultiPredictor.from_store(mixed, weights="random")
    assert sorted(mp.tasks) == ["frozen", "full", "k1", "k1_views", "k2_small"]
    assert {s["name"] for s in mp.skipped} == {"vit", "broken"}
    r = mp.predict(volume(0), "v")
    assert "vit" not in r["tasks"] and {s["name"] for s in r["skipped_plugins"]} == {"vit", "broken"}
    # a store whose backbone weights are not the ones loaded: nothing runs, clear error
    with pytest.raises(InputError, match="no compatible plugin"):
        MultiPredictor.from_store(store, weights=None)  # real ImageNet weights: other fingerprint


# ------------------------------------------------------------------------------------------ predict-all
@pytest.fixture(scope="module")
def reference(store) -> dict:
    """Each plugin alone, the ordinary way (``anymc3d predict PLUGIN``'s Predictor, its own backbone)."""
    out = {}
    for name in ("frozen", "full", "k1", "k1_views", "k2_small"):
        ref = Predictor(load_plugin(store / name, weights="random"))
        out[name] = [ref.predict(volume(i), cid) for i, cid in ((0, "a"), (1, "b"))]
    return out


@pytest.mark.parametrize("shared", [True, False])
def test_predict_all_equals_per_plugin(store, reference, shared, monkeypatch):
    from anymc3d.backbones.efficientnet import EfficientNetLite

    calls = []
    orig = EfficientNetLite.forward_trunk
    monkeypatch.setattr(EfficientNetLite, "forward_trunk",
                        lambda self, x, k: calls.append((tuple(x.shape), k)) or orig(self, x, k))
    mp = MultiPredictor.from_store(store, weights="random", shared=shared)
    vols = [volume(0), volume(1)]
    results = mp.predict_many(vols, ["a", "b"])
    if shared:
        # per volume: the k=1 trunk once for the 32-px axial stack (shared by k1 and k1_views) + once for the
        # coronal stack; the k=2 trunk once for the 24-px stack
        assert sorted(calls) == sorted([((10, 1, 32, 32), 1), ((12, 1, 32, 32), 1), ((10, 1, 24, 24), 2)] * 2)
    assert sorted(mp.tasks) == sorted(reference)
    for name in mp.tasks:
        for want, res in zip(reference[name], results):
            got = res["tasks"][name]
            assert got["probabilities"]["pos"] == pytest.approx(want["probabilities"]["pos"], abs=1e-5)
            assert got["predicted"] == want["predicted"] and got["views_used"] == want["views_used"]
            for s, w in want["slice_weights"].items():
                np.testing.assert_allclose(got["slice_weights"][s], w, atol=1e-5)
            np.testing.assert_allclose(list(got["view_weights"].values()), list(want["view_weights"].values()), atol=1e-5)


def test_predict_all_cli(store, tmp_path, capsys):
    import nibabel as nib

    paths = []
    for i in range(2):
        v = volume(i)
        p = tmp_path / f"case{i}.nii.gz"
        nib.save(nib.Nifti1Image(v.array, AFFINE), str(p))
        paths.append(str(p))
    out = tmp_path / "pred"
    assert main(["predict", "--plugins", str(store), *paths, "--out", str(out), "--weights", "random"]) == 0
    r = json.loads((out / "case0.json").read_text())
    assert sorted(r["tasks"]) == ["frozen", "full", "k1", "k1_views", "k2_small"]
    assert r["backbone"] == "efficientnet_lite0" and r["skipped_plugins"] == []
    header = (out / "predictions.csv").read_text().splitlines()[0]
    assert "k1_views:p_pos" in header and "full:predicted" in header
    # one image only (the PLUGIN positional takes it)
    assert main(["predict", "--plugins", str(store), paths[0], "--out", str(tmp_path / "one"), "--weights", "random"]) == 0
    assert (tmp_path / "one" / "case0.json").is_file()


# ------------------------------------------------------------------------------------------ cache
def _case_slices(spec: PreprocessSpec, seed=0):
    from anymc3d.preprocess import canonicalize, to_slices

    arr, _ = canonicalize(volume(seed), spec)
    return to_slices(torch.from_numpy(np.ascontiguousarray(arr)), spec, "axial")


def test_cache_hit_and_invalidation(store, tmp_path):
    model = load_plugin(store / "k1", weights="random")
    spec = PreprocessSpec.from_dict(model.spec.preprocess["image"])
    x = _case_slices(spec)
    c1 = PluginActivations(tmp_path / "c", model, {"image": spec})
    a = c1.activations("image:axial", x)
    assert c1.stats["misses"] == 1 and c1.stats["writes"] == 1
    assert torch.equal(a, model.trunk(x).to(torch.bfloat16))
    c2 = PluginActivations(tmp_path / "c", model, {"image": spec})
    assert torch.equal(c2.activations("image:axial", x), a) and c2.stats["hits"] == 1

    # a change of preprocessing (same slices even) -> another key -> recomputed
    spec_b = PreprocessSpec.from_dict({**spec.to_dict(), "clip_percentiles": [1.0, 99.0]})
    c3 = PluginActivations(tmp_path / "c", model, {"image": spec_b})
    c3.activations("image:axial", x)
    assert c3.stats["misses"] == 1 and c3.stats["hits"] == 0
    # other volume content -> miss
    c3.activations("image:axial", _case_slices(spec, seed=5))
    assert c3.stats["misses"] == 2

    # other backbone weights (a local file with one weight changed) -> other fingerprint -> miss
    from safetensors.torch import save_file

    sd = {k: v.clone() for k, v in lite0().model.state_dict().items()}
    sd["conv_stem.weight"][0, 0, 0, 0] += 1.0
    wfile = tmp_path / "lite0_changed.safetensors"
    save_file(sd, str(wfile))
    bb2 = lite0(str(wfile))
    assert bb2.fingerprint != model.backbone.fingerprint
    model2 = AnyMC3D(bb2, PluginSpec.from_dict({**model.spec.to_dict(), "backbone_fingerprint": bb2.fingerprint}))
    c4 = PluginActivations(tmp_path / "c", model2, {"image": spec})
    b = c4.activations("image:axial", x)
    assert c4.stats["misses"] == 1 and c4.stats["hits"] == 0 and not torch.equal(a, b)
    assert len(ActivationCache(tmp_path / "c").entries()) == 4


def test_corrupt_cache_entry_is_detected_and_recomputed(store, tmp_path):
    model = load_plugin(store / "k1", weights="random")
    spec = PreprocessSpec.from_dict(model.spec.preprocess["image"])
    x = _case_slices(spec)
    c = PluginActivations(tmp_path / "c", model, {"image": spec})
    good = c.activations("image:axial", x)
    path = c.path(c.key_for("image:axial", x))
    for damage in ("flip", "truncate"):
        raw = bytearray(path.read_bytes())
        if damage == "flip":
            raw[-3] ^= 0xFF  # inside the tensor data: the header still parses, the checksum does not match
        else:
            raw = raw[: len(raw) // 2]
        path.write_bytes(bytes(raw))
        c.stats.clear()
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            again = c.activations("image:axial", x)
        assert any("corrupt" in str(m.message) for m in w)
        assert c.stats["corrupt"] == 1 and c.stats["writes"] == 1 and torch.equal(again, good)
        c.stats.clear()
        assert torch.equal(c.activations("image:axial", x), good) and c.stats["hits"] == 1


def test_training_reuses_the_disk_cache(binary_manifest, tmp_path, monkeypatch):
    """A second plugin on the same data (other seed) never runs the trunk; a pooling-only plugin caches embeddings."""
    from anymc3d.backbones.efficientnet import EfficientNetLite
    from anymc3d.training.run import PreprocessOptions, train_plugin
    from anymc3d.training.trainer import TrainConfig

    import anymc3d.training.run as run_mod

    monkeypatch.setattr(run_mod, "COLD_TIMING_VOLUMES", 0)  # the cold inference timing runs the trunk on purpose
    calls = []
    orig = EfficientNetLite.forward_trunk
    monkeypatch.setattr(EfficientNetLite, "forward_trunk", lambda self, x, k: calls.append(k) or orig(self, x, k))
    cache = tmp_path / "cache"

    def run(seed, out, r=4, last_k=1):
        cfg = TrainConfig(epochs=1, batch_size=4, augment=False, progress=False, seed=seed, cache_dir=str(cache))
        return train_plugin(binary_manifest, "efficientnet_lite0", tmp_path / out, weights="random",
                            preprocess=PreprocessOptions(size=SIZE), lora=LoraSpec(r=r, last_k=last_k),
                            config=cfg, log=lambda *a, **k: None)

    run(0, "a")
    n_first = len(calls)
    assert n_first == 16 and len(ActivationCache(cache).entries()) == 16  # every case once (train+val+test)
    m = run(1, "b")
    assert len(calls) == n_first and m["auc"] is not None  # no trunk pass at all
    n_entries = len(ActivationCache(cache).entries())
    m0 = run(0, "frozen", r=0, last_k=None)
    assert len(ActivationCache(cache).entries()) == n_entries + 16 and m0["auc"] is not None
    run(1, "frozen2", r=0, last_k=None)
    assert len(ActivationCache(cache).entries()) == n_entries + 16


def test_cached_training_times_a_cold_prediction(binary_manifest, tmp_path, monkeypatch):
    """With a trunk cache, the reported test inference time comes from a prediction that runs the trunk."""
    from anymc3d.backbones.efficientnet import EfficientNetLite
    from anymc3d.training.run import PreprocessOptions, train_plugin
    from anymc3d.training.trainer import TrainConfig

    cfg = TrainConfig(epochs=1, batch_size=4, augment=False, progress=False, cache_dir=str(tmp_path / "cache"))
    args = dict(weights="random", preprocess=PreprocessOptions(size=SIZE), lora=LoraSpec(r=4, last_k=1), config=cfg,
                log=lambda *a, **k: None)
    train_plugin(binary_manifest, "efficientnet_lite0", tmp_path / "a", **args)  # fills the cache
    calls = []
    orig = EfficientNetLite.forward_trunk
    monkeypatch.setattr(EfficientNetLite, "forward_trunk", lambda self, x, k: calls.append(x.shape[0]) or orig(self, x, k))
    m = train_plugin(binary_manifest, "efficientnet_lite0", tmp_path / "b", **args)
    n_test = m["test"]["n"]
    assert sum(calls) > 0 and m["test"]["infer_s_per_volume"] > 0
    # only the timing pass ran the trunk: the test volumes' slices, nothing from train/val
    assert len(calls) == -(-min(n_test, 16) // 4)
