"""Frozen-backbone baselines on cached slice embeddings.

The frozen backbone's per-slice embeddings do not depend on the method or the seed (no
augmentation), so they are computed once per case, stream and preprocessing and kept in the
activation cache (:mod:`anymc3d.runtime.cache`). On top of them, in seconds:

* ``linear_probe_from_cache``: mean pooling per view, views concatenated, StandardScaler +
  logistic regression with C chosen on validation AUROC -- the same algorithm as
  :func:`anymc3d.baselines.linear_probe.run_linear_probe`, reading the cache.
* ``train_pool_head``: a pooling module (mean / max / task-query attention / transformer, from
  :mod:`anymc3d.baselines.aggregators`) per view, task-query view fusion, dropout + linear head,
  trained with the plugin's loss and optimiser settings (focal loss, AdamW lr 1e-3, wd 1e-4,
  cosine schedule, early stopping on validation AUROC). ``pooling="attention"`` is the paper's
  "frozen backbone + task query, no LoRA" configuration without augmentation.

Reported costs are honest about the cache: ``train_s`` = feature extraction of the train and
validation splits (as measured when the cache was built) + fitting; ``infer_s_per_volume`` =
the test split's feature time per volume + the head's time per volume.
"""
from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..data import TaskData
from ..evaluation import compute_metrics
from ..plugins.pooling import TaskQueryPool
from ..preprocess import PreprocessOptions
from ..runtime.cache import ActivationCache
from ..runtime.engine import frozen_embeddings
from ..runtime.engines import current_engine, using_engine
from ..training.losses import classification_loss
from ..evaluation.threshold import choose_threshold
from ..training.run import assign_splits, subsample
from .aggregators import make_pool
from .linear_probe import fit_logistic_probe

SPLITS = ("train", "val", "test")


