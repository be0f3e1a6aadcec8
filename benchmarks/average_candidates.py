"""AUC of the average of several plugins' raw probabilities, from their `anymc3d evaluate` predictions.csv
files (same split, same cases): would averaging a selection's candidates (nnU-Net's ensembles of
configurations) beat its best single candidate?

    python benchmarks/average_candidates.py runs/sel/ev/k1_all-val/predictions.csv runs/sel/ev/k1_all_flips-val/predictions.csv

Prints each file's AUC and the AUC of the mean raw probability (binary tasks: the positive label's column)."""
from __future__ import annotations

import argparse
import csv

import numpy as np
from sklearn.metrics import roc_auc_score


def read(path: str) -> tuple[list[str], np.ndarray, np.ndarray]:
    rows = list(csv.DictReader(open(path, newline="")))
    col = next(k for k in rows[0] if k.startswith("raw_p_"))
    return [r["id"] for r in rows], np.array([int(r["label"]) for r in rows]), np.array([float(r[col]) for r in rows])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("predictions", nargs="+", help="predictions.csv of `anymc3d evaluate`, one per plugin")
    a = ap.parse_args()
    runs = [read(p) for p in a.predictions]
    ids, y, _ = runs[0]
    if any(r[0] != ids for r in runs):
        raise SystemExit("the files do not hold the same cases in the same order")
    for p, (_, _, s) in zip(a.predictions, runs):
        print(f"{roc_auc_score(y, s):.4f}  {p}")
    print(f"{roc_auc_score(y, np.mean([r[2] for r in runs], axis=0)):.4f}  mean of the {len(runs)} raw probabilities")


if __name__ == "__main__":
    main()
