"""Issue 30: conformal coverage of a multi-class plugin on fresh volumes of its synthetic generator.

    OMP_NUM_THREADS=1 python benchmarks/conformal_synthetic.py PLUGIN --task lesion_location --size 32 \
        [--n-test 600] [--n-calibration 300] [--seed 101] [--splits 500] [--out runs/conformal_synthetic.json]

PLUGIN: a plugin trained on a synthetic-suite task (e.g. ``benchmarks/levers.py --tasks lesion_location``).
Its prediction sets use the conformal scores it stores (its validation split). The test cases are
``--n-test`` new volumes of the same generator (``anymc3d.synthetic.make_task`` with another seed), so
the empirical coverage is measured on many more cases than the task's own test split holds.

A second figure separates the method from the luck of one small calibration split: ``--n-calibration``
more volumes of the same draw are pooled with the test ones, and ``--splits`` random
calibration / test partitions of that pool are scored; their mean coverage is what split conformal
promises (>= nominal), their spread what one calibration split of that size gives.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from anymc3d.data.cases import Case
from anymc3d.evaluation import calibration as cal
from anymc3d.evaluation import conformal
from anymc3d.predict import load
from anymc3d.synthetic import make_task
from anymc3d.volume import Volume

LEVELS = (0.8, 0.9, 0.95)


def fresh(task: str, n: int, seed: int, size: int, label_names: list[str]):
    ds = make_task(task, n, seed=seed, size=size)
    index = [label_names.index(ds.label_names[int(k)]) for k in ds.labels]  # the plugin's class order
    cases = [Case(id=f"{task}_{seed}_{i}", images={"image": Volume(np.asarray(a, np.float32), ds.affine,
                                                                     {"path": f"synthetic:{task}:{seed}:{i}"})})
             for i, a in enumerate(ds.images["image"])]
    return cases, np.asarray(index)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("plugin")
    ap.add_argument("--task", default="lesion_location")
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--n-test", type=int, default=600)
    ap.add_argument("--n-calibration", type=int, default=300)
    ap.add_argument("--seed", type=int, default=101)
    ap.add_argument("--splits", type=int, default=500)
    ap.add_argument("--out", type=Path, default=Path("conformal_synthetic.json"))
    a = ap.parse_args()
    t0 = time.time()
    pred = load(a.plugin, device="cpu")
    spec, trust = pred.spec, pred.trust
    if spec.task_type != "multiclass" or trust is None or not trust.has_conformal:
        raise SystemExit(f"{a.plugin}: needs a multi-class plugin with stored conformal scores")
    names = list(spec.label_names)

    def class_probs(cases):
        probs, _ = pred.runtime.predict(cases, 8)
        return cal.class_probabilities(spec.task_type, trust.calibrate(probs))

    pool, y_pool = fresh(a.task, a.n_test + a.n_calibration, a.seed, a.size, names)
    cp_pool = class_probs(pool)
    cp_test, y_test = cp_pool[:a.n_test], y_pool[:a.n_test]
    pool_scores = conformal.nonconformity(cp_pool, y_pool)
    rng = np.random.default_rng(0)
    resampled = []
    for c in LEVELS:
        cov, size = [], []
        for _ in range(a.splits):
            perm = rng.permutation(len(pool))
            ic, it = perm[:a.n_calibration], perm[a.n_calibration:]
            r = conformal.coverage_and_size(cp_pool[it], y_pool[it], pool_scores[ic], c)
            cov.append(r["empirical_coverage"])
            size.append(r["mean_set_size"])
        resampled.append({"coverage": c, "mean_empirical_coverage": float(np.mean(cov)),
                          "sd_empirical_coverage": float(np.std(cov)), "mean_set_size": float(np.mean(size)),
                          "n_calibration": a.n_calibration, "n_test": a.n_test, "splits": a.splits})
    res = {"plugin": a.plugin, "task": a.task, "size": a.size, "n_test": a.n_test,
           "test_accuracy": float(np.mean(cp_test.argmax(axis=1) == y_test)),
           "stored_calibration": [conformal.coverage_and_size(cp_test, y_test, trust.conformal_scores(), c)
                                  for c in LEVELS],
           "resampled_calibration": resampled, "wall_s": round(time.time() - t0, 1)}
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(res, indent=2))
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
