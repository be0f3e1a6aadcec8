"""Wall time per volume of predict-all for 1/5/10 tasks: full-depth LoRA vs shared trunk (k = 1, 2, 4).

    OMP_NUM_THREADS=1 python -m anymc3d.store.bench --backbone efficientnet_lite0 --size 112 --out bench.json
    OMP_NUM_THREADS=1 python -m anymc3d.store.bench --backbone dinov2_vits14 --weights random --size 112 --out b.json

Plugins are untrained (random LoRA, queries and head): the compute is the same as for trained ones.
Volumes: the first test volumes of AdrenalMNIST3D 28^3 (28 axial slices each) when the file is there,
else random 28^3 arrays. One thread; the median over volumes after one warm-up volume.
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from ..backbones import create_backbone
from ..plugins.model import AnyMC3D
from ..plugins import LoraSpec, PluginSpec, save_plugin
from ..preprocess import PreprocessSpec
from ..volume import Volume
from .multi import MultiPredictor

ADRENAL = Path("../shared/data/medmnist3d/adrenalmnist3d.npz")


def volumes(n: int) -> list[Volume]:
    if ADRENAL.is_file():
        arr = np.load(ADRENAL)["test_images"][:n]
    else:
        arr = (np.random.default_rng(0).random((n, 28, 28, 28)) * 255).astype(np.uint8)
    return [Volume(a.astype(np.float32), np.eye(4), {"path": f"vol{i}"}) for i, a in enumerate(arr)]


def make_plugins(backbone: str, weights: str | None, size: int, last_k: int | None, n: int, out: Path) -> list[Path]:
    bb = create_backbone(backbone, weights=weights, input_size=size)
    paths = []
    for i in range(n):
        spec = PluginSpec.for_task(None, {"image": PreprocessSpec(size=size, intensity="minmax", orientation=None)}, bb,
                                   task=f"t{i}", task_type="binary", label_names=["neg", "pos"], inputs=["image"],
                                   lora=LoraSpec(last_k=last_k))
        torch.manual_seed(i)
        m = AnyMC3D(bb, spec, adapter_prefix=f"b{i}_")
        with torch.no_grad():
            for p in {**m.lora_parameters(), **m.head_parameters()}.values():
                p.copy_(torch.randn_like(p) * 0.02)
        save_plugin(m, out / f"t{i}")
        paths.append(out / f"t{i}")
    return paths


def run(backbone: str, weights: str | None, size: int, tasks=(1, 5, 10), modes=(None, 1, 2, 4), n_vol: int = 3,
        log=print) -> list[dict]:
    vols = volumes(n_vol + 1)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for k in modes:
            paths = make_plugins(backbone, weights, size, k, max(tasks), Path(tmp) / f"k{k}")
            for n in tasks:
                mp = MultiPredictor.from_paths([(p.name, p) for p in paths[:n]], weights=weights)
                mp.predict(vols[0], "warmup")
                times, parts = [], []
                for v in vols[1:]:
                    t0 = time.perf_counter()
                    mp.predict(v, "v")
                    times.append(time.perf_counter() - t0)
                    parts.append(mp.last_timing)
                row = {"backbone": backbone, "size": size, "mode": "full-depth" if k is None else f"shared k={k}",
                       "tasks": n, "s_per_volume": round(statistics.median(times), 4),
                       "shared_s": round(statistics.median(p["shared"] for p in parts), 4),
                       "plugins_s": round(statistics.median(p["plugins"] for p in parts), 4),
                       "slices": int(vols[0].array.shape[-1]), "volumes": n_vol}
                rows.append(row)
                log(json.dumps(row))
    return rows


def table(rows: list[dict]) -> str:
    one = {(r["backbone"], r["mode"]): r["s_per_volume"] for r in rows if r["tasks"] == 1}
    full1 = {r["backbone"]: r["s_per_volume"] for r in rows if r["tasks"] == 1 and r["mode"] == "full-depth"}
    lines = ["| backbone (slice px) | plugin mode | 1 task s/vol | 5 tasks s/vol | 10 tasks s/vol | 10 tasks / 1 task (same mode) | 10 tasks / 1 full-depth task |",
             "|---|---|---|---|---|---|---|"]
    for (bb, mode) in dict.fromkeys((r["backbone"], r["mode"]) for r in rows):
        t = {r["tasks"]: r for r in rows if r["backbone"] == bb and r["mode"] == mode}
        size = next(iter(t.values()))["size"]
        ten = t.get(10, {}).get("s_per_volume")
        lines.append(f"| {bb} ({size}) | {mode} | " + " | ".join(f"{t[n]['s_per_volume']:.3f}" if n in t else "-" for n in (1, 5, 10))
                     + (f" | {ten / one[(bb, mode)]:.2f}× | {ten / full1[bb]:.2f}× |" if ten and bb in full1 else " | - | - |"))
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backbone", default="efficientnet_lite0")
    ap.add_argument("--weights")
    ap.add_argument("--size", type=int, default=112)
    ap.add_argument("--volumes", type=int, default=3)
    ap.add_argument("--modes", default="full,1,2,4")
    ap.add_argument("--out", type=Path)
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    modes = [None if m == "full" else int(m) for m in a.modes.split(",")]
    rows = run(a.backbone, a.weights, a.size, modes=modes, n_vol=a.volumes)
    print(table(rows))
    if a.out:
        a.out.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
