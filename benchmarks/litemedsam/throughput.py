"""LiteMedSAM TinyViT vs EfficientNet-Lite0: prediction slices/s and training-step ms per slice (issue 18).

    OMP_NUM_THREADS=1 python benchmarks/litemedsam/throughput.py --sizes 64,128,256

For each backbone and slice side it builds the real-weight backbone and a binary one-view plugin
placed like the runtime does (``runtime.device.place``: bf16 autocast on CPU, channels_last for CNNs)
and times, on random volumes of ``--slices`` slices (after one warm-up):

* ``predict``: the whole prediction path without gradients (backbone with LoRA active, query
  pooling, head) -> slices/s;
* ``train_full``: one optimiser step of the paper's full-depth LoRA plugin (forward, focal-free BCE
  loss, backward, AdamW) -> ms per slice;
* ``train_lastk1``: one step of the shared-trunk plugin (``lora.last_k = 1``) fed with cached trunk
  activations, i.e. only the adapted last block runs forward and backward (the bench's
  ``plugin_lastk1*`` recipe without augmentation) -> ms per slice; ``trunk`` is the one-off cost of
  computing those activations (ms per slice).

Prints one JSON line per (backbone, size) and a Markdown table at the end.
"""
from __future__ import annotations

import argparse
import json
import platform
import time

import torch

from anymc3d.backbones import create_backbone
from anymc3d.plugins import LoraSpec, PluginSpec
from anymc3d.plugins.model import AnyMC3D
from anymc3d.preprocess import PreprocessSpec
from anymc3d.runtime.device import place


def plugin(bb, size: int, last_k):
    pre = PreprocessSpec(views=["axial"], size=size).to_dict()
    spec = PluginSpec(task="bench", task_type="binary", label_names=["neg", "pos"], inputs=["image"],
                      preprocess={"image": pre}, backbone=bb.name, backbone_fingerprint=bb.fingerprint,
                      input_size=size, lora=LoraSpec(last_k=last_k))
    model = AnyMC3D(bb, spec, chunk=64, adapter_prefix=f"k{last_k}_")
    return place(model, torch.device("cpu"), amp=True)


def timed(fn, reps: int) -> float:
    fn()  # warm-up
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t0) / reps


def step_fn(model, x, from_trunk=False):
    params = [p for p in {**model.lora_parameters(), **model.head_parameters()}.values()]
    opt = torch.optim.AdamW(params, lr=1e-4)
    y = torch.ones(x.shape[0], 1)
    model.train()

    def step():
        opt.zero_grad(set_to_none=True)
        out = model({"image:axial": x}, from_trunk=from_trunk)
        torch.nn.functional.binary_cross_entropy_with_logits(out.logits.float(), y).backward()
        opt.step()
    return step


def measure(name: str, size: int, slices: int, reps: int) -> dict:
    bb = create_backbone(name, input_size=size)
    x = torch.rand(1, slices, 1, size, size)
    full = plugin(bb, size, None)
    full.eval()
    with torch.no_grad():
        t_pred = timed(lambda: full({"image:axial": x}), reps)
    t_full = timed(step_fn(full, x), reps)
    full = None  # free the full-depth model before the shared-trunk one
    bb = create_backbone(name, input_size=size)  # fresh backbone: no full-depth adapters
    k1 = plugin(bb, size, 1)
    t_trunk = timed(lambda: k1.trunk(x[0]), 1)
    h = k1.trunk(x[0])[None]
    t_k1 = timed(step_fn(k1, h, from_trunk=True), reps)
    return {"backbone": name, "size": size, "slices": slices, "threads": torch.get_num_threads(),
            "predict_slices_per_s": round(slices / t_pred, 2),
            "train_full_ms_per_slice": round(1000 * t_full / slices, 2),
            "train_lastk1_ms_per_slice": round(1000 * t_k1 / slices, 2),
            "trunk_ms_per_slice": round(1000 * t_trunk / slices, 2),
            "trunk_activation_kb_per_slice": round(h[0, 0].numel() * h.element_size() / 1024, 1),
            "embed_dim": bb.embed_dim,
            "cpu": platform.processor() or platform.machine(), "torch": torch.__version__}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--backbones", default="litemedsam_tinyvit,efficientnet_lite0")
    p.add_argument("--sizes", default="64,128,256")
    p.add_argument("--slices", default="32,16,8", help="slices per volume for each size (one value or one per size)")
    p.add_argument("--reps", type=int, default=2)
    a = p.parse_args()
    sizes = [int(s) for s in a.sizes.split(",")]
    slices = [int(s) for s in a.slices.split(",")]
    slices = slices * len(sizes) if len(slices) == 1 else slices
    rows = []
    for name in a.backbones.split(","):
        for size, n in zip(sizes, slices):
            r = measure(name, size, n, a.reps)
            print(json.dumps(r), flush=True)
            rows.append(r)
    print("\n| backbone | slice | predict slices/s | train step ms/slice (full-depth LoRA) | "
          "train step ms/slice (last_k=1, cached trunk) | trunk ms/slice | trunk KB/slice |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['backbone']} | {r['size']}² | {r['predict_slices_per_s']} | {r['train_full_ms_per_slice']} | "
              f"{r['train_lastk1_ms_per_slice']} | {r['trunk_ms_per_slice']} | {r['trunk_activation_kb_per_slice']} |")


if __name__ == "__main__":
    main()
