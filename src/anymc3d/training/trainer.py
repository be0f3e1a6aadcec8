"""Plugin training: AdamW in two groups, warmup + cosine, validation every epoch,
best-by-validation-AUROC, early stopping, resumable checkpoints, per-epoch CSV log.

Determinism: shuffling and augmentation are re-seeded from (seed, epoch) at the start of every
epoch, so a resumed run follows the same path as an uninterrupted one.
"""
from __future__ import annotations

import csv
import json
import math
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from .. import __version__
from ..evaluation import compute_metrics
from ..inputs import PreparedCase, collate, slice_streams
from ..io import atomic_write
from ..model import AnyMC3D
from ..preprocess import PreprocessSpec
from .augment import build_augmentation
from .losses import classification_loss


@dataclass
class TrainConfig:
    epochs: int = 30
    batch_size: int = 8
    lr_lora: float = 1e-4
    wd_lora: float = 1e-5
    lr_head: float = 1e-3
    wd_head: float = 1e-4
    warmup_epochs: float = 1.0
    loss: str = "focal"            # focal | bce | ce
    focal_gamma: float = 2.0
    focal_alpha: float = 0.25
    class_weighting: str = "none"  # none | balanced
    augment: bool = True
    amp: bool = True               # bf16 autocast on CPU, bf16 autocast on GPU
    patience: int = 10
    seed: int = 0
    grad_clip: float = 1.0
    progress: bool = True


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def class_weights(labels: np.ndarray, task_type: str, mode: str) -> torch.Tensor | None:
    if mode == "none":
        return None
    if task_type == "multiclass":
        counts = np.bincount(labels.astype(int).ravel(), minlength=int(labels.max()) + 1).astype(float)
        return torch.tensor(counts.sum() / (len(counts) * np.maximum(counts, 1)), dtype=torch.float32)
    pos = labels.reshape(len(labels), -1).mean(axis=0)
    return torch.tensor((1 - pos) / np.maximum(pos, 1e-6), dtype=torch.float32)


def _lr_lambda(total: int, warmup: int):
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / max(1, warmup)
        t = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, t)))
    return f


class Batcher:
    """Turns prepared cases into (slices, masks, present, labels) batches, with optional augmentation."""

    def __init__(self, model: AnyMC3D, specs: dict[str, PreprocessSpec]) -> None:
        self.model, self.specs, self.streams = model, specs, model.streams
        self._aug: dict[tuple, object] = {}

    def _augment(self, case: PreparedCase, seed: int) -> dict[str, torch.Tensor]:
        keys = sorted(case.arrays)
        shapes = {tuple(case.arrays[k].shape[1:]) for k in keys}
        with_mask = case.mask is not None and len(shapes) == 1
        if len(shapes) == 1:
            aug = build_augmentation(keys, next(iter(shapes)), with_mask, seed)
            d = {k: case.arrays[k] for k in keys}
            if with_mask:
                d["mask"] = case.mask
            out = aug(d)
            return {k: torch.as_tensor(out[k]).float() for k in keys}
        out = {}
        for i, k in enumerate(keys):  # inputs on different grids: augment each on its own
            aug = build_augmentation([k], tuple(case.arrays[k].shape[1:]), False, seed + i)
            out[k] = torch.as_tensor(aug({k: case.arrays[k]})[k]).float()
        return out

    def batch(self, cases: list[PreparedCase], augment_seed: int | None = None):
        per_case = []
        for i, c in enumerate(cases):
            arrays = self._augment(c, augment_seed + i) if augment_seed is not None else None
            per_case.append(slice_streams(c, self.specs, self.streams, arrays))
        slices, masks, present = collate(per_case, self.streams)
        labels = torch.stack([c.label for c in cases]) if cases[0].label is not None else None
        return slices, masks, present, labels


@torch.no_grad()
def predict_prepared(model: AnyMC3D, batcher: Batcher, cases: list[PreparedCase], batch_size: int,
                     progress: bool = False) -> tuple[np.ndarray, list]:
    """Probabilities (N, n_outputs) and per-case ModelOutputs (slice/view weights) without augmentation."""
    model.eval()
    probs, outs = [], []
    it = range(0, len(cases), batch_size)
    for i in tqdm(it, desc="predict", disable=not progress, leave=False):
        chunk = cases[i:i + batch_size]
        slices, masks, present, _ = batcher.batch(chunk)
        out = model(slices, masks, present)
        probs.append(model.probabilities(out.logits).float().numpy())
        for j in range(len(chunk)):
            outs.append({"slice_weights": {s: w[j][masks[s][j]].tolist() for s, w in out.slice_weights.items() if s in masks},
                         "view_weights": {s: float(out.view_weights[j, k]) for k, s in enumerate(model.streams)},
                         "present": {s: bool(present[j, k]) for k, s in enumerate(model.streams)}})
    return np.concatenate(probs), outs


def metric_scores(probs: np.ndarray, task_type: str) -> np.ndarray:
    return probs[:, 0] if task_type == "binary" else probs


