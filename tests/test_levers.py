"""Accuracy levers that work with a cached trunk (issue 32): ensembles on one trunk, test-time flips,
cached flipped copies of the training volumes; and end-to-end training that learns a separable toy."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from anymc3d.backbones import create_backbone
from anymc3d.plugins import load_plugin
from anymc3d.predict import Predictor
from anymc3d.volume import Volume

from conftest import random_plugin

SIZE = 32


def lite0():
    return create_backbone("efficientnet_lite0", weights="random", input_size=SIZE)


def volume(seed: int) -> Volume:
    rng = np.random.default_rng(seed)
    a = (rng.random((12, 12, 10)) * 0.3).astype(np.float32)
    a[3:6, 3:6, 2:5] = 1.0 if seed % 2 else 0.2
    return Volume(a, np.diag([1.5, 1.5, 2.0, 1.0]), {"path": f"vol{seed}.nii.gz"})


def member_probabilities(model, item) -> list[float]:
    """Each ensemble member's own probability of ``item`` (no test-time flips), computed one by one."""
    from anymc3d.runtime.batching import prepare_case
    from anymc3d.runtime.engine import Runtime

    pred = Predictor(model)
    rt = Runtime(model, pred.specs, device="cpu")
    prepared = prepare_case(pred.case(item, "x"), pred.specs)
    b = rt.batcher.batch([prepared])
    model.eval()
    out = []
    with torch.no_grad():
        for m in [model, *model.members]:
            m.autocast, m.channels_last = model.autocast, model.channels_last
            o = m._forward_one(b.slices, b.masks, b.present, False, False)
            out.append(float(model.probabilities(o.logits.float())[0, 0]))
    return out


@pytest.mark.parametrize("last_k", [1, None])
def test_ensemble_prediction_is_the_mean_of_its_members(tmp_path, last_k):
    bb = lite0()
    path = random_plugin(bb, tmp_path, "ens", seed=3, last_k=last_k, size=SIZE, views=("axial", "coronal"), ensemble=3)
    spec = json.loads((path / "plugin.json").read_text())
    assert spec["ensemble"] == 3
    model = load_plugin(path, weights="random")  # saved and reloaded: one folder, one spec
    assert len(model.members) == 2 and model.n_trainable() == 3 * model.members[0].n_trainable()
    members = member_probabilities(model, volume(1))
    assert max(members) - min(members) > 1e-4  # the members differ
    got = Predictor(model).predict(volume(1), "x")["probabilities"]["pos"]
    assert got == pytest.approx(float(np.mean(members)), abs=1e-5)

    # in the store (predict --plugins), beside a plain plugin on the same backbone
    from anymc3d.store import MultiPredictor, PluginStore

    plain = random_plugin(bb, tmp_path, "plain", seed=4, last_k=last_k, size=SIZE)
    store = PluginStore(tmp_path / "store")
    store.add(path, weights="random")
    store.add(plain, weights="random")
    res = MultiPredictor.from_store(tmp_path / "store", weights="random").predict(volume(1), "x")
    assert res["tasks"]["ens"]["probabilities"]["pos"] == pytest.approx(got, abs=1e-5)

    # in `anymc3d serve`: an upload of the same volume
    pytest.importorskip("fastapi", reason="the serve extra is not installed")
    import nibabel as nib
    from fastapi.testclient import TestClient

    from anymc3d.serve import ServeConfig, create_app

    scan = tmp_path / "scan.nii.gz"
    v = volume(1)
    nib.save(nib.Nifti1Image(v.array, v.affine), str(scan))
    want = Predictor(model).predict(scan)["probabilities"]["pos"]
    with TestClient(create_app(ServeConfig(plugins=tmp_path / "store", weights="random"))) as client:
        r = client.post("/v1/predict", params={"tasks": "ens"},
                        files={"file": ("scan.nii.gz", scan.read_bytes(), "application/octet-stream")})
    assert r.status_code == 200, r.text
    assert r.json()["tasks"]["ens"]["probabilities"]["pos"] == pytest.approx(want, abs=1e-5)


