"""Which decision-threshold policy holds up on small validation sets? Measured on validation only.

Input: ``predictions.csv`` files of validation splits (``anymc3d evaluate PLUGIN DATA --split val
--out DIR`` writes one: id, label, p_<positive>). For each file, the validation cases are split in
two halves at random (stratified) many times: each policy picks its threshold on one half and is
scored (accuracy) on the other. No test split is read.

    python benchmarks/threshold_policy.py runs/eval_val/predictions.csv [...] [--repeats 500]
"""
from __future__ import annotations

import argparse
import csv
from pathlib import Path

import numpy as np

from anymc3d.evaluation.threshold import choose_threshold

POLICIES = ("platt", "youden", 0.5)


def read(path: Path) -> tuple[np.ndarray, np.ndarray]:
    with path.open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    pcol = [k for k in rows[0] if k.startswith("p_")][-1]  # binary: the positive label's column
    y = np.array([int(float(r["label"])) if r["label"].lstrip("-").replace(".", "").isdigit() else
                  int(r["label"] == pcol[2:]) for r in rows])
    return y, np.array([float(r[pcol]) for r in rows])


def split_half(y: np.ndarray, p: np.ndarray, repeats: int, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    acc = {str(k): [] for k in POLICIES}
    idx_pos, idx_neg = np.flatnonzero(y == 1), np.flatnonzero(y == 0)
    for _ in range(repeats):
        a = np.concatenate([rng.permutation(idx_pos)[: len(idx_pos) // 2], rng.permutation(idx_neg)[: len(idx_neg) // 2]])
        b = np.setdiff1d(np.arange(len(y)), a)
        for pol in POLICIES:
            t = choose_threshold(y[a], p[a], "binary", pol)
            acc[str(pol)].append(float(np.mean((p[b] > t) == y[b])))
    return {k: (float(np.mean(v)), float(np.std(v))) for k, v in acc.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("predictions", nargs="+", type=Path)
    ap.add_argument("--repeats", type=int, default=500)
    a = ap.parse_args()
    print("| validation predictions | n (pos) | " + " | ".join(f"ACC on held-out half, {p}" for p in POLICIES) + " |")
    print("|---|---|" + "---|" * len(POLICIES))
    means = {str(k): [] for k in POLICIES}
    for path in a.predictions:
        y, p = read(path)
        r = split_half(y, p, a.repeats)
        for k, (m, _) in r.items():
            means[k].append(m)
        print(f"| {path} | {len(y)} ({int(y.sum())}) | " + " | ".join(f"{m:.3f} ± {s:.3f}" for m, s in r.values()) + " |")
    print("| **mean** | | " + " | ".join(f"**{np.mean(v):.3f}**" for v in means.values()) + " |")


if __name__ == "__main__":
    main()