def fit(model: AnyMC3D, specs: dict[str, PreprocessSpec], train: list[PreparedCase], val: list[PreparedCase],
        cfg: TrainConfig, out_dir: Path, resume: bool = False) -> dict:
    """Train ``model``'s plugin parameters; returns a summary. The best state is left loaded in ``model``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    seed_everything(cfg.seed)
    task_type = model.spec.task_type
    model.set_trainable(True)
    lora = list(model.lora_parameters().values())
    head = list(model.head_parameters().values())
    groups = [{"params": head, "lr": cfg.lr_head, "weight_decay": cfg.wd_head}]
    if lora:
        groups.insert(0, {"params": lora, "lr": cfg.lr_lora, "weight_decay": cfg.wd_lora})
    opt = torch.optim.AdamW(groups)
    steps_per_epoch = max(1, math.ceil(len(train) / cfg.batch_size))
    total = steps_per_epoch * cfg.epochs
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(total, int(cfg.warmup_epochs * steps_per_epoch)))
    labels_np = np.stack([c.label.numpy() for c in train])
    cw = class_weights(labels_np, task_type, cfg.class_weighting)
    batcher = Batcher(model, specs)
    model.autocast = cfg.amp

    ckpt_path, log_path = out_dir / "checkpoint.pt", out_dir / "train_log.csv"
    start_epoch, best, best_state, bad, history = 0, -math.inf, None, 0, []
    if resume and ckpt_path.is_file():
        ck = torch.load(ckpt_path, map_location="cpu", weights_only=True)
        model.load_trainable_state(ck["trainable"])
        opt.load_state_dict(ck["optimizer"])
        sched.load_state_dict(ck["scheduler"])
        start_epoch, best, best_state, bad = ck["epoch"] + 1, ck["best"], ck["best_state"], ck["bad_epochs"]
        history = json.loads(ck["history"])
    t0 = time.time() - (history[-1]["elapsed_s"] if history else 0.0)
    for epoch in range(start_epoch, cfg.epochs):
        seed_everything(cfg.seed * 1000 + epoch)  # dropout RNG per (seed, epoch): a resumed run matches
        model.train()
        g = torch.Generator().manual_seed(cfg.seed * 1000 + epoch)
        order = torch.randperm(len(train), generator=g).tolist()
        losses = []
        bar = tqdm(range(steps_per_epoch), desc=f"epoch {epoch + 1}/{cfg.epochs}", disable=not cfg.progress, leave=False)
        for step in bar:
            idx = order[step * cfg.batch_size:(step + 1) * cfg.batch_size]
            if not idx:
                continue
            aug_seed = (cfg.seed * 1_000_003 + epoch * 10_007 + step * 101) % (2**31) if cfg.augment else None
            slices, masks, present, y = batcher.batch([train[i] for i in idx], aug_seed)
            out = model(slices, masks, present)
            loss = classification_loss(out.logits.float(), y, task_type, cfg.loss, cfg.focal_gamma, cfg.focal_alpha, cw)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip:
                torch.nn.utils.clip_grad_norm_(lora + head, cfg.grad_clip)
            opt.step()
            sched.step()
            losses.append(loss.item())
            bar.set_postfix(loss=f"{np.mean(losses):.4f}")
        row = {"epoch": epoch + 1, "train_loss": float(np.mean(losses)) if losses else float("nan")}
        if val:
            probs, _ = predict_prepared(model, batcher, val, cfg.batch_size)
            yv = np.stack([c.label.numpy() for c in val])
            yv = yv[:, 0] if task_type != "multilabel" else yv
            m = compute_metrics(yv, metric_scores(probs, task_type), task_type, model.spec.label_names, n_bootstrap=0)
            row.update(val_auc=m["auc"], val_acc=m["acc"])
            score = m["auc"] if m["auc"] is not None else m["acc"]
        else:
            score = -row["train_loss"]
        row["lr_head"] = opt.param_groups[-1]["lr"]
        row["elapsed_s"] = round(time.time() - t0, 2)
        improved = score > best
        if improved:
            best, bad = score, 0
            best_state = {k: v.clone() for k, v in model.trainable_state().items()}
        else:
            bad += 1
        row["best"] = improved
        history.append(row)
        if cfg.progress:
            tqdm.write(" ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()))
        with atomic_write(log_path) as tmp:
            with open(tmp, "w", newline="") as fh:
                w = csv.DictWriter(fh, fieldnames=list(dict.fromkeys(k for r in history for k in r)))
                w.writeheader()
                w.writerows(history)
        ck = {"epoch": epoch, "trainable": model.trainable_state(), "optimizer": opt.state_dict(),
              "scheduler": sched.state_dict(), "best": best, "best_state": best_state, "bad_epochs": bad,
              "history": json.dumps(history), "config": json.dumps(asdict(cfg))}
        with atomic_write(ckpt_path) as tmp:
            torch.save(ck, tmp)
        if val and bad >= cfg.patience:
            break
    if best_state is not None:
        model.load_trainable_state(best_state)
    model.eval()
    best_row = max((r for r in history), key=lambda r: r.get("val_auc") or -1) if val else history[-1]
    return {"epochs_run": len(history), "best_epoch": best_row["epoch"], "best_val_auc": best_row.get("val_auc"),
            "best_val_acc": best_row.get("val_acc"), "train_wall_s": history[-1]["elapsed_s"] if history else 0.0,
            "history": history, "config": asdict(cfg), "version": __version__}
