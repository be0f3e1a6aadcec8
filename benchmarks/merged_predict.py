"""Issue 29: prediction with each view's LoRA merged into the slice network, run whole on an engine,
against the plugin's own paths, side by side in one process, with the probabilities compared.

    OMP_NUM_THREADS=1 python benchmarks/merged_predict.py ../shared/data/medmnist3d/adrenalmnist3d.npz \
        --plugin runs/d28/plugin.json --full-depth 64 --volumes 100 --engine openvino --out runs/merged.json

For each plugin (``--plugin``: a trained one; ``--full-depth SIZE``: EfficientNet-Lite0 with its ImageNet
weights, LoRA r=8 in every block with small random weights (std 0.02, a trained plugin's scale), three
views at SIZE², i.e. the recipe a GPU plan trains, whose slice network has no frozen trunk to hand an
engine), the first ``--volumes`` test volumes are predicted by ``Predictor.predict_many`` with:

* ``torch``: PyTorch eager, bf16 autocast where the CPU has it (the default arithmetic; ``torch_fp32`` beside it);
* ``engine``: ``--engine`` for the frozen part only (a shared-trunk plugin's trunk; nothing for full depth);
* ``merged``: ``--engine`` for each view's whole slice network with its LoRA merged (anymc3d.runtime.merged).

Each variant first predicts 2 volumes (the exports and compilation, reported as ``first_s``), then the
rounds alternate between variants; the best wall time per round is kept. ``max_dp`` is the largest
|probability - torch_fp32's| over the volumes (the engines' tolerance is 1e-3).
"""
from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch


def volumes(npz: Path, n: int):
    from anymc3d.volume import Volume

    x = np.load(npz)["test_images"][:n]
    return [Volume(a.astype(np.float32), np.eye(4), {"path": f"t{i:04d}.nii.gz"}) for i, a in enumerate(x)]


def full_depth_plugin(size: int):
    """Lite0 (ImageNet) with LoRA in every block, three views at size², small random LoRA / queries / head."""
    from anymc3d.backbones import create_backbone
    from anymc3d.plugins import LoraSpec, PluginSpec
    from anymc3d.plugins.model import AnyMC3D
    from anymc3d.preprocess import PreprocessSpec

    bb = create_backbone("efficientnet_lite0", input_size=size)
    pre = PreprocessSpec(size=size, views=["axial", "coronal", "sagittal"], intensity="minmax").to_dict()
    spec = PluginSpec(task="full_depth", task_type="binary", label_names=["0", "1"], inputs=["image"],
                      preprocess={"image": pre}, backbone=bb.name, backbone_fingerprint=bb.fingerprint,
                      input_size=bb.input_size, lora=LoraSpec(last_k=None))
    g = torch.Generator().manual_seed(0)
    model = AnyMC3D(bb, spec)
    with torch.no_grad():
        for p in {**model.lora_parameters(), **model.head_parameters()}.values():
            p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    return model.eval()


def run_variant(model, vols, engine: str, merge: bool, amp):
    from anymc3d.predict import Predictor
    from anymc3d.runtime import engines

    with engines.using_engine(engine):
        pred = Predictor(model, amp=amp, merge_lora=merge)
        t0 = time.perf_counter()
        pred.predict_many(vols[:2])
        first = time.perf_counter() - t0
        t0 = time.perf_counter()
        res = pred.predict_many(vols)
        wall = time.perf_counter() - t0
    names = list(res[0]["raw_probabilities"])
    return first, wall, np.array([[r["raw_probabilities"][k] for k in names] for r in res])


def bench(model, vols, engine: str, rounds: int) -> dict:
    from anymc3d.runtime import engines

    default = bool(model.autocast)  # the plugin's own precision (bf16 autocast where the CPU has it); set
    # explicitly for every variant, since a Predictor places the model with its amp setting for good
    variants = {"torch": ("torch", False, default), "torch_fp32": ("torch", False, False),
                "engine": (engine, False, default), "merged": (engine, True, default)}
    out = {k: {"wall_s": [], "first_s": None} for k in variants}
    probs = {}
    for _ in range(rounds):
        for k, (eng, merge, amp) in variants.items():
            engines.clear()  # every variant builds (and, from the export cache, loads) its own runners
            first, wall, p = run_variant(model, vols, eng, merge, amp)
            out[k]["wall_s"].append(wall)
            out[k]["first_s"] = first if out[k]["first_s"] is None else out[k]["first_s"]
            probs[k] = p
    ref = probs["torch_fp32"]
    for k in variants:
        out[k]["best_s"] = min(out[k]["wall_s"])
        out[k]["ms_per_volume"] = 1000 * out[k]["best_s"] / len(vols)
        out[k]["max_dp"] = float(np.abs(probs[k] - ref).max())
        out[k]["speedup_vs_torch"] = min(out["torch"]["wall_s"]) / out[k]["best_s"]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("data", type=Path)
    ap.add_argument("--plugin", action="append", default=[], help="a trained plugin (repeatable)")
    ap.add_argument("--full-depth", type=int, metavar="SIZE", help="also a full-depth Lite0 plugin at SIZE²")
    ap.add_argument("--volumes", type=int, default=100)
    ap.add_argument("--engine", default="openvino")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--out", type=Path)
    a = ap.parse_args()
    from anymc3d.plugins import load_plugin

    vols = volumes(a.data, a.volumes)
    models = {p: load_plugin(p) for p in a.plugin}
    if a.full_depth:
        models[f"full_depth_lite0_{a.full_depth}"] = full_depth_plugin(a.full_depth)
    report = {"machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} thread(s)",
              "cpu_capability": torch.backends.cpu.get_cpu_capability(), "volumes": len(vols), "engine": a.engine,
              "plugins": {}}
    print(f"| plugin | variant | ms / volume | ratio to torch | first 2 volumes s | max abs dp vs torch fp32 |")
    print("|---|---|---|---|---|---|")
    for name, model in models.items():
        r = bench(model, vols, a.engine, a.rounds)
        report["plugins"][name] = r
        for k, v in r.items():
            print(f"| {name} | {k} | {v['ms_per_volume']:.1f} | {v['speedup_vs_torch']:.2f}x | {v['first_s']:.1f} | "
                  f"{v['max_dp']:.1e} |", flush=True)
    if a.out:
        a.out.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