def test_a_damaged_ensemble_file_is_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    from anymc3d.errors import InputError

    path = random_plugin(lite0(), tmp_path, "ens", seed=5, last_k=1, size=SIZE, ensemble=2)
    t = load_file(str(path / "plugin.safetensors"))
    save_file({k: v for k, v in t.items() if not k.startswith("m1.head")}, str(path / "plugin.safetensors"))
    with pytest.raises(InputError, match="missing"):
        load_plugin(path, weights="random")
    spec = json.loads((path / "plugin.json").read_text())
    spec["ensemble"] = 0
    (path / "plugin.json").write_text(json.dumps(spec))
    with pytest.raises(InputError, match="ensemble"):
        load_plugin(path, weights="random")


def test_test_time_flips_are_stored_and_average_the_flipped_slices(tmp_path):
    from anymc3d.runtime.engine import flip_slices

    bb = lite0()
    path = random_plugin(bb, tmp_path, "tta", seed=6, last_k=1, size=SIZE, test_flips=["w", "h"])
    assert json.loads((path / "plugin.json").read_text())["test_flips"] == ["w", "h"]
    model = load_plugin(path, weights="random")
    pred = Predictor(model)
    got = pred.predict(volume(1), "x")["probabilities"]["pos"]
    # by hand: the same plugin without flips, on the slices as they are and flipped
    from anymc3d.runtime.batching import prepare_case
    from anymc3d.runtime.engine import Runtime

    rt = Runtime(model, pred.specs, device="cpu")
    batch = rt.batcher.batch([prepare_case(pred.case(volume(1), "x"), pred.specs)])
    model.spec.test_flips = []
    zs = []
    with torch.no_grad():
        for f in (None, "w", "h"):
            x = batch if f is None else batch.replace(slices=flip_slices(batch.slices, f))
            zs.append(float(rt.forward(x).logits.double()[0, 0]))
    assert max(zs) - min(zs) > 1e-3  # the flips change the answer, so the average is not a no-op
    want = float(np.mean(1 / (1 + np.exp(-np.array(zs)))))
    assert got == pytest.approx(want, rel=1e-4, abs=1e-9)
    # evaluate / heatmaps go through the same runtime forward: the heatmap's probability is the averaged one
    model.spec.test_flips = ["w", "h"]
    from anymc3d.explain.heatmap import Explainer

    hm = Explainer(model, device="cpu").explain(volume(1), "x")
    assert hm.probabilities["pos"] == pytest.approx(got, abs=1e-5)


