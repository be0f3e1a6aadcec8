"""Issue 14: one runtime path for every verb, on any device.

Every verb takes --device / --workers; predict, predict --plugins, evaluate and explain reach the
model through ``Runtime.forward`` and agree on a reloaded plugin; DataLoader workers do not change
a training run; device selection and the GPU-only checks (marked ``gpu``, skipped without CUDA).
"""
from __future__ import annotations

import argparse
import json
import shutil

import numpy as np
import pytest
import torch

from anymc3d.cli import build_parser, main
from anymc3d.errors import InputError
from anymc3d.runtime.device import resolve_device
from anymc3d.runtime.engine import Runtime

SIZE = 32
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none visible to PyTorch here)")


def _leaf_parsers(p: argparse.ArgumentParser, path=()):
    for action in p._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                if any(isinstance(a, argparse._SubParsersAction) for a in sub._actions):
                    yield from _leaf_parsers(sub, path + (name,))
                else:
                    yield path + (name,), sub


VERB_ARGS = {
    ("train",): ["train", "d.csv", "--out", "o"],
    ("evaluate",): ["evaluate", "p", "d.csv", "--out", "o"],
    ("predict",): ["predict", "p", "x.nii.gz", "--out", "o"],
    ("demo",): ["demo"],
    ("probe",): ["probe", "d.csv", "--out", "o"],
    ("backbones",): ["backbones"],
    ("explain",): ["explain", "p", "x.nii.gz", "--out", "o"],
    ("bench",): ["bench", "synthetic", "--out", "o"],
    ("plan",): ["plan", "d.csv", "--out", "o"],
    ("cache",): ["cache", "info", "--cache", "c"],
    ("plugins", "list"): ["plugins", "list", "--store", "s"],
    ("plugins", "info"): ["plugins", "info", "n", "--store", "s"],
    ("plugins", "add"): ["plugins", "add", "p", "--store", "s"],
    ("plugins", "remove"): ["plugins", "remove", "n", "--store", "s"],
    ("serve",): ["serve", "--plugins", "s"],
}


def test_every_verb_has_the_runtime_options():
    parser = build_parser()
    leaves = dict(_leaf_parsers(parser))
    assert set(leaves) == set(VERB_ARGS), "a verb without a --device test line"
    for verb, argv in VERB_ARGS.items():
        assert parser.parse_args(argv).device == "auto", verb  # the default
        for dev in ("cpu", "auto"):
            ns = parser.parse_args(argv + ["--device", dev, "--workers", "1"])
            assert ns.device == dev and ns.workers == 1, verb


def test_resolve_device():
    assert resolve_device("cpu").type == "cpu"
    auto = resolve_device("auto")
    assert auto.type == ("cuda" if torch.cuda.is_available() else
                         "mps" if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available() else "cpu")
    with pytest.raises(InputError, match="expected auto"):
        resolve_device("tpu")
    with pytest.raises(InputError):
        resolve_device("cuda:x")
    if not torch.cuda.is_available():
        with pytest.raises(InputError, match="no CUDA GPU"):
            resolve_device("cuda")


