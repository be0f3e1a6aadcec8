"""Per-case scores of the frozen three-view linear probe (`anymc3d bench`'s `linear_probe_3view`), written as
`anymc3d evaluate`'s predictions.csv (id, label, raw_p_<class>), one file per split, so that
`benchmarks/average_candidates.py` can average a probe of one backbone with a plugin of another:

    python benchmarks/probe_predictions.py ../shared/data/medmnist3d/adrenalmnist3d.npz --backbone litemedsam_tinyvit \
        --size 32 --cache runs/tv_probe_ov/cache --out runs/tv_probe_pred

The frozen features come from (and go into) the activation cache at --cache, the one a `bench --out DIR` run keeps in
DIR/cache; C is chosen on validation AUROC, exactly as in the bench. Binary tasks only."""
from __future__ import annotations

import argparse
import csv
from pathlib import Path

from sklearn.metrics import roc_auc_score

from anymc3d.backbones import create_backbone
from anymc3d.baselines.frozen import FeatureCache, mean_pooled
from anymc3d.baselines.linear_probe import fit_logistic_probe
from anymc3d.bench.methods import THREE
from anymc3d.data import load_data
from anymc3d.io.writers import atomic_write


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("data")
    ap.add_argument("--backbone", default="litemedsam_tinyvit")
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--cache", required=True, help="the activation cache folder (a bench run's OUT/cache)")
    ap.add_argument("--engine", default=None, help="inference engine for missing entries (default: --engine of anymc3d)")
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    task = load_data(a.data)
    if task.task_type != "binary":
        raise SystemExit("anymc3d: error: probe_predictions.py: binary tasks only")
    bb = create_backbone(a.backbone, input_size=a.size)
    cache = FeatureCache(task, bb, list(THREE), a.size, a.cache, engine=a.engine)
    feats = {k: mean_pooled(cache, k) for k in cache.data}
    y = {k: cache.labels(k) for k in cache.data}
    score, c, val_auc = fit_logistic_probe(feats, y, task.task_type, task.label_names)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    col = f"raw_p_{task.label_names[-1]}"
    for split in ("val", "test"):
        if split not in cache.data:
            continue
        s, lab = score(split), y[split].reshape(-1)
        path = out / f"{split}.csv"
        with atomic_write(path) as tmp, open(tmp, "w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["id", "label", col])
            w.writerows([c_.id, int(l), f"{p:.6f}"] for c_, l, p in zip(cache.splits[split], lab, s))
        print(f"{split}: AUC {roc_auc_score(lab, s):.4f} ({len(lab)} cases) -> {path}")
    print(f"C = {c} (validation AUROC {val_auc:.4f})")


if __name__ == "__main__":
    main()