def test_flip_copies_and_their_epoch_order():
    from anymc3d.runtime.batching import PreparedCase
    from anymc3d.training.trainer import copy_order, with_flip_copies

    arr = torch.arange(2 * 3 * 4, dtype=torch.float32).reshape(1, 2, 3, 4)
    cases = [PreparedCase(f"c{i}", {"image": arr + i}, {}, torch.tensor([i % 2])) for i in range(4)]
    train = with_flip_copies(cases, 2)
    assert len(train) == 12 and train[4].id == "c0~flipx" and train[8].id == "c0~flipy"
    assert torch.equal(train[4].arrays["image"], arr.flip(1)) and torch.equal(train[9].arrays["image"], (arr + 1).flip(2))
    a = copy_order([3, 0, 2, 1], 4, 2, seed=0, epoch=5)
    assert a == copy_order([3, 0, 2, 1], 4, 2, seed=0, epoch=5)  # (seed, epoch) alone decide it
    assert [i % 4 for i in a] == [3, 0, 2, 1] and all(0 <= i < 12 for i in a)
    drawn = {i // 4 for e in range(20) for i in copy_order([0, 1, 2, 3], 4, 2, 0, e)}
    assert drawn == {0, 1, 2}
    assert copy_order([1, 0], 2, 0, 0, 0) == [1, 0]


def toy_npz(tmp_path: Path) -> Path:
    """A separable MedMNIST-style toy: class 1 holds a bright cube."""
    rng = np.random.default_rng(0)
    d = {}
    for split, k in (("train", 48), ("val", 16), ("test", 16)):
        y = np.arange(k) % 2
        x = (rng.random((k, 12, 12, 12)) * 60).astype(np.uint8)
        x[y == 1, 3:8, 3:8, 3:8] = 255
        d[f"{split}_images"], d[f"{split}_labels"] = x, y.reshape(-1, 1).astype(np.uint8)
    p = tmp_path / "toymnist3d.npz"
    np.savez(p, **d)
    return p


TOY_TIMINGS = {"device": "cpu", "device_type": "cpu", "threads": 1, "cpu_count": 2, "memory_gb": 16.0,
               "available_gb": 8.0, "size": 64, "prep_s_per_volume": 0.001, "aug_s_per_volume": 0.01,
               "trunk_fwd_s": 0.001, "trunk_bytes_per_slice": 3072, "tail_step_s": 0.0002, "tail_fwd_s": 0.0001,
               "full_step_s": 0.01, "full_fwd_s": 0.003}


def test_train_learns_a_separable_toy_through_the_cli_and_the_api(tmp_path, capsys):
    """`anymc3d train` (the plan, with its flip copies, test-time flips, 2.5D slices and a 2-member ensemble) and
    ``train_plugin`` both reach test AUC > 0.9 on the toy: they learn, not merely return a number."""
    from anymc3d.cli import main
    from anymc3d.training.run import PreprocessOptions, train_plugin
    from anymc3d.training.trainer import TrainConfig

    npz = toy_npz(tmp_path)
    tfile = tmp_path / "timings.json"
    tfile.write_text(json.dumps(TOY_TIMINGS))
    out = tmp_path / "cli"
    assert main(["train", str(npz), "--out", str(out), "--timings", str(tfile), "--size", "32",
                 "--epochs", "4", "--flip-copies", "1", "--test-flips", "w", "--ensemble", "2", "--neighbours", "--quiet", "--no-select"]) == 0
    m = json.loads((out / "metrics.json").read_text())
    spec = json.loads((out / "plugin.json").read_text())
    assert spec["ensemble"] == 2 and spec["test_flips"] == ["w"] and m["plan"]["flip_copies"] == 1
    assert spec["preprocess"]["image"]["neighbours"] is True and m["plan"]["neighbours"] is True
    assert m["test"]["auc"] > 0.9, m["test"]
    api = train_plugin(str(npz), "efficientnet_lite0", tmp_path / "api",
                       preprocess=PreprocessOptions(size=32, views=["axial"]),
                       config=TrainConfig(epochs=4, batch_size=8, augment=False, progress=False),
                       log=lambda *a, **k: None)
    assert api["test"]["auc"] > 0.9, api["test"]


def test_weight_ema_moves_each_weight_toward_the_live_one_and_puts_the_live_ones_back():
    from anymc3d.training.averaging import WeightEMA

    w = torch.nn.Parameter(torch.zeros(3))
    ema = WeightEMA({"w": w}, 0.75)
    with torch.no_grad():
        w.fill_(4.0)
    ema.update()  # 0 + 0.25 * (4 - 0)
    ema.update()  # 1 + 0.25 * (4 - 1)
    assert torch.allclose(ema.state_dict()["w"], torch.full((3,), 1.75))
    with ema.applied():
        assert torch.allclose(w, torch.full((3,), 1.75))
    assert torch.allclose(w, torch.full((3,), 4.0))
    with pytest.raises(ValueError, match="decay"):
        WeightEMA({"w": w}, 1.0)


def test_weight_swa_is_the_equal_mean_of_the_epoch_end_weights_from_its_first_epoch():
    from anymc3d.training.averaging import WeightSWA

    w = torch.nn.Parameter(torch.zeros(2))
    swa = WeightSWA({"w": w}, start=2)
    for epoch, value in enumerate([10.0, 1.0, 2.0, 6.0], start=1):
        with torch.no_grad():
            w.fill_(value)
        swa.end_epoch(epoch)
        if epoch == 1:  # before its first epoch: no average, the live weights are validated
            with swa.applied():
                assert torch.allclose(w, torch.full((2,), 10.0))
    assert swa.count == 3
    with swa.applied():
        assert torch.allclose(w, torch.full((2,), 3.0))  # (1 + 2 + 6) / 3; epoch 1's 10 left out
    assert torch.allclose(w, torch.full((2,), 6.0))
    again = WeightSWA({"w": torch.nn.Parameter(torch.zeros(2))}, start=2)
    again.load_state_dict(swa.state_dict())
    assert again.count == 3 and torch.allclose(again.shadow[0], torch.full((2,), 3.0))
    with pytest.raises(ValueError, match="first epoch"):
        WeightSWA({"w": w}, start=0)


def test_swa_is_a_plan_field_and_a_flag_and_starts_at_its_fraction_of_the_epochs(tmp_path):
    from anymc3d.cli import build_parser
    from anymc3d.errors import InputError
    from anymc3d.planning.cli import overrides_from
    from anymc3d.training.averaging import WeightSWA
    from anymc3d.training.trainer import TrainConfig, weight_average

    a = build_parser().parse_args(["train", "d.csv", "--out", str(tmp_path), "--swa", "0.2"])
    cfg = TrainConfig.from_plan({**overrides_from(a), "epochs": 15})
    assert cfg.swa == 0.2

    class Tiny:
        def lora_parameters(self):
            return {"a": torch.nn.Parameter(torch.zeros(1))}

        def head_parameters(self):
            return {"h": torch.nn.Parameter(torch.zeros(1))}

    avg = weight_average(Tiny(), cfg)
    assert isinstance(avg, WeightSWA) and avg.start == 3 and avg.names == ["a", "h"]  # ceil(0.2 * 15)
    assert weight_average(Tiny(), TrainConfig(epochs=15)) is None
    with pytest.raises(InputError, match="choose one"):
        weight_average(Tiny(), TrainConfig(epochs=15, swa=0.2, ema=0.99))
    for bad in (["--swa", "1.5"], ["--swa", "-0.1"]):
        with pytest.raises(SystemExit):
            build_parser().parse_args(["train", "d.csv", "--out", str(tmp_path), *bad])


def test_label_smoothing_pulls_the_targets_toward_uniform():
    from anymc3d.training.losses import classification_loss
    import torch.nn.functional as F

    z = torch.tensor([[2.0], [-1.0], [0.5]])
    y = torch.tensor([1, 0, 1])
    soft = torch.tensor([[0.95], [0.05], [0.95]])
    assert torch.allclose(classification_loss(z, y, "binary", "bce", label_smoothing=0.1),
                          F.binary_cross_entropy_with_logits(z, soft))
    assert not torch.allclose(classification_loss(z, y, "binary", "bce"), F.binary_cross_entropy_with_logits(z, soft))
    zm = torch.tensor([[2.0, 0.0, -1.0], [0.0, 1.0, 0.0]])
    ym = torch.tensor([0, 2])
    assert torch.allclose(classification_loss(zm, ym, "multiclass", "ce", label_smoothing=0.2),
                          F.cross_entropy(zm, ym, label_smoothing=0.2))
    # focal: a confident correct logit is pushed back from saturation (its loss no longer vanishes)
    big = torch.tensor([[12.0]])
    assert classification_loss(big, torch.tensor([1]), "binary", "focal", label_smoothing=0.1) > \
        100 * classification_loss(big, torch.tensor([1]), "binary", "focal")


def test_ema_and_label_smoothing_are_plan_fields_and_flags(tmp_path):
    from anymc3d.cli import build_parser
    from anymc3d.planning.cli import overrides_from
    from anymc3d.planning.planner import candidates
    from anymc3d.training.trainer import TrainConfig

    a = build_parser().parse_args(["train", "d.csv", "--out", str(tmp_path), "--ema", "0.99", "--label-smoothing", "0.1"])
    o = overrides_from(a)
    assert o["ema"] == 0.99 and o["label_smoothing"] == 0.1
    cfg = TrainConfig.from_plan({**o, "epochs": 3})
    assert cfg.ema == 0.99 and cfg.label_smoothing == 0.1 and cfg.epochs == 3
    names = {c["name"]: c for c in candidates(["axial"], "cpu")}
    assert names["k1_all_ema"]["ema"] > 0 and names["k1_all_ls"]["label_smoothing"] > 0 and names["k1_all"]["ema"] == 0
    for bad in (["--ema", "1.5"], ["--label-smoothing", "0.7"]):
        with pytest.raises(SystemExit):
            build_parser().parse_args(["train", "d.csv", "--out", str(tmp_path), *bad])


def test_view_dropout_hides_views_but_never_all_of_a_case():
    from anymc3d.training.view_dropout import drop_views

    rng = np.random.default_rng(0)
    present = torch.ones(400, 3, dtype=torch.bool)
    present[::4, 2] = False  # some cases lack a view: it never comes back
    kept = drop_views(present, 0.4, rng)
    assert bool(kept.any(dim=1).all()) and not bool((kept & ~present).any())
    rate = 1 - kept.sum().item() / present.sum().item()
    assert 0.3 < rate < 0.45, rate  # about p (a little less: a case that would lose every view keeps one)
    assert torch.equal(drop_views(present, 0.0, rng), present)
    one = torch.ones(5, 1, dtype=torch.bool)
    assert torch.equal(drop_views(one, 0.9, rng), one)  # a single view is never dropped


def test_mixup_blends_the_embeddings_and_the_loss_of_two_cases():
    from anymc3d.plugins.mixup import Mix
    from anymc3d.training.losses import classification_loss

    mix = Mix.draw(4, 0.4, np.random.default_rng(1))
    assert sorted(mix.perm.tolist()) == [0, 1, 2, 3] and 0 < mix.lam < 1
    h = {"image:axial": torch.randn(4, 5, 8)}
    m = {"image:axial": torch.tensor([[1, 1, 1, 0, 0]] * 2 + [[1, 1, 1, 1, 1]] * 2, dtype=torch.bool)}
    present = torch.ones(4, 1, dtype=torch.bool)
    mixed, masks, pres = mix.embeddings(h, m, present)
    p = mix.perm
    assert torch.allclose(mixed["image:axial"], mix.lam * h["image:axial"] + (1 - mix.lam) * h["image:axial"][p])
    assert torch.equal(masks["image:axial"], m["image:axial"] | m["image:axial"][p]) and torch.equal(pres, present)
    z, y = torch.randn(4, 1), torch.tensor([[0.0], [1.0], [1.0], [0.0]])

    def fn(a, b):
        return classification_loss(a, b, "binary", "bce")
    assert torch.allclose(mix.loss(fn, z, y), mix.lam * fn(z, y) + (1 - mix.lam) * fn(z, y[p]))


@pytest.mark.parametrize("last_k", [1, None])
def test_the_model_pools_mixed_embeddings_inside_mixing_only(tmp_path, last_k):
    """Within ``model.mixing(mix)`` every member pools the blended slice embeddings; outside, nothing changes."""
    from anymc3d.plugins.mixup import Mix
    from anymc3d.runtime.batching import prepare_case
    from anymc3d.runtime.engine import Runtime

    bb = lite0()
    path = random_plugin(bb, tmp_path, "mix", seed=3, last_k=last_k, size=SIZE, views=("axial", "coronal"), ensemble=2)
    model = load_plugin(path, weights="random")
    pred = Predictor(model)
    rt = Runtime(model, pred.specs, device="cpu")
    b = rt.batcher.batch([prepare_case(pred.case(volume(i), f"x{i}"), pred.specs) for i in range(3)])
    model.eval()
    mix = Mix(torch.tensor([2, 0, 1]), 0.7)
    with torch.no_grad():
        plain = model(b.slices, b.masks, b.present).member_logits
        with model.mixing(mix):
            mixed = model(b.slices, b.masks, b.present).member_logits
        again = model(b.slices, b.masks, b.present).member_logits
        for i, m in enumerate([model, *model.members]):
            m.autocast, m.channels_last = model.autocast, model.channels_last
            emb = {s: m.embed_slices(s, x.flatten(0, 1))[0].view(*x.shape[:2], -1) for s, x in b.slices.items()}
            want = m._pool_one(*mix.embeddings(emb, b.masks, b.present)).logits
            assert torch.allclose(mixed[i], want, atol=1e-4), i
    assert all(torch.equal(a, c) for a, c in zip(plain, again)) and not torch.allclose(plain[0], mixed[0])


def test_mixup_and_view_dropout_are_plan_fields_and_flags_and_the_trainer_learns_with_them(tmp_path):
    from anymc3d.cli import build_parser, main
    from anymc3d.planning.cli import overrides_from
    from anymc3d.planning.planner import candidates
    from anymc3d.training.trainer import TrainConfig

    a = build_parser().parse_args(["train", "d.csv", "--out", str(tmp_path), "--mixup", "0.4", "--view-dropout", "0.2"])
    o = overrides_from(a)
    cfg = TrainConfig.from_plan({**o, "epochs": 3})
    assert cfg.mixup == 0.4 and cfg.view_dropout == 0.2
    names = {c["name"]: c for c in candidates(["axial", "coronal"], "cpu")}
    assert names["k1_all_mix"]["mixup"] > 0 and names["k1_all_vd"]["view_dropout"] > 0
    assert names["k1_all_flips_mix"]["flip_copies"] and names["k1_all"]["mixup"] == 0 == names["k1_all"]["view_dropout"]
    for bad in (["--mixup", "-1"], ["--view-dropout", "1"]):
        with pytest.raises(SystemExit):
            build_parser().parse_args(["train", "d.csv", "--out", str(tmp_path), *bad])
    npz = toy_npz(tmp_path)
    tfile = tmp_path / "timings.json"
    tfile.write_text(json.dumps(TOY_TIMINGS))
    out = tmp_path / "cli"
    assert main(["train", str(npz), "--out", str(out), "--timings", str(tfile), "--size", "32", "--epochs", "4",
                 "--views", "axial,coronal", "--mixup", "0.4", "--view-dropout", "0.3", "--quiet", "--no-select"]) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["plan"]["mixup"] == 0.4 and m["plan"]["view_dropout"] == 0.3
    assert m["test"]["auc"] > 0.9, m["test"]


def test_weight_decay_flag_reaches_both_optimiser_groups(tmp_path):
    from anymc3d.cli import build_parser, optimizer_overrides
    from anymc3d.training.trainer import TrainConfig, build_optimizer

    class Tiny(torch.nn.Module):  # what build_optimizer asks of a plugin: its LoRA and its head parameters
        def __init__(self):
            super().__init__()
            self.a, self.h = torch.nn.Linear(2, 2), torch.nn.Linear(2, 1)

        def lora_parameters(self):
            return dict(self.a.named_parameters())

        def head_parameters(self):
            return dict(self.h.named_parameters())

    args = ["train", "d.csv", "--out", str(tmp_path)]
    given = optimizer_overrides(build_parser().parse_args(args + ["--weight-decay", "0.05", "--lr-lora", "2e-4"]))
    assert given == {"lr_lora": 2e-4, "wd_lora": 0.05, "wd_head": 0.05}
    opt, _, _ = build_optimizer(Tiny(), None, TrainConfig.from_plan({"epochs": 2}, **given), steps_per_epoch=3)
    assert [g["weight_decay"] for g in opt.param_groups] == [0.05, 0.05] and opt.param_groups[0]["initial_lr"] == 2e-4
    assert optimizer_overrides(build_parser().parse_args(args)) == {}  # nothing given: the trainer's defaults
    default = TrainConfig()
    opt, _, _ = build_optimizer(Tiny(), None, default, steps_per_epoch=3)
    assert [g["weight_decay"] for g in opt.param_groups] == [default.wd_lora, default.wd_head]
    for bad in ("-0.1", "1.5"):
        with pytest.raises(SystemExit):
            build_parser().parse_args(args + ["--weight-decay", bad])


def test_the_ood_reference_of_a_plugin_with_test_flips_holds_every_training_case(tmp_path):
    """fit_trust turns the test-time flips off for its pass over the training cases and back on before it
    reads the captured embeddings: every training case's embedding is in the reference (it once kept
    every third batch of a plugin with two flips), and the validation scores are one per case."""
    from anymc3d.data.cases import Case
    from anymc3d.evaluation import ood
    from anymc3d.plugins.trust import fit_trust

    bb = lite0()
    path = random_plugin(bb, tmp_path, "tta", seed=6, last_k=1, size=SIZE, test_flips=["w", "h"])
    model = load_plugin(path, weights="random")
    pred = Predictor(model)
    cases = [Case(id=f"c{i}", images={"image": volume(i)}) for i in range(20)]
    trust = fit_trust(model, pred.runtime, cases[:12], cases[12:], np.arange(8) % 2, log=lambda *a, **k: None)
    assert model.spec.test_flips == ["w", "h"]
    (stream,) = trust.refs
    assert len(trust.refs[stream]["points"]) == 12  # <= 64 embeddings: the reference is the embeddings themselves
    assert len(trust.val_ood) == 8
    # the reference is the training cases' unflipped embeddings, whatever the flips are at capture's end
    model.spec.test_flips = []
    with ood.EmbeddingCapture(model) as cap:
        pred.runtime.predict(cases[:12], 4)
    model.spec.test_flips = ["w", "h"]
    want = ood.fit_knn_reference(cap.take()[stream], 64, 1)["points"]
    np.testing.assert_allclose(np.asarray(trust.refs[stream]["points"], np.float32), np.asarray(want, np.float32),
                               atol=1e-3)
