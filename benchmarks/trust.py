"""Issue 30 figures: OOD AUROC per shift, false-flag rate, conformal coverage, ECE before/after Platt, cost.

    OMP_NUM_THREADS=1 python benchmarks/trust.py PLUGIN $ADRENAL [--out trust.json] [--n-ref 300]

PLUGIN: a plugin trained on the MedMNIST 3D file (with the stored trust fields). In-distribution: the
test split. Out-of-distribution, each reported separately: (a) the synthetic suite's volumes
(``anymc3d.synthetic``, every task, sized to the data), (b) the test volumes with intensities inverted,
(c) the test volumes resampled to a 4x larger field of view (shrunk 4x per axis into the same grid).

The OOD method is chosen on the *validation* split (the same three shifts applied to validation
volumes): the plugin's stored score against the candidates fitted here on the training embeddings
(``--n-ref`` cases, all by default): the Ledoit-Wolf Mahalanobis distance on the task-query and on the
mean slice embedding, the cosine k-NN distance to every training embedding, and the compact k-NN
references (k-means centroids, :func:`anymc3d.evaluation.ood.fit_knn_reference`) at several sizes. Cost: prediction time with and without the embedding capture + OOD score + set, and the
bytes the ``trust.`` tensors add to the plugin file.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
from scipy.ndimage import zoom
from sklearn.metrics import roc_auc_score

from anymc3d.data import load_data
from anymc3d.data.cases import Case
from anymc3d.evaluation import calibration as cal
from anymc3d.evaluation import conformal, ood
from anymc3d.plugins.file import load_tensors
from anymc3d.plugins.trust import annotate
from anymc3d.predict import load
from anymc3d.runtime.results import volume_result
from anymc3d.synthetic import make_task
from anymc3d.volume import Volume


def shifted(cases: list, kind: str, seed: int = 0) -> list:
    out = []
    for c in cases:
        v = c.images["image"]
        a = np.asarray(v.array, dtype=np.float32)
        if kind == "inverted":
            b = a.max() + a.min() - a
        elif kind == "fov4x":
            small = zoom(a, 0.25, order=1)
            b = np.zeros_like(a)
            o = [(s - t) // 2 for s, t in zip(a.shape, small.shape)]
            b[o[0]:o[0] + small.shape[0], o[1]:o[1] + small.shape[1], o[2]:o[2] + small.shape[2]] = small
        else:
            raise ValueError(kind)
        out.append(Case(id=f"{kind}_{c.id}", images={"image": Volume(b, v.affine, {"path": f"{kind}:{c.id}"})}))
    return out


def synthetic_cases(shape, n: int, seed: int = 0) -> list:
    """Volumes of every synthetic suite task, resized to the data's grid."""
    cases = []
    for task in ("lesion_binary", "lesion_location", "lesion_types", "elongated"):
        ds = make_task(task, n, seed=seed, size=shape[0])
        for i, a in enumerate(ds.images["image"]):
            a = np.asarray(a, np.float32)
            if a.shape != tuple(shape):
                a = zoom(a, [t / s for t, s in zip(shape, a.shape)], order=1)
            cases.append(Case(id=f"{task}_{i}", images={"image": Volume(a, np.eye(4), {"path": f"synthetic:{task}:{i}"})}))
    return cases


def embed(pred, cases):
    probs, outs, cap = ood.predict_with_embeddings(pred.runtime, cases, 8)
    return probs, {f: cap.take(f) for f in ood.FEATURES}


