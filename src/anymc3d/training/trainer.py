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
from ..errors import InputError
from ..evaluation import compute_metrics
from ..inputs import PreparedCase, collate, slice_streams
from ..io import atomic_write
from ..model import AnyMC3D
from ..plugins.decoder import SegDecoder3D, dice_ce_loss
from ..preprocess import PreprocessSpec, to_slices
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
    cache_trunk: bool = True       # with lora.last_k: keep un-augmented trunk activations in memory
    cache_dir: str | None = None   # also keep them on disk (anymc3d.store.cache): later epochs/runs/tasks reuse them
    seg_weight: float = 0.5        # λ of the auxiliary mask loss (used when training cases have masks)
    seg_hidden: int = 32
    progress: bool = True


#: settings that do not change what training computes, so a run may resume with them changed
RESUME_FREE_FIELDS = ("progress", "cache_dir", "cache_trunk")


def config_changes(saved: dict, current: dict) -> list[str]:
    """``key: saved -> current`` for every result-changing setting that differs between two configs."""
    return [f"{k}: {saved.get(k)!r} -> {current.get(k)!r}" for k in sorted(set(saved) | set(current))
            if k not in RESUME_FREE_FIELDS and saved.get(k) != current.get(k)]


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
    """Turns prepared cases into (slices, masks, present, labels, from_trunk) batches.

    With ``cache_trunk`` (plugins with ``lora.last_k``), the un-augmented slices' shared-trunk
    activations are computed once per case and stream and kept in memory (bf16); augmented
    batches always go through the full backbone, so nothing stale is ever reused.
    """

    def __init__(self, model: AnyMC3D, specs: dict[str, PreprocessSpec], cache_trunk: bool = False,
                 cache_dir: str | Path | None = None) -> None:
        self.model, self.specs, self.streams = model, specs, model.streams
        # pooling-only plugins (r=0): the "trunk" is the whole frozen backbone; its class embeddings are cached
        self.cache_trunk = cache_trunk and (model.last_k is not None or model.spec.lora.r == 0)
        self._trunk_cache: dict[tuple[str, str], torch.Tensor] = {}
        self.disk = None
        if self.cache_trunk and cache_dir is not None:
            from ..store.cache import TrunkDiskCache
            self.disk = TrunkDiskCache(cache_dir, model, specs)

    def _trunk(self, case: PreparedCase) -> dict[str, torch.Tensor]:
        out = {}
        for s, x in slice_streams(case, self.specs, self.streams).items():
            key = (id(case), s)  # the PreparedCase object lives for the whole run
            if key not in self._trunk_cache:
                if self.disk is not None:
                    self._trunk_cache[key] = self.disk.activations(s, x)
                elif self.model.last_k is None:
                    from ..store.cache import frozen_activations
                    self._trunk_cache[key] = frozen_activations(self.model, s, x)
                else:
                    self._trunk_cache[key] = self.model.trunk(x).to(torch.bfloat16)
            out[s] = self._trunk_cache[key].float()
        return out

    def forward(self, slices, masks, present, from_trunk: bool = False, **kw):
        """``model(...)`` on a batch from ``batch``; cached class embeddings of a pooling-only plugin skip the backbone."""
        if from_trunk and self.model.last_k is None:
            return self.model.pool_and_classify(slices, masks, present)
        return self.model(slices, masks, present, from_trunk=from_trunk, **kw)

    def _augment(self, case: PreparedCase, seed: int) -> dict[str, torch.Tensor]:
        """Augmented copies of the case's inputs (and of its mask, under the key "mask")."""
        keys = sorted(case.arrays)
        shapes = {tuple(case.arrays[k].shape[1:]) for k in keys}
        if case.mask is not None:
            shapes.add(tuple(case.mask.shape[1:]))
        with_mask = case.mask is not None
        if len(shapes) == 1:
            aug = build_augmentation(keys, next(iter(shapes)), with_mask, seed)
            d = {k: case.arrays[k] for k in keys}
            if with_mask:
                d["mask"] = case.mask
            out = aug(d)
            return {k: torch.as_tensor(out[k]).float() for k in d}
        if with_mask:
            raise ValueError(f"case {case.id}: inputs on different grids cannot carry one mask")
        out = {}
        for i, k in enumerate(keys):  # inputs on different grids: augment each on its own
            aug = build_augmentation([k], tuple(case.arrays[k].shape[1:]), False, seed + i)
            out[k] = torch.as_tensor(aug({k: case.arrays[k]})[k]).float()
        return out

    def batch(self, cases: list[PreparedCase], augment_seed: int | None = None, with_masks: bool = False):
        """Returns slices, slice masks, stream presence, labels, from_trunk and (with_masks) the
        segmentation targets: stream -> (B, S, size, size) for the first input's streams, and a
        (B,) flag saying which cases have a mask."""
        from_trunk = self.cache_trunk and augment_seed is None and not with_masks
        per_case, seg = [], []
        for i, c in enumerate(cases):
            if from_trunk:
                per_case.append(self._trunk(c))
                continue
            arrays = self._augment(c, augment_seed + i) if augment_seed is not None else dict(c.arrays)
            mask = arrays.pop("mask", c.mask)
            per_case.append(slice_streams(c, self.specs, self.streams, arrays))
            if with_masks:
                seg.append(self._mask_slices(mask))
        slices, masks, present = collate(per_case, self.streams)
        labels = torch.stack([c.label for c in cases]) if cases[0].label is not None else None
        if not with_masks:
            return slices, masks, present, labels, from_trunk
        seg_streams = [s for s in self.streams if s.split(":")[0] == self.model.spec.inputs[0]]
        targets, _, _ = collate([{s: m[s] for s in seg_streams} if m else {} for m in seg], seg_streams)
        has_mask = torch.tensor([m is not None for m in seg])
        return slices, masks, present, labels, from_trunk, {s: t[:, :, 0] for s, t in targets.items()}, has_mask

    def _mask_slices(self, mask: torch.Tensor | None) -> dict[str, torch.Tensor] | None:
        if mask is None:
            return None
        inp = self.model.spec.inputs[0]
        return {s: (to_slices(mask, self.specs[inp], s.split(":")[1], mode="nearest") > 0.5).float()
                for s in self.streams if s.split(":")[0] == inp}


