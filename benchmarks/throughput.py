"""Prediction throughput: volumes/s and slices/s for a plugin on a backbone (CPU or GPU).

    python benchmarks/throughput.py --backbone efficientnet_lite0 --size 224 --slices 64
    python benchmarks/throughput.py --backbone dinov2_vits14 --weights random --size 224 --slices 64

Times the full prediction path after preprocessing (backbone with the plugin's LoRA active,
task-query pooling, head) on random 64-slice volumes; prints one JSON line.
"""
from __future__ import annotations

import argparse
import json
import platform
import time

import torch

from anymc3d.backbones import create_backbone
from anymc3d.plugins.model import AnyMC3D
from anymc3d.plugins import LoraSpec, PluginSpec
from anymc3d.preprocess import PreprocessSpec


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--backbone", default="efficientnet_lite0")
    p.add_argument("--weights")
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--slices", type=int, default=64)
    p.add_argument("--volumes", type=int, default=3)
    p.add_argument("--lora-last-k", type=int)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a = p.parse_args()
    bb = create_backbone(a.backbone, weights=a.weights, input_size=a.size)
    pre = PreprocessSpec(views=["axial"], size=a.size).to_dict()
    spec = PluginSpec(task="bench", task_type="binary", label_names=["neg", "pos"], inputs=["image"],
                      preprocess={"image": pre}, backbone=bb.name, backbone_fingerprint=bb.fingerprint,
                      input_size=a.size, lora=LoraSpec(last_k=a.lora_last_k))
    model = AnyMC3D(bb, spec, chunk=64).to(a.device).eval()
    x = {"image:axial": torch.rand(1, a.slices, 1, a.size, a.size, device=a.device)}
    with torch.no_grad():
        model(x)  # warm-up
        if a.device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(a.volumes):
            model(x)
        if a.device == "cuda":
            torch.cuda.synchronize()
        dt = (time.perf_counter() - t0) / a.volumes
    print(json.dumps({"backbone": a.backbone, "weights": a.weights or "default", "size": a.size, "slices": a.slices,
                      "lora_last_k": a.lora_last_k, "device": a.device, "threads": torch.get_num_threads(),
                      "s_per_volume": round(dt, 3), "volumes_per_s": round(1 / dt, 3),
                      "slices_per_s": round(a.slices / dt, 1), "cpu": platform.processor() or platform.machine()}))


if __name__ == "__main__":
    main()