def aurocs(s_in, shifts: dict) -> dict:
    return {k: float(roc_auc_score(np.r_[np.zeros(len(s_in)), np.ones(len(v))], np.r_[s_in, v])) for k, v in shifts.items()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("plugin")
    ap.add_argument("data")
    ap.add_argument("--out", type=Path, default=Path("trust.json"))
    ap.add_argument("--n-ref", type=int, default=0, help="training cases for the candidate references (0: all)")
    ap.add_argument("--n-synthetic", type=int, default=40, help="volumes per synthetic task")
    a = ap.parse_args()
    t_start = time.time()
    pred = load(a.plugin, device="cpu")
    trust, spec = pred.trust, pred.spec
    task = load_data(a.data)
    split = {s: [c for c in task.cases if c.split == s] for s in ("train", "val", "test")}
    shape = split["test"][0].images["image"].array.shape
    res: dict = {"plugin": a.plugin, "data": a.data, "ood_method_stored": trust.ood}

    # ---- embeddings: train subset (comparison references), val / test and their shifts
    rng = np.random.default_rng(0)
    n_ref = a.n_ref or len(split["train"])
    ref_cases = [split["train"][i] for i in sorted(rng.choice(len(split["train"]), n_ref, replace=False))]
    _, e_ref = embed(pred, ref_cases)
    sets = {}
    for s in ("val", "test"):
        sets[s] = embed(pred, split[s])
        for kind in ("inverted", "fov4x"):
            sets[f"{s}_{kind}"] = embed(pred, shifted(split[s], kind))
    syn = synthetic_cases(shape, a.n_synthetic)
    half = len(syn) // 2
    sets["val_synthetic"] = embed(pred, syn[::2][:half])
    sets["test_synthetic"] = embed(pred, syn[1::2][:half])

    # ---- the candidate scores
    def fitted(fit, feature: str):
        refs = {st: fit(x) for st, x in e_ref[feature].items() if st in trust.refs}
        return lambda emb: ood.combined_score(refs, {st: emb[feature][st] for st in refs}), refs

    stored = f"stored ({trust.ood['method']}, task_query)"
    methods = {stored: (lambda emb: trust.ood_scores(emb["task_query"]), trust.refs)}
    methods["mahalanobis_lw/task_query"] = fitted(lambda x: ood.fit_reference(x, 32), "task_query")
    methods["mahalanobis_lw/slice_mean"] = fitted(lambda x: ood.fit_reference(x, 32), "slice_mean")
    methods["knn5_cosine/every training case"] = (lambda emb: np.mean(
        [ood.knn_scores(e_ref["task_query"][st], emb["task_query"][st]) for st in trust.refs], axis=0), None)
    for pts, nb in ((32, 1), (64, 1), (64, 5), (128, 1)):
        methods[f"knn_cosine/{pts} centroids, k={nb}"] = fitted(
            lambda x, pts=pts, nb=nb: ood.fit_knn_reference(x, pts, nb), "task_query")
    res["ood_reference_bytes"] = {m: (None if refs is None else int(sum(
        t.numel() * t.element_size() for t in ood.to_tensors(refs).values()))) for m, (_, refs) in methods.items()}
    shifts = ("synthetic", "inverted", "fov4x")
    res["ood_validation_auroc"] = {m: aurocs(f(sets["val"][1]), {k: f(sets[f"val_{k}"][1]) for k in shifts})
                                   for m, (f, _) in methods.items()}
    res["ood_test_auroc_all_methods"] = {m: aurocs(f(sets["test"][1]), {k: f(sets[f"test_{k}"][1]) for k in shifts})
                                         for m, (f, _) in methods.items()}
    res["false_flag_rate_test_all_methods"] = {m: float(np.mean(f(sets["test"][1]) > ood.ood_threshold(
        f(sets["val"][1]), ood.DEFAULT_PERCENTILE))) for m, (f, _) in methods.items()}
    s_test = trust.ood_scores(sets["test"][1]["task_query"])
    res["ood_test_auroc"] = res["ood_test_auroc_all_methods"][stored]
    thr = trust.ood["threshold"]
    res["false_flag_rate_test"] = float(np.mean(s_test > thr))
    res["flag_rate_shifted_test"] = {k: float(np.mean(trust.ood_scores(sets[f"test_{k}"][1]["task_query"]) > thr))
                                     for k in shifts}

    # ---- conformal coverage and ECE on test
    y = task.labels(split["test"])
    probs = sets["test"][0]
    cp = cal.class_probabilities(spec.task_type, trust.calibrate(probs))
    res["conformal_test"] = [conformal.coverage_and_size(cp, y, trust.conformal_scores(), c) for c in (0.8, 0.9, 0.95)]
    res["calibration_test"] = {"before": cal.calibration_summary(spec.task_type, y, probs, spec.label_names),
                               "after": cal.calibration_summary(spec.task_type, y, trust.calibrate(probs), spec.label_names)}

    # ---- cost: prediction with and without the trust part, on 32 test volumes (3 rounds, best)
    sample = split["test"][:32]

    def plain():
        p, o = pred.runtime.predict(sample, 4)
        return [volume_result(spec, c.id, pi, oi) for c, pi, oi in zip(sample, p, o)]

    def full():
        return pred.predict_many(sample, [c.id for c in sample])

    t_plain, t_full = [], []
    for _ in range(3):
        t0 = time.perf_counter(); plain(); t_plain.append(time.perf_counter() - t0)
        t0 = time.perf_counter(); full(); t_full.append(time.perf_counter() - t0)
    tensors = load_tensors(Path(a.plugin) / "plugin.safetensors")
    res["cost"] = {"predict_s_per_volume_plain": min(t_plain) / len(sample),
                   "predict_s_per_volume_with_trust": min(t_full) / len(sample),
                   "overhead_fraction": min(t_full) / min(t_plain) - 1,
                   "trust_tensor_bytes": int(sum(v.numel() * v.element_size() for k, v in tensors.items() if k.startswith("trust."))),
                   "plugin_file_bytes": (Path(a.plugin) / "plugin.safetensors").stat().st_size}
    _ = annotate  # the per-case annotation is what Predictor.predict_many adds (timed above)
    res["wall_s"] = round(time.time() - t_start, 1)
    a.out.write_text(json.dumps(res, indent=2, default=float))
    print(json.dumps(res, indent=2, default=float))


if __name__ == "__main__":
    main()
