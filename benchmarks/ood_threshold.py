"""Issue 30: can the OOD flag's threshold be calibrated on more cases than the validation split?

    OMP_NUM_THREADS=1 python benchmarks/ood_threshold.py PLUGIN DATA.npz [--folds 5] [--out runs/ood_threshold.json]

With n validation cases the stored threshold (the split-conformal 99 % quantile: the largest score when
n < 99) lets an exchangeable case be flagged with a probability that is itself random, Beta(1, n): on
Adrenal's 98 validation cases it exceeds 2 % with probability 14 %. The training cases are 12x as many,
but their scores against a reference fitted on them are not those of new cases. Cross-fitting makes them
new: the training embeddings are split into K folds, each fold is scored against the reference
(:func:`anymc3d.evaluation.ood.fit_knn_reference`, the stored method and size) fitted on the other folds
(:func:`anymc3d.evaluation.ood.cross_fitted_scores`, which training now uses for the threshold).

Checked on validation only: (1) are the out-of-fold training scores distributed like the validation
scores (two-sample Kolmogorov-Smirnov, quantiles side by side)? (2) the threshold from the out-of-fold
scores alone, and the validation cases' flag rate at it (validation held out from that threshold);
(3) the flag rate of the three shifted validation sets (inverted, 4x field of view, synthetic volumes)
at it. The test split's flag rate at each threshold is printed beside, reported only.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
from scipy.stats import ks_2samp

sys.path.insert(0, str(Path(__file__).resolve().parent))
from trust import shifted, synthetic_cases  # noqa: E402  (benchmarks/trust.py: the same shifts)

from anymc3d.data import load_data  # noqa: E402
from anymc3d.evaluation import ood  # noqa: E402
from anymc3d.predict import load  # noqa: E402


def task_query(pred, cases) -> dict[str, np.ndarray]:
    """The unflipped pass's pooled task-query embedding per stream (what a prediction is scored by)."""
    return ood.predict_with_embeddings(pred.runtime, cases, 8, flips=False)[2].take("task_query")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("plugin")
    ap.add_argument("data")
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--n-synthetic", type=int, default=40, help="volumes per synthetic task")
    ap.add_argument("--out", type=Path, default=Path("ood_threshold.json"))
    a = ap.parse_args()
    t0 = time.time()
    pred = load(a.plugin, device="cpu")
    trust = pred.trust
    m = trust.ood
    task = load_data(a.data)
    split = {s: [c for c in task.cases if c.split == s] for s in ("train", "val", "test")}
    shape = split["test"][0].images["image"].array.shape

    emb_tr = {s: x for s, x in task_query(pred, split["train"]).items() if s in trust.refs}
    # the reference training stores (fit_trust): every training case, the stored method and size
    refs = {s: ood.fit_knn_reference(x, m["points"], m["neighbours"], 0) for s, x in emb_tr.items()}

    def scored(cases):
        return ood.combined_score(refs, {s: x for s, x in task_query(pred, cases).items() if s in refs})

    score = {k: scored(split[k]) for k in ("val", "test")}
    for kind in ("inverted", "fov4x"):
        score[f"val_{kind}"] = scored(shifted(split["val"], kind))
    score["val_synthetic"] = scored(synthetic_cases(shape, a.n_synthetic)[::2])
    oof = ood.cross_fitted_scores(emb_tr, m["points"], m["neighbours"], a.folds, seed=0)  # what training stores

    q = [50, 90, 95, 99, 100]
    ks = ks_2samp(oof, score["val"])
    thresholds = {
        "validation only (the stored rule)": ood.ood_threshold(score["val"], m["percentile"]),
        "out-of-fold training only": ood.ood_threshold(oof, m["percentile"]),
        "out-of-fold training + validation": ood.ood_threshold(np.r_[oof, score["val"]], m["percentile"]),
    }
    res = {
        "plugin": a.plugin, "data": Path(a.data).name, "method": m, "folds": a.folds,
        "n": {"train_oof": int(len(oof)), "val": int(len(score["val"])), "test": int(len(score["test"]))},
        "quantiles": {"percent": q, "train_oof": np.percentile(oof, q).tolist(),
                      "val": np.percentile(score["val"], q).tolist(), "test (reported only)": np.percentile(score["test"], q).tolist()},
        "ks_train_oof_vs_val": {"statistic": float(ks.statistic), "pvalue": float(ks.pvalue)},
        "thresholds": {},
    }
    for name, thr in thresholds.items():
        res["thresholds"][name] = {
            "threshold": thr,
            "flag_rate_val": float(np.mean(score["val"] > thr)),
            **{f"flag_rate_val_{k}": float(np.mean(score[f"val_{k}"] > thr)) for k in ("inverted", "fov4x", "synthetic")},
            "flag_rate_test (reported only)": float(np.mean(score["test"] > thr)),
        }
    res["wall_s"] = round(time.time() - t0, 1)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(res, indent=1))
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