def test_cuda_device_is_refused_cleanly_on_a_cpu_machine(trained_plugin, positive_volume, tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("a CUDA GPU is visible: the refusal is for machines without one")
    rc = main(["predict", str(trained_plugin), str(positive_volume), "--out", str(tmp_path / "o"), "--device", "cuda"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith("anymc3d: error: --device cuda:")
    assert not (tmp_path / "o").exists()


@pytest.fixture()
def forward_calls(monkeypatch):
    """Record every Runtime.forward call (and that nothing else runs the backbone through the model)."""
    calls = []
    orig = Runtime.forward

    def spy(self, *a, **k):
        calls.append(type(self.model).__name__)
        return orig(self, *a, **k)

    monkeypatch.setattr(Runtime, "forward", spy)
    return calls


def test_four_verbs_one_runtime_same_probabilities(trained_plugin, binary_manifest, positive_volume, tmp_path,
                                                   forward_calls, capsys):
    """A plugin saved and reloaded gives identical probabilities through predict, predict --plugins,
    evaluate and explain, and each of them reaches the model through Runtime.forward."""
    copy = tmp_path / "reloaded"
    shutil.copytree(trained_plugin, copy)
    case_id = positive_volume.name.split(".")[0]
    pos = json.loads((copy / "plugin.json").read_text())["label_names"][1]
    probs = {}

    n = len(forward_calls)
    assert main(["predict", str(copy), str(positive_volume), "--out", str(tmp_path / "p"), "--device", "cpu"]) == 0
    probs["predict"] = json.loads((tmp_path / "p" / f"{case_id}.json").read_text())["probabilities"][pos]
    assert len(forward_calls) > n

    store = tmp_path / "store"
    assert main(["plugins", "add", str(copy), "--store", str(store), "--name", "t"]) == 0
    n = len(forward_calls)
    assert main(["predict", "--plugins", str(store), str(positive_volume), "--out", str(tmp_path / "pa"),
                 "--device", "auto"]) == 0
    probs["predict --plugins"] = json.loads((tmp_path / "pa" / f"{case_id}.json").read_text())["tasks"]["t"][
        "probabilities"][pos]
    assert len(forward_calls) > n

    n = len(forward_calls)
    assert main(["evaluate", str(copy), str(binary_manifest), "--split", "all", "--out", str(tmp_path / "ev"),
                 "--bootstrap", "0", "--device", "cpu"]) == 0
    with open(tmp_path / "ev" / "predictions.csv") as fh:
        rows = [line.strip().split(",") for line in fh][1:]
    probs["evaluate"] = float(next(r for r in rows if r[0] == case_id)[2])
    assert len(forward_calls) > n

    n = len(forward_calls)
    assert main(["explain", str(copy), str(positive_volume), "--out", str(tmp_path / "ex"), "--no-figure",
                 "--device", "cpu"]) == 0
    ex = json.loads((tmp_path / "ex" / "explain.json").read_text())
    per_case = ex["cases"][0] if "cases" in ex else ex[case_id]
    probs["explain"] = per_case["probabilities"][pos]
    assert len(forward_calls) > n

    ref = probs["predict"]
    for verb, p in probs.items():
        assert p == pytest.approx(ref, abs=1e-6), (verb, probs)


def _fit_once(prepared, specs, tmp_path, workers: int):
    from anymc3d.backbones import create_backbone
    from anymc3d.plugins import LoraSpec, PluginSpec
    from anymc3d.plugins.model import AnyMC3D
    from anymc3d.training.trainer import TrainConfig, fit, seed_everything

    bb = create_backbone("efficientnet_lite0", weights="random", input_size=SIZE)
    spec = PluginSpec(task="t", task_type="binary", label_names=["0", "1"], inputs=["image"],
                      preprocess={"image": specs["image"].to_dict()}, backbone=bb.name,
                      backbone_fingerprint=bb.fingerprint, input_size=SIZE, lora=LoraSpec(r=4))
    seed_everything(0)
    model = AnyMC3D(bb, spec)
    cfg = TrainConfig(epochs=2, batch_size=4, augment=True, progress=False, seed=3, workers=workers, device="cpu")
    summary = fit(model, specs, prepared["train"], prepared["val"], cfg, tmp_path / f"w{workers}")
    return summary, model.trainable_state()


def test_loader_workers_give_the_same_training_run(binary_manifest, tmp_path):
    """Augmentation and slicing in 2 worker processes = in the main process, for the same seed."""
    from anymc3d.data import load_data
    from anymc3d.preprocess import PreprocessSpec
    from anymc3d.runtime.batching import prepare_case

    task = load_data(binary_manifest)
    specs = {"image": PreprocessSpec(size=SIZE, views=["axial", "coronal"])}
    prepared = {s: [prepare_case(c, specs) for c in task.cases if c.split == s][:8] for s in ("train", "val")}
    s0, w0 = _fit_once(prepared, specs, tmp_path, workers=0)
    s2, w2 = _fit_once(prepared, specs, tmp_path, workers=2)
    assert [r["train_loss"] for r in s0["history"]] == pytest.approx([r["train_loss"] for r in s2["history"]], abs=1e-6)
    assert [r["val_auc"] for r in s0["history"]] == [r["val_auc"] for r in s2["history"]]
    assert sorted(w0) == sorted(w2)
    for k in w0:
        torch.testing.assert_close(w0[k], w2[k], atol=1e-6, rtol=0)


def test_predict_reads_cases_in_loader_workers(trained_plugin, binary_manifest):
    """The loader's workers read and preprocess: same probabilities with 0 and 2 workers."""
    from anymc3d.data import load_data
    from anymc3d.predict import load

    cases = [c for c in load_data(binary_manifest).cases][:6]
    p0, _ = load(trained_plugin, device="cpu", workers=0).runtime.predict(cases, batch_size=2)
    p2, o2 = load(trained_plugin, device="cpu", workers=2).runtime.predict(cases, batch_size=2)
    np.testing.assert_array_equal(p0, p2)
    assert [o["id"] for o in o2] == [c.id for c in cases]


def test_cnn_backbone_runs_channels_last(trained_plugin):
    from anymc3d.predict import load

    from anymc3d.runtime.device import cpu_bf16_fast

    pred = load(trained_plugin, device="cpu")
    assert pred.model.channels_last and pred.model.autocast is cpu_bf16_fast()
    w = pred.model.backbone.model.conv_stem.weight
    assert w.is_contiguous(memory_format=torch.channels_last)


def test_one_activation_cache_is_shared_by_runtimes(trained_plugin, binary_manifest, tmp_path):
    """Two pooling-only runtimes on one ActivationCache: the second computes nothing."""
    from anymc3d.backbones import create_backbone
    from anymc3d.data import load_data
    from anymc3d.preprocess import PreprocessSpec
    from anymc3d.runtime.cache import ActivationCache
    from anymc3d.runtime.engine import frozen_embeddings

    bb = create_backbone("efficientnet_lite0", weights="random", input_size=SIZE)
    cases = load_data(binary_manifest).cases[:4]
    specs = {"image": PreprocessSpec(size=SIZE)}
    cache = ActivationCache(tmp_path / "c")
    rows, _ = frozen_embeddings(bb, cases, specs, ["axial"], device="cpu", cache=cache)
    assert cache.stats["misses"] == 4 and cache.stats["writes"] == 4
    again = ActivationCache(tmp_path / "c")
    rows2, _ = frozen_embeddings(bb, cases, specs, ["axial"], device="cpu", cache=again)
    assert again.stats["hits"] == 4 and again.stats["misses"] == 0
    for a, b in zip(rows, rows2):
        np.testing.assert_array_equal(a[0], b[0])


# ------------------------------------------------------------------------------------------ GPU only
# CPU vs CUDA probabilities: full fp32 (amp=False: no autocast, no TF32) agrees to FP32_ATOL; the default
# bf16 autocast on both devices agrees to BF16_ATOL (measured on an H200: 2.7e-3 worst over 4 cases of a
# 1-epoch plugin, 1.0e-3 over the demo's 32; bf16 keeps 8 mantissa bits, ~4e-3 relative per rounding).
FP32_ATOL, BF16_ATOL = 1e-4, 1e-2


@pytest.mark.gpu
@needs_cuda
def test_gpu_and_cpu_give_the_same_probabilities(trained_plugin, binary_manifest):
    from anymc3d.data import load_data
    from anymc3d.predict import load

    cases = load_data(binary_manifest).cases[:8]
    for amp, atol in ((False, FP32_ATOL), (None, BF16_ATOL)):
        p_cpu, _ = load(trained_plugin, device="cpu", amp=amp).runtime.predict(cases)
        p_gpu, _ = load(trained_plugin, device="cuda", amp=amp).runtime.predict(cases)
        np.testing.assert_allclose(p_cpu, p_gpu, atol=atol, err_msg=f"amp={amp}")


@pytest.mark.gpu
@needs_cuda
def test_gpu_training_plugin_loads_on_cpu(binary_manifest, tmp_path):
    from anymc3d.predict import load
    from anymc3d.training.run import PreprocessOptions, train_plugin
    from anymc3d.training.trainer import TrainConfig

    out = tmp_path / "gpu_plugin"
    train_plugin(binary_manifest, "efficientnet_lite0", out, preprocess=PreprocessOptions(size=SIZE),
                 config=TrainConfig(epochs=1, batch_size=4, progress=False, device="cuda"), log=lambda *a, **k: None)
    cases = [str(binary_manifest.parent / "images" / f"case0{i}.nii.gz") for i in range(4)]
    pos = json.loads((out / "plugin.json").read_text())["label_names"][1]
    for amp, atol in ((False, FP32_ATOL), (None, BF16_ATOL)):
        p_gpu = [r["probabilities"][pos] for r in load(out, device="cuda", amp=amp).predict_many(cases)]
        p_cpu = [r["probabilities"][pos] for r in load(out, device="cpu", amp=amp).predict_many(cases)]
        np.testing.assert_allclose(p_cpu, p_gpu, atol=atol, err_msg=f"amp={amp}")


def test_no_amp_is_full_fp32_and_reaches_predict(trained_plugin, binary_manifest, tmp_path):
    """``amp=False`` / ``predict --no-amp`` turns bf16 autocast off (the CPU-vs-GPU 1e-4 path); the default
    keeps it on where the CPU runs bf16 fast. The fp32 answer is the CLI's answer too."""
    from anymc3d.cli import main
    from anymc3d.data import load_data
    from anymc3d.predict import load

    from anymc3d.runtime.device import cpu_bf16_fast

    assert load(trained_plugin, device="cpu").model.autocast is cpu_bf16_fast()  # bf16 where the CPU has AVX-512
    fp32 = load(trained_plugin, device="cpu", amp=False)
    assert fp32.model.autocast is False
    case = load_data(binary_manifest).cases[0]
    p32 = fp32.runtime.predict([case])[0][0]
    p16 = load(trained_plugin, device="cpu").runtime.predict([case])[0][0]
    np.testing.assert_allclose(p32, p16, atol=1e-2)  # bf16 vs fp32 on one device: close, not equal
    assert main(["predict", str(trained_plugin), str(case.images["image"]), "--out", str(tmp_path / "o"),
                 "--no-amp", "--device", "cpu"]) == 0
    out = json.loads(next((tmp_path / "o").glob("*.json")).read_text())
    raw = out["raw_probabilities"]
    pos = fp32.spec.label_names[-1]
    assert abs(raw[pos] - float(np.ravel(p32)[-1])) < 1e-6


def test_five_channels_are_refused_from_python_too(trained_plugin):
    """The channel check sits in the runtime, so the Python API refuses like the CLI (InputError, not a
    ValueError deep in the backbone)."""
    from anymc3d.predict import load
    from anymc3d.volume import Volume

    vol = Volume(np.random.default_rng(0).random((5, 12, 12, 10), dtype=np.float32), meta={"path": "five.nii.gz"})
    with pytest.raises(InputError, match=r"five.nii.gz: 5 channels after preprocessing"):
        load(trained_plugin, device="cpu").predict(vol)


def test_no_import_cycles():
    """The layout keeps 0 import cycles between modules (benchmarks/import_cycles.py, ast-based)."""
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "import_cycles.py"
    r = subprocess.run([sys.executable, str(script)], capture_output=True, text=True)
    assert r.returncode == 0 and "0 cycle(s)" in r.stdout, r.stdout + r.stderr


def test_inference_never_imports_training():
    """Training imports inference (runtime, predict), never the reverse."""
    import ast
    from pathlib import Path

    src = Path(__file__).resolve().parents[1] / "src" / "anymc3d"
    inference = [src / "predict.py", *sorted((src / "runtime").glob("*.py")), *sorted((src / "plugins").glob("*.py"))]
    for path in inference:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom):
                mod = ("." * node.level) + (node.module or "")
                assert "training" not in mod.split("."), f"{path.name} imports {mod}"
            elif isinstance(node, ast.Import):
                assert not any(a.name.startswith("anymc3d.training") for a in node.names), path.name


def test_cpu_autocast_only_where_bf16_is_fast(monkeypatch):
    """bf16 autocast on an AVX-512 CPU and on CUDA; fp32 on an AVX2-only CPU (bf16 emulated there: 12x
    slower, docs/results.md "CPU precision"); never with amp off or on MPS."""
    import torch

    from anymc3d.runtime import device as dev

    cpu = torch.device("cpu")
    for probe in ("_is_avx512_bf16_supported", "_is_amx_tile_supported", "_is_avx512_supported"):
        monkeypatch.setattr(torch.cpu, probe, lambda: False, raising=False)
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    assert dev.amp_for(cpu) is False and dev.amp_for(torch.device("cuda")) is True
    monkeypatch.setattr(torch.cpu, "_is_avx512_supported", lambda: True, raising=False)
    assert dev.amp_for(cpu) is True and dev.amp_for(cpu, requested=False) is False
    assert dev.amp_for(torch.device("mps")) is False
