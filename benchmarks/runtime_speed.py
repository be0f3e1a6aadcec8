"""Training-step ms per slice and prediction slices/s of the plugin on one device; prints one JSON line.

    python benchmarks/runtime_speed.py --device cpu --threads 1
    python benchmarks/runtime_speed.py --device cuda --backbone dinov2_vitl14 --weights random --size 224

Wall-clock and process-CPU figures are both printed: on a shared machine the CPU-time ones
(``*_cpu_*``) are the robust comparison. The training step is the trainer's: a batch of ``--batch`` volumes x ``--slices`` slices through
the backbone with the plugin's LoRA active (full depth unless ``--lora-last-k``), focal loss,
backward, AdamW step. Prediction is ``Runtime.predict``-style: no gradients, batches of
``--batch`` volumes. The same script runs against an older checkout that has no runtime package
(``PYTHONPATH=OLD/src python benchmarks/runtime_speed.py ...``): it then calls the model the way
that release did, which is what "before" means in docs/results.md.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--backbone", default="efficientnet_lite0")
    p.add_argument("--weights")
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--slices", type=int, default=28)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--lora-last-k", type=int)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--no-train", action="store_true")
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)

    from anymc3d.backbones import create_backbone
    from anymc3d.plugins import LoraSpec, PluginSpec
    from anymc3d.preprocess import PreprocessSpec
    from anymc3d.training.losses import classification_loss
    try:
        from anymc3d.plugins.model import AnyMC3D
    except ImportError:  # before the runtime restructuring
        from anymc3d.model import AnyMC3D
    try:
        from anymc3d.runtime.engine import Runtime
    except ImportError:
        Runtime = None

    torch.manual_seed(0)
    bb = create_backbone(a.backbone, weights=a.weights, input_size=a.size)
    pre = PreprocessSpec(views=["axial"], size=a.size)
    spec = PluginSpec(task="bench", task_type="binary", label_names=["neg", "pos"], inputs=["image"],
                      preprocess={"image": pre.to_dict()}, backbone=bb.name, backbone_fingerprint=bb.fingerprint,
                      input_size=a.size, lora=LoraSpec(last_k=a.lora_last_k))
    model = AnyMC3D(bb, spec)
    if Runtime is not None:
        rt = Runtime(model, {"image": pre}, device=a.device)
        from anymc3d.runtime.batching import Batch

        forward, device, path = (lambda s, m, pr: rt.forward(Batch(s, m, pr))), rt.device, "runtime"
    else:
        device = torch.device(a.device)
        model.to(device)
        forward, path = (lambda s, m, pr, **k: model(s, m, pr, **k)), "model (before the runtime)"
    x = {"image:axial": torch.rand(a.batch, a.slices, 1, a.size, a.size)}
    masks = {"image:axial": torch.ones(a.batch, a.slices, dtype=torch.bool)}
    present = torch.ones(a.batch, 1, dtype=torch.bool)
    y = torch.randint(0, 2, (a.batch, 1)).float().to(device)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    out = {"backbone": a.backbone, "size": a.size, "slices_per_step": a.batch * a.slices, "device": str(device),
           "threads": torch.get_num_threads(), "lora_last_k": a.lora_last_k, "path": path,
           "autocast": bool(model.autocast), "channels_last": bool(getattr(model, "channels_last", False)),
           "torch": torch.__version__, "cpu": platform.processor() or platform.machine()}
    if not a.no_train:
        model.set_trainable(True)
        opt = torch.optim.AdamW(list(model.lora_parameters().values()) + list(model.head_parameters().values()), lr=1e-4)
        model.train()
        times, cpu = [], []
        for i in range(a.steps + 1):
            sync()
            t0, c0 = time.perf_counter(), time.process_time()
            o = forward(x, masks, present)
            loss = classification_loss(o.logits.float(), y, "binary", "focal")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sync()
            if i:  # the first step warms up
                times.append(time.perf_counter() - t0)
                cpu.append(time.process_time() - c0)
        out["train_ms_per_slice"] = round(1000 * statistics.median(times) / (a.batch * a.slices), 3)
        out["train_cpu_ms_per_slice"] = round(1000 * statistics.median(cpu) / (a.batch * a.slices), 3)
    model.eval()
    times, cpu = [], []
    with torch.no_grad():
        for i in range(a.steps + 1):
            sync()
            t0, c0 = time.perf_counter(), time.process_time()
            o = forward(x, masks, present)
            model.probabilities(o.logits).cpu()
            sync()
            if i:
                times.append(time.perf_counter() - t0)
                cpu.append(time.process_time() - c0)
    out["predict_slices_per_s"] = round(a.batch * a.slices / statistics.median(times), 1)
    # CPU time of this process (all its threads): robust to other jobs on the machine
    out["predict_slices_per_cpu_s"] = round(a.batch * a.slices / statistics.median(cpu), 1)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