@torch.no_grad()
def predict_prepared(model: AnyMC3D, batcher: Batcher, cases: list[PreparedCase], batch_size: int,
                     progress: bool = False) -> tuple[np.ndarray, list]:
    """Probabilities (N, n_outputs) and per-case ModelOutputs (slice/view weights) without augmentation."""
    model.eval()
    probs, outs = [], []
    it = range(0, len(cases), batch_size)
    for i in tqdm(it, desc="predict", disable=not progress, leave=False):
        chunk = cases[i:i + batch_size]
        slices, masks, present, _, from_trunk = batcher.batch(chunk)
        out = batcher.forward(slices, masks, present, from_trunk=from_trunk)
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
    use_seg = cfg.seg_weight > 0 and any(c.mask is not None for c in train)
    decoder = SegDecoder3D(model.backbone.embed_dim, cfg.seg_hidden) if use_seg else None
    if decoder is not None:
        head = head + list(decoder.parameters())  # trained with the head's settings, never saved
    groups = [{"params": head, "lr": cfg.lr_head, "weight_decay": cfg.wd_head}]
    if lora:
        groups.insert(0, {"params": lora, "lr": cfg.lr_lora, "weight_decay": cfg.wd_lora})
    opt = torch.optim.AdamW(groups)
    steps_per_epoch = max(1, math.ceil(len(train) / cfg.batch_size))
    total = steps_per_epoch * cfg.epochs
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(total, int(cfg.warmup_epochs * steps_per_epoch)))
    labels_np = np.stack([c.label.numpy() for c in train])
    cw = class_weights(labels_np, task_type, cfg.class_weighting)
    batcher = Batcher(model, specs, cache_trunk=cfg.cache_trunk, cache_dir=cfg.cache_dir)
    model.autocast = cfg.amp

    ckpt_path, log_path = out_dir / "checkpoint.pt", out_dir / "train_log.csv"
    start_epoch, best, best_state, bad, history = 0, -math.inf, None, 0, []
    if resume and ckpt_path.is_file():
        ck = torch.load(ckpt_path, map_location="cpu", weights_only=True)
        changed = config_changes(json.loads(ck.get("config", "{}")), asdict(cfg))
        if changed:
            raise InputError(f"{ckpt_path}: written with other training settings ({'; '.join(changed)}); "
                             "resume with the same settings or train into a new folder")
        model.load_trainable_state(ck["trainable"])
        opt.load_state_dict(ck["optimizer"])
        sched.load_state_dict(ck["scheduler"])
        start_epoch, best, best_state, bad = ck["epoch"] + 1, ck["best"], ck["best_state"], ck["bad_epochs"]
        if decoder is not None and "decoder" in ck:
            decoder.load_state_dict(ck["decoder"])
        history = json.loads(ck["history"])
    t0 = time.time() - (history[-1]["elapsed_s"] if history else 0.0)
    for epoch in range(start_epoch, cfg.epochs):
        seed_everything(cfg.seed * 1000 + epoch)  # dropout RNG per (seed, epoch): a resumed run matches
        model.train()
        g = torch.Generator().manual_seed(cfg.seed * 1000 + epoch)
        order = torch.randperm(len(train), generator=g).tolist()
        losses, seg_losses = [], []
        if decoder is not None:
            decoder.train()
        bar = tqdm(range(steps_per_epoch), desc=f"epoch {epoch + 1}/{cfg.epochs}", disable=not cfg.progress, leave=False)
        for step in bar:
            idx = order[step * cfg.batch_size:(step + 1) * cfg.batch_size]
            if not idx:
                continue
            aug_seed = (cfg.seed * 1_000_003 + epoch * 10_007 + step * 101) % (2**31) if cfg.augment else None
            batch = batcher.batch([train[i] for i in idx], aug_seed, with_masks=decoder is not None)
            slices, masks, present, y, from_trunk = batch[:5]
            out = batcher.forward(slices, masks, present, keep_patches=decoder is not None, from_trunk=from_trunk)
            loss = classification_loss(out.logits.float(), y, task_type, cfg.loss, cfg.focal_gamma, cfg.focal_alpha, cw)
            if decoder is not None and bool(batch[6].any()):  # batches without any mask add no seg loss
                targets, has_mask = batch[5], batch[6]
                seg = [dice_ce_loss(decoder(out.patches[s], t.shape[-2:]), t, has_mask) for s, t in targets.items()]
                seg_losses.append(float(sum(seg).detach()) / max(1, len(seg)))
                loss = loss + cfg.seg_weight * sum(seg) / max(1, len(seg))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip:
                torch.nn.utils.clip_grad_norm_(lora + head, cfg.grad_clip)
            opt.step()
            sched.step()
            losses.append(loss.item())
            bar.set_postfix(loss=f"{np.mean(losses):.4f}")
        row = {"epoch": epoch + 1, "train_loss": float(np.mean(losses)) if losses else float("nan")}
        if seg_losses:
            row["train_seg_loss"] = float(np.mean(seg_losses))
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
        if decoder is not None:
            ck["decoder"] = decoder.state_dict()
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
            "history": history, "config": asdict(cfg), "version": __version__,
            "decoder_params": int(sum(p.numel() for p in decoder.parameters())) if decoder is not None else 0}
