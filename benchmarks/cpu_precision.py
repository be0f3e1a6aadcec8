"""CPU precision: EfficientNet-Lite0 at 64² (28 slices, one thread by default) in fp32 and under bf16
autocast, with and without channels_last: the frozen trunk's forward (the cut of ``--lora-last-k 1``)
and one training step of full-depth LoRA (forward + backward of the whole backbone). Prints ms per
slice, the bf16/fp32 ratios and what ``anymc3d.runtime.device.cpu_bf16_fast`` decides on this CPU.

    OMP_NUM_THREADS=1 python benchmarks/cpu_precision.py
"""
from __future__ import annotations

import argparse
import time

import torch

from anymc3d.backbones import create_backbone
from anymc3d.runtime.device import cpu_bf16_fast


def per_slice_ms(fn, n: int, repeats: int) -> float:
    fn()  # warm-up
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return 1e3 * best / n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--slices", type=int, default=28)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args()
    bb = create_backbone("efficientnet_lite0", weights="random", input_size=a.size)
    x = torch.randn(a.slices, 3, a.size, a.size)
    rows = {}
    for cl in (False, True):
        fmt = torch.channels_last if cl else torch.contiguous_format
        bb.model.to(memory_format=fmt)
        xi = x.contiguous(memory_format=fmt)
        for bf16 in (False, True):
            def trunk():
                with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                    bb.forward_trunk(xi, 1)

            def step():
                bb.model.train()
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                    out = bb(xi.requires_grad_(False))
                out.cls.float().sum().backward()
                bb.model.zero_grad(set_to_none=True)

            for p in bb.model.parameters():
                p.requires_grad_(True)
            rows[(cl, bf16)] = (per_slice_ms(trunk, a.slices, a.repeats), per_slice_ms(step, a.slices, a.repeats))
    print(f"torch {torch.__version__}, CPU capability {torch.backends.cpu.get_cpu_capability()}, "
          f"{torch.get_num_threads()} thread(s); cpu_bf16_fast() = {cpu_bf16_fast()}")
    print("| memory format | precision | frozen trunk ms/slice | full-depth step ms/slice |")
    print("|---|---|---|---|")
    for (cl, bf16), (t, s) in rows.items():
        print(f"| {'channels_last' if cl else 'contiguous'} | {'bf16 autocast' if bf16 else 'fp32'} | {t:.2f} | {s:.2f} |")
    for cl in (False, True):
        (t32, s32), (t16, s16) = rows[(cl, False)], rows[(cl, True)]
        print(f"{'channels_last' if cl else 'contiguous'}: bf16 / fp32 = {t16 / t32:.2f}x (trunk), {s16 / s32:.2f}x (step)")


if __name__ == "__main__":
    main()