def stack_rows(rows: list[list], dim: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-case lists of (S, D) stream embeddings (None = missing) -> emb (N, V, S_max, D) float16 + mask."""
    s_max = max((e.shape[0] for row in rows for e in row if e is not None), default=1)
    n_streams = len(rows[0]) if rows else 0
    emb = np.zeros((len(rows), n_streams, s_max, dim), dtype=np.float16)
    mask = np.zeros((len(rows), n_streams, s_max), dtype=bool)
    for i, row in enumerate(rows):
        for j, e in enumerate(row):
            if e is not None:
                emb[i, j, : len(e)] = e
                mask[i, j, : len(e)] = True
    return emb, mask


class FeatureCache:
    """Per-split frozen slice embeddings for one (task, backbone, preprocessing, views, split seed).

    The embeddings come from the one activation cache (:mod:`anymc3d.runtime.cache`, cut
    ``embed``) in ``cache_dir``: one content-keyed entry per case and stream, shared with
    pooling-only plugins trained with ``--cache`` on the same data and preprocessing. Missing
    entries are computed by the inference engine ``engine`` (None: the process's ``--engine``;
    :mod:`anymc3d.runtime.engines`)."""

    def __init__(self, task: TaskData, backbone, views: list[str], size: int | None, cache_dir: str | Path,
                 seed: int = 0, progress: bool = False, log=print, device: str = "auto",
                 engine: str | None = None) -> None:
        self.task, self.backbone, self.views = task, backbone, list(views)
        pre = PreprocessOptions(views=list(views), size=size)
        self.specs = {inp: pre.spec_for(task, backbone.input_size) for inp in task.inputs}
        self.splits = assign_splits(task, seed)
        self.cache = ActivationCache(cache_dir)
        self.data: dict[str, dict] = {}
        for split in SPLITS:
            cases = self.splits[split]
            if not cases:
                continue
            misses = self.cache.stats["misses"]
            with using_engine(engine):
                rows, secs = frozen_embeddings(backbone, cases, self.specs, self.views, device=device,
                                               cache=self.cache, progress=progress, desc=f"features {split}")
                self.engine = current_engine()
            if self.cache.stats["misses"] > misses:
                log(f"  extracted frozen features: {task.name} {split} ({len(cases)} volumes, views {','.join(views)}, "
                    f"{self.cache.stats['misses'] - misses} new cache entries, engine {self.engine})")
            emb, mask = stack_rows(rows, backbone.embed_dim)
            self.data[split] = {"emb": emb, "mask": mask, "secs": secs}

    def labels(self, split: str) -> np.ndarray:
        return self.task.labels(self.splits[split])

    def feature_secs(self, split: str) -> float:
        return self.data[split]["secs"] if split in self.data else 0.0

    def per_volume_secs(self, split: str = "test") -> float:
        n = len(self.splits.get(split) or [])
        return self.feature_secs(split) / n if n else float("nan")


def _finish(cache: FeatureCache, val_scores, test_scores, threshold: float, extra: dict) -> dict:
    task = cache.task
    res = dict(extra)
    if val_scores is not None:
        mv = compute_metrics(cache.labels("val"), val_scores, task.task_type, task.label_names, threshold=threshold,
                             n_bootstrap=0)
        res["val"] = {"auc": mv["auc"], "acc": mv["acc"]}
    if test_scores is not None:
        y = cache.labels("test")
        m = compute_metrics(y, test_scores, task.task_type, task.label_names, threshold=threshold)
        if threshold != 0.5:
            m["acc_at_0.5"] = compute_metrics(y, test_scores, task.task_type, task.label_names, n_bootstrap=0)["acc"]
        res["test"] = m
        res.update(auc=m["auc"], acc=m["acc"], n=m["n"], split="test")
        if "acc_at_0.5" in m:
            res["acc_at_0.5"] = m["acc_at_0.5"]
    res["threshold"] = threshold
    return res


def mean_pooled(cache: FeatureCache, split: str) -> np.ndarray:
    """A split's cached slice embeddings mean-pooled per view (present slices only), views concatenated:
    (N, V * D), the linear probe's features."""
    e, m = cache.data[split]["emb"].astype(np.float32), cache.data[split]["mask"]
    s = (e * m[..., None]).sum(2) / np.maximum(m.sum(2, keepdims=True), 1)
    return s.reshape(len(s), -1)


def linear_probe_from_cache(cache: FeatureCache, cs=(0.01, 0.03, 0.1, 0.3, 1.0, 3.0), train_fraction: float = 1.0,
                            seed: int = 0) -> dict:
    """Mean pooling per view, views concatenated, StandardScaler + logistic regression (C on val AUROC)."""
    task = cache.task
    t0 = time.time()
    f = {k: mean_pooled(cache, k) for k in cache.data}
    y = {k: cache.labels(k) for k in cache.data}
    keep = _subsample_idx(cache, train_fraction, seed)
    f["train"], y["train"] = f["train"][keep], y["train"][keep]
    score, best_c, _ = fit_logistic_probe(f, y, task.task_type, task.label_names, cs)
    fit_s = time.time() - t0
    t1 = time.time()
    test_scores = score("test") if "test" in f else None
    head_s = (time.time() - t1) / max(1, len(f.get("test", [])))
    n_out = 1 if task.task_type == "binary" else len(task.label_names)
    extra = {"method_detail": f"mean pooling + logistic regression (C={best_c} chosen on val AUROC)", "C": best_c,
             "trainable_params": int((f["train"].shape[1] + 1) * n_out), "n_train": int(len(keep)),
             "train_s": cache.feature_secs("train") + cache.feature_secs("val") + fit_s, "fit_s": fit_s,
             "infer_s_per_volume": cache.per_volume_secs("test") + head_s}
    return _finish(cache, score("val") if "val" in f else None, test_scores, 0.5, extra)


def _subsample_idx(cache: FeatureCache, fraction: float, seed: int) -> np.ndarray:
    cases = cache.splits["train"]
    if fraction >= 1.0:
        return np.arange(len(cases))
    keep = {id(c) for c in subsample(cases, fraction, cache.task.task_type, seed)}
    return np.array([i for i, c in enumerate(cases) if id(c) in keep])


class PoolHead(nn.Module):
    """Per-view pooling -> task-query view fusion -> dropout + linear (the plugin's head on frozen features)."""

    def __init__(self, n_views: int, dim: int, n_out: int, pooling: str, dropout: float = 0.2, pool_kw=None) -> None:
        super().__init__()
        self.pools = nn.ModuleList([make_pool(pooling, dim, **(pool_kw or {})) for _ in range(n_views)])
        out_dim = self.pools[0].out_dim
        self.fusion = TaskQueryPool(out_dim)
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(out_dim, n_out))

    def forward(self, emb: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """emb (B, V, S, D), mask (B, V, S) -> logits (B, n_out)."""
        pooled = [p(emb[:, j], mask[:, j])[0] for j, p in enumerate(self.pools)]
        views = torch.stack(pooled, dim=1)
        if len(pooled) == 1:
            return self.head(views[:, 0])
        fused, _ = self.fusion(views, mask.any(dim=2))
        return self.head(fused)


def _probs(logits: torch.Tensor, task_type: str) -> np.ndarray:
    p = torch.softmax(logits, -1) if task_type == "multiclass" else torch.sigmoid(logits)
    return p.float().numpy()


def train_pool_head(cache: FeatureCache, pooling: str = "attention", seed: int = 0, epochs: int = 100,
                    batch_size: int = 32, lr: float = 1e-3, weight_decay: float = 1e-4, patience: int = 20,
                    loss: str = "focal", dropout: float = 0.2, train_fraction: float = 1.0, pool_kw=None) -> dict:
    task = cache.task
    tt = task.task_type
    torch.manual_seed(seed)
    np.random.seed(seed)
    n_out = 1 if tt == "binary" else len(task.label_names)
    t0 = time.time()
    keep = _subsample_idx(cache, train_fraction, seed)
    tensors = {k: (torch.from_numpy(v["emb"].astype(np.float32)), torch.from_numpy(v["mask"])) for k, v in cache.data.items()}
    xtr, mtr = tensors["train"][0][keep], tensors["train"][1][keep]
    ytr_np = cache.labels("train")[keep]
    ytr = torch.from_numpy(ytr_np.reshape(len(ytr_np), -1) if tt != "multiclass" else ytr_np).long()
    model = PoolHead(xtr.shape[1], xtr.shape[-1], n_out, pooling, dropout, pool_kw)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    steps = max(1, math.ceil(len(xtr) / batch_size))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(1.0, s / (steps * epochs)))))

    def predict(split):
        model.eval()
        x, m = tensors[split]
        with torch.no_grad():
            p = _probs(torch.cat([model(x[i:i + 256], m[i:i + 256]) for i in range(0, len(x), 256)]), tt)
        return p[:, 0] if tt == "binary" else p

    best, best_state, bad, epochs_run = -math.inf, None, 0, 0
    g = torch.Generator().manual_seed(seed)
    for epoch in range(epochs):
        model.train()
        order = torch.randperm(len(xtr), generator=g)
        for i in range(steps):
            idx = order[i * batch_size:(i + 1) * batch_size]
            if len(idx) == 0:
                continue
            logits = model(xtr[idx], mtr[idx])
            l = classification_loss(logits, ytr[idx], tt, loss)
            opt.zero_grad()
            l.backward()
            opt.step()
            sched.step()
        epochs_run = epoch + 1
        if "val" not in tensors:
            continue
        m = compute_metrics(cache.labels("val"), predict("val"), tt, task.label_names, n_bootstrap=0)
        score = m["auc"] if m["auc"] is not None else m["acc"]
        if score > best:
            best, bad = score, 0
            best_state = {k: v.clone() for k, v in model.state_dict().items()}
        else:
            bad += 1
            if bad >= patience:
                break
    if best_state is not None:
        model.load_state_dict(best_state)
    fit_s = time.time() - t0
    val_scores = predict("val") if "val" in tensors else None
    threshold = choose_threshold(cache.labels("val") if val_scores is not None else None, val_scores, tt)
    t1 = time.time()
    test_scores = predict("test") if "test" in tensors else None
    head_s = (time.time() - t1) / max(1, len(cache.splits.get("test") or []))
    extra = {"method_detail": f"frozen features + {pooling} pooling + linear head (no LoRA, no augmentation)",
             "trainable_params": int(sum(p.numel() for p in model.parameters())), "n_train": int(len(keep)),
             "epochs_run": epochs_run, "train_s": cache.feature_secs("train") + cache.feature_secs("val") + fit_s,
             "fit_s": fit_s, "infer_s_per_volume": cache.per_volume_secs("test") + head_s}
    return _finish(cache, val_scores, test_scores, threshold, extra)
