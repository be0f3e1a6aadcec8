"""Time the trunk-cache fill that training does before its first epoch (issue 29's target: all of
AdrenalMNIST3D 28³, three views, at 32², LiteMedSAM's TinyViT, <= 20 min on the 2 cores).

It builds the plugin a last-stage shared-trunk plan trains (three views, LoRA on the last stage, the
trunk cached at that cut), prepares every case of the file (train, val and test), and times
``Runtime.fill_cache`` of the Trainer's own runtime over all of them, with the engine of ``--engine``.
Prints one JSON object (cases, slices, seconds, slices/s, engine, threads); ``--out`` also writes it.

    OMP_NUM_THREADS=2 python benchmarks/trunk_fill.py ../shared/data/medmnist3d/adrenalmnist3d.npz \
        --backbone litemedsam_tinyvit --size 32 --threads 2 --out runs/trunk_fill.json
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from anymc3d.backbones import create_backbone
from anymc3d.data import load_data
from anymc3d.plugins import LoraSpec, PluginSpec
from anymc3d.plugins.model import AnyMC3D
from anymc3d.preprocess import PreprocessOptions
from anymc3d.runtime.batching import prepare_case, slice_streams
from anymc3d.runtime.cache import frozen_engine
from anymc3d.runtime.engines import engine_name, set_engine
from anymc3d.training.trainer import Trainer, TrainConfig

VIEWS = ["axial", "coronal", "sagittal"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("data", help="a MedMNIST3D .npz (every split is filled)")
    ap.add_argument("--backbone", default="litemedsam_tinyvit")
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--engine", default="auto", choices=["auto", "torch", "onnxruntime", "openvino"])
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--limit", type=int, default=None, help="only the first N cases (a quick look)")
    ap.add_argument("--out", type=Path, default=None)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    set_engine(a.engine)

    task = load_data(a.data)
    cases = [c for c in task.cases if c.label is not None][: a.limit]
    bb = create_backbone(a.backbone, input_size=a.size)
    specs = {task.inputs[0]: PreprocessOptions(views=VIEWS, size=a.size).spec_for(task, bb.input_size)}
    spec = PluginSpec.for_task(task, specs, bb, task="fill", inputs=task.inputs[:1], lora=LoraSpec(last_k=1))
    model = AnyMC3D(bb, spec)
    t0 = time.perf_counter()
    prepared = [prepare_case(c, specs) for c in cases]
    prep_s = time.perf_counter() - t0
    with tempfile.TemporaryDirectory() as tmp:
        cfg = TrainConfig(batch_size=a.batch_size, progress=False, augment=False, device="cpu")
        trainer = Trainer(model, specs, prepared, [], cfg, Path(tmp), local=True)
        t0 = time.perf_counter()
        compute_s = trainer.rt.fill_cache(prepared, a.batch_size)
        wall = time.perf_counter() - t0
        # the engine each view's fill ran on (the runner is built once per stream and reused)
        stacks = slice_streams(prepared[0], specs, model.streams)
        engines = {s: engine_name(frozen_engine(model, s, stacks[s])) for s in model.streams}
    n_slices = sum(int(t.shape[0]) for p in prepared for t in slice_streams(p, specs, model.streams).values())
    row = {"data": Path(a.data).name, "backbone": a.backbone, "size": a.size, "views": VIEWS, "cases": len(prepared),
           "slices": n_slices, "threads": a.threads, "engine_asked": a.engine, "engines_used": engines,
           "prepare_s": round(prep_s, 1), "fill_wall_s": round(wall, 1), "fill_compute_s": round(compute_s, 1),
           "slices_per_s": round(n_slices / wall, 1)}
    print(json.dumps(row))
    if a.out is not None:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps(row, indent=1) + "\n")


if __name__ == "__main__":
    main()
