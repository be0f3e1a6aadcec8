"""torchrun with N processes x 1 thread against 1 process x N threads, side by side (issue 16).

    python benchmarks/scale_speed.py --data ../shared/data/medmnist3d/adrenalmnist3d.npz --out runs/scale_speed

Measures, interleaved (round r runs A then B when r is even, B then A when odd, so a change of
machine load hits both arms alike):

1. **one training epoch**: ``anymc3d train DATA --epochs 1`` (shared trunk ``--lora-last-k 1``,
   ``--no-augment``, ``--train-fraction 0.25`` of the training split, no cache: every slice runs the
   backbone) - the command's wall time and the
   epoch's own time (``train_log.csv`` ``elapsed_s``: the epoch's training steps + validation);
2. **predicting 300 volumes**: ``anymc3d predict PLUGIN VOLS --out DIR --overwrite`` over 300 volumes
   (the data's val + test volumes, written once as ``.npy``) - wall time of the command;
3. **test AUC, DDP vs one process**, seeds 0-2: ``--lora-last-k 1 --no-augment --cache DIR`` (one
   shared cache: the trunk is computed once and read by every later run), ``--epochs E``; the
   one-process arm runs with ``--auc-single-threads`` threads (default 1: the metric does not depend
   on it, and it is the quicker one on a loaded 2-core machine).

Arm A = ``torchrun --standalone --nproc_per_node N -m anymc3d ...`` with ``OMP_NUM_THREADS=1``;
arm B = ``python -m anymc3d ...`` with ``OMP_NUM_THREADS=N``. Wall times include the interpreter
start (each rank imports torch/timm/peft: ~10 s) as a user sees it. Writes ``OUT/scale_speed.json``
after every round / seed (a rerun of the same command continues from there) and prints a markdown
summary with the load average around every measurement.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

SRC = Path(__file__).resolve().parents[1] / "src"


def env_for(threads: int) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), TQDM_DISABLE="1")
    env["PYTHONPATH"] = os.pathsep.join([str(SRC), *filter(None, [os.environ.get("PYTHONPATH")])])
    return env


def command(arm: str, nproc: int, args: list[str]) -> tuple[list[str], dict]:
    if arm == "ddp":
        return ([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
                 "-m", "anymc3d", *args], env_for(1))
    return [sys.executable, "-m", "anymc3d", *args], env_for(nproc)


def run(arm: str, nproc: int, args: list[str], log: Path) -> dict:
    cmd, env = command(arm, nproc, args)
    load0 = os.getloadavg()[0]
    t0 = time.perf_counter()
    with log.open("w") as fh:
        r = subprocess.run(cmd, env=env, stdout=fh, stderr=subprocess.STDOUT)
    wall = time.perf_counter() - t0
    if r.returncode != 0:
        raise SystemExit(f"failed ({r.returncode}): {' '.join(cmd)}; see {log}")
    return {"arm": arm, "omp_threads": int(env["OMP_NUM_THREADS"]), "wall_s": round(wall, 2),
            "load1_before": round(load0, 2),
            "load1_after": round(os.getloadavg()[0], 2), "cmd": " ".join(cmd[1:])}


def export_volumes(npz: Path, folder: Path, n: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    d = np.load(npz)
    vols = np.concatenate([d["val_images"], d["test_images"]])[:n]
    for i, v in enumerate(vols):
        p = folder / f"v{i:04d}.npy"
        if not p.exists():
            np.save(p, v.astype(np.float32))
    return folder


def epoch_seconds(out: Path) -> float:
    with (out / "train_log.csv").open(newline="") as fh:
        return float(next(csv.DictReader(fh))["elapsed_s"])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", required=True, type=Path)
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--auc-single-threads", type=int, default=1,
                    help="threads of the one-process arm of the AUC runs (AUC does not depend on it; default 1)")
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--volumes", type=int, default=300)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--auc-epochs", type=int, default=10)
    ap.add_argument("--auc-lr-head", default="1e-2")
    ap.add_argument("--auc-lr-lora", default="1e-3")
    ap.add_argument("--train-fraction", type=float, default=0.25,
                    help="stratified share of the training split used by every training run (cheap setting)")
    ap.add_argument("--skip-auc", action="store_true")
    a = ap.parse_args()
    out = a.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    logs = out / "logs"
    logs.mkdir(exist_ok=True)
    common = ["--size", str(a.size), "--lora-last-k", "1", "--no-augment", "--train-fraction", str(a.train_fraction),
              "--quiet", "--device", "cpu"]
    res = {"machine": f"{platform.node()}: {os.cpu_count()} CPU cores, {platform.processor() or platform.machine()}, "
                      f"Python {platform.python_version()}", "nproc": a.nproc, "args": vars(a) | {"data": str(a.data),
                                                                                                   "out": str(out)},
           "train_epoch": [], "predict": [], "auc": []}
    import torch

    res["torch"] = torch.__version__
    done = out / "scale_speed.json"
    if done.is_file():  # a rerun continues: finished rounds and seeds are kept
        old = json.loads(done.read_text())
        res.update({k: old[k] for k in ("train_epoch", "predict", "auc") if k in old})
    rounds_done = {m["round"] for m in res["predict"]}
    seeds_done = {(m["seed"], m["arm"]) for m in res["auc"]}
    vols = export_volumes(a.data, out / "volumes", a.volumes)
    plugin = out / "predict_plugin"
    if not (plugin / "plugin.json").is_file():  # the plugin both arms predict with (not timed)
        run("single", a.nproc, ["train", str(a.data), "--out", str(plugin), "--epochs", "1", "--overwrite", *common],
            logs / "predict_plugin.log")

    for r in range(a.rounds):
        if r in rounds_done:
            continue
        order = ["ddp", "single"] if r % 2 == 0 else ["single", "ddp"]
        for arm in order:
            o = out / f"train_{arm}_r{r}"
            m = run(arm, a.nproc, ["train", str(a.data), "--out", str(o), "--epochs", "1", "--overwrite", *common],
                    logs / f"train_{arm}_r{r}.log")
            m.update(round=r, epoch_s=epoch_seconds(o),
                     test_auc=json.loads((o / "metrics.json").read_text())["auc"])
            res["train_epoch"].append(m)
            print(f"train epoch  {arm:6s} round {r}: wall {m['wall_s']:.1f} s, epoch {m['epoch_s']:.1f} s "
                  f"(load {m['load1_before']:.2f} -> {m['load1_after']:.2f})", flush=True)
        for arm in order:
            o = out / f"predict_{arm}"
            m = run(arm, a.nproc, ["predict", str(plugin), str(vols), "--out", str(o), "--overwrite", "--device", "cpu"],
                    logs / f"predict_{arm}_r{r}.log")
            n = len(list(o.glob("*.json")))
            assert n == a.volumes, (o, n)
            m.update(round=r, volumes=n)
            res["predict"].append(m)
            print(f"predict {n}  {arm:6s} round {r}: wall {m['wall_s']:.1f} s "
                  f"(load {m['load1_before']:.2f} -> {m['load1_after']:.2f})", flush=True)
        (out / "scale_speed.json").write_text(json.dumps(res, indent=2))

    if not a.skip_auc:
        cache = out / "auc_cache"
        for seed in [int(s) for s in a.seeds.split(",")]:
            order = ["ddp", "single"] if seed % 2 == 0 else ["single", "ddp"]
            for arm in order:
                if (seed, arm) in seeds_done:
                    continue
                o = out / f"auc_{arm}_s{seed}"
                m = run(arm, a.nproc if arm == "ddp" else a.auc_single_threads,
                        ["train", str(a.data), "--out", str(o), "--epochs", str(a.auc_epochs),
                         "--lr-head", a.auc_lr_head, "--lr-lora", a.auc_lr_lora,
                                       "--seed", str(seed), "--cache", str(cache), "--overwrite", *common],
                        logs / f"auc_{arm}_s{seed}.log")
                met = json.loads((o / "metrics.json").read_text())
                m.update(seed=seed, test_auc=met["auc"], test_acc=met["acc"], val_auc=met["val"]["auc"],
                         best_epoch=met["best_epoch"], epochs_run=met["epochs_run"])
                res["auc"].append(m)
                print(f"AUC seed {seed} {arm:6s}: test AUC {met['auc']:.4f} ACC {met['acc']:.4f} (val AUC "
                      f"{met['val']['auc']:.4f}, best epoch {met['best_epoch']}), wall {m['wall_s']:.1f} s", flush=True)
            (out / "scale_speed.json").write_text(json.dumps(res, indent=2))

    print(summary(res))
    (out / "summary.md").write_text(summary(res))
    return 0


def _mean(xs):
    return float(np.mean(xs)) if xs else float("nan")


def summary(res: dict) -> str:
    n = res["nproc"]
    lines = [f"machine: {res['machine']}; torch {res['torch']}", "",
             f"| measurement | torchrun {n} x 1 thread | 1 process x {n} threads | ratio (1 proc / torchrun) |",
             "|---|---|---|---|"]
    for key, label, field in (("train_epoch", "train, 1 epoch: command wall (s)", "wall_s"),
                              ("train_epoch", "train, 1 epoch: epoch itself (s)", "epoch_s"),
                              ("predict", f"predict {res['args']['volumes']} volumes: wall (s)", "wall_s")):
        d = [m[field] for m in res[key] if m["arm"] == "ddp"]
        s = [m[field] for m in res[key] if m["arm"] == "single"]
        if d and s:
            lines.append(f"| {label} | {', '.join(f'{x:.1f}' for x in d)} (mean {_mean(d):.1f}) | "
                         f"{', '.join(f'{x:.1f}' for x in s)} (mean {_mean(s):.1f}) | {_mean(s) / _mean(d):.2f} |")
    loads = [v for k in ("train_epoch", "predict", "auc") for m in res[k] for v in (m["load1_before"], m["load1_after"])]
    if loads:
        lines.append(f"\nload average (1 min) around the measurements: {min(loads):.2f} - {max(loads):.2f}")
    if res["auc"]:
        th = sorted({m.get("omp_threads") for m in res["auc"] if m["arm"] == "single"})
        lines += ["", f"| seed | DDP test AUC ({n} x 1 thread) | 1-process test AUC ({th} thread(s)) | DDP - 1 process |",
                  "|---|---|---|---|"]
        by = {(m["seed"], m["arm"]): m for m in res["auc"]}
        diffs = []
        for seed in sorted({m["seed"] for m in res["auc"]}):
            d, s = by.get((seed, "ddp")), by.get((seed, "single"))
            if d and s:
                diffs.append(d["test_auc"] - s["test_auc"])
                lines.append(f"| {seed} | {d['test_auc']:.4f} | {s['test_auc']:.4f} | {diffs[-1]:+.4f} |")
        da = [m["test_auc"] for m in res["auc"] if m["arm"] == "ddp"]
        sa = [m["test_auc"] for m in res["auc"] if m["arm"] == "single"]
        lines.append(f"| mean ± sd | {_mean(da):.4f} ± {np.std(da, ddof=1) if len(da) > 1 else 0:.4f} | "
                     f"{_mean(sa):.4f} ± {np.std(sa, ddof=1) if len(sa) > 1 else 0:.4f} | {_mean(diffs):+.4f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
