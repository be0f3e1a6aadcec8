"""CPU training cost per slice (issue 15): padding slices skipped, random slice subsets, the cached
trunk, channels_last - each measured side by side (interleaved rounds) in one process, as CPU
milliseconds per real slice of a training step (forward + backward + AdamW), so other processes
on the machine change the numbers little.

    OMP_NUM_THREADS=1 python benchmarks/plan_speed.py [--size 64] [--rounds 5]

Batches: 8 volumes of real EfficientNet-Lite0 input slices (random content; speed does not depend
on it). "padded" = stacks of 28, 20, 12 and 6 slices (the mix of a manifest with varied depth)
padded to 28, with and without the skip of padding slices; "subset" = 28-slice stacks, all slices
vs a random 16 per volume (slice_subset=16); "cached trunk" = a last-stage LoRA step on cached
trunk activations vs the same step that runs the trunk; "channels_last" = full-depth LoRA step
with and without channels_last.
"""
from __future__ import annotations

import argparse
import time

import torch

from anymc3d.backbones import create_backbone
from anymc3d.plugins import LoraSpec, PluginSpec
from anymc3d.plugins.model import AnyMC3D
from anymc3d.runtime.batching import collate, slice_subset
from anymc3d.training.losses import classification_loss


def model_for(bb, size: int, last_k):
    spec = PluginSpec(task="speed", task_type="binary", label_names=["0", "1"], inputs=["image"],
                      preprocess={"image": {"views": ["axial"], "size": size}}, backbone=bb.name,
                      backbone_fingerprint=bb.fingerprint, input_size=size, lora=LoraSpec(r=8, last_k=last_k))
    m = AnyMC3D(bb, spec, adapter_prefix=f"b{last_k or 0}_")
    m.set_trainable(True)
    m.train()
    return m


def step(model, slices, masks, present, y, from_trunk=False):
    out = model(slices, masks, present, from_trunk=from_trunk)
    loss = classification_loss(out.logits.float(), y, "binary", "focal", 2.0, 0.25, None)
    loss.backward()
    for p in {**model.lora_parameters(), **model.head_parameters()}.values():
        p.grad = None


def cpu_ms(fn) -> float:
    t0 = time.process_time()
    fn()
    return (time.process_time() - t0) * 1000


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=5)
    a = ap.parse_args()
    torch.manual_seed(0)
    bb = create_backbone("efficientnet_lite0", input_size=a.size)
    full, tail = model_for(bb, a.size, None), model_for(bb, a.size, 1)
    y = torch.tensor([[0.0], [1.0]] * 4)
    s = "image:axial"
    depths = [28, 20, 12, 6] * 2
    padded = collate([{s: torch.rand(d, 1, a.size, a.size)} for d in depths], [s])
    n_padded_real = sum(depths)
    even = [{s: torch.rand(28, 1, a.size, a.size)} for _ in range(8)]
    ev_slices, ev_masks, ev_present = collate(even, [s])
    sub = collate(slice_subset(even, 16, torch.Generator().manual_seed(0)), [s])
    with torch.no_grad():
        h = tail.trunk(ev_slices[s].flatten(0, 1)).float()
    acts = {s: h.view(8, 28, *h.shape[1:])}

    def no_skip():  # the padding rows run through the backbone (what happened before issue 15)
        step(full, padded[0], None, padded[2], y)

    cases = {
        "full-depth, padded batch, padding skipped": (lambda: step(full, *padded, y), n_padded_real),
        "full-depth, padded batch, padding computed (before)": (no_skip, n_padded_real),
        "full-depth, all 28 slices": (lambda: step(full, ev_slices, ev_masks, ev_present, y), 8 * 28),
        "full-depth, 16-slice subset": (lambda: step(full, *sub, y), 8 * 28),
        "last stage, trunk run every step (before)": (lambda: step(tail, ev_slices, ev_masks, ev_present, y), 8 * 28),
        "last stage, cached trunk": (lambda: step(tail, acts, ev_masks, ev_present, y, from_trunk=True), 8 * 28),
    }
    times = {k: [] for k in cases}
    for fn, _ in cases.values():  # warm-up
        fn()
    for _ in range(a.rounds):
        for k, (fn, _) in cases.items():
            times[k].append(cpu_ms(fn))
    cl = {}
    for flag in (False, True, False, True):  # weights and inputs in that memory format (the runtime's policy)
        bb.model.to(memory_format=torch.channels_last if flag else torch.contiguous_format)
        full.channels_last = flag
        step(full, ev_slices, ev_masks, ev_present, y)
        cl.setdefault(flag, []).append(min(cpu_ms(lambda: step(full, ev_slices, ev_masks, ev_present, y))
                                           for _ in range(max(1, a.rounds // 2))))
    print(f"CPU ms per volume-slice of a training step (8 volumes, {a.size}² slices, "
          f"{torch.get_num_threads()} thread(s), median of {a.rounds} interleaved rounds)")
    print("| step | CPU ms per slice of the volumes |")
    print("|---|---|")
    for k, (fn, n) in cases.items():
        v = sorted(times[k])[len(times[k]) // 2]
        print(f"| {k} | {v / n:.2f} |")
    for flag, v in cl.items():
        print(f"| full-depth, channels_last={flag} | {min(v) / (8 * 28):.2f} |")


if __name__ == "__main__":
    main()
