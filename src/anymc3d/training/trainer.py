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
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from .. import __version__
from ..errors import InputError
from ..evaluation import compute_metrics
from ..evaluation.run import metric_scores
from ..evaluation.threshold import choose_threshold
from ..io import atomic_write
from ..plugins.embed_norm import FIT_CASES
from ..plugins.model import AnyMC3D
from ..preprocess import PreprocessSpec
from ..runtime.batching import FLIP_COPIES, Batcher, BatchPlan, PreparedCase, flip_case
from ..runtime.engine import Runtime
from . import distributed as ddp
from .decoder import SegDecoder3D, dice_ce_loss
from .losses import classification_loss

__all__ = ["Batcher", "TrainConfig", "class_weights", "config_changes", "fit", "metric_scores", "seed_everything"]


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
    amp: bool = True               # bf16 autocast on CPU and CUDA (anymc3d.runtime.device)
    patience: int = 10
    seed: int = 0
    grad_clip: float = 1.0
    cache_trunk: bool = True       # with lora.last_k: keep un-augmented trunk activations in memory
    cache_dir: str | None = None   # also keep them on disk (anymc3d.store.cache): later epochs/runs/tasks reuse them
    seg_weight: float = 0.5        # λ of the auxiliary mask loss (used when training cases have masks)
    seg_hidden: int = 32
    progress: bool = True
    device: str = "auto"           # auto | cpu | cuda | cuda:N | mps
    workers: int = 0               # DataLoader worker processes (augmentation, slicing); 0 = in the main process
    slice_subset: int | None = None  # train on at most this many random slices per volume and view (None: all)
    threshold: str | float = "platt"  # decision-threshold policy on validation (anymc3d.evaluation.threshold)
    embed_norm: str = "auto"       # auto | none | center_scale (anymc3d.plugins.embed_norm; auto: the backbone's)
    flip_copies: int = 0           # flipped copies of every training volume (runtime.batching.FLIP_COPIES), cached
                                   # like the originals; each epoch shows every case as itself or one copy
    test_flips: list = field(default_factory=list)  # in-plane flips averaged at every prediction (PluginSpec.test_flips)
    ensemble: int = 1              # members trained together on one trunk (PluginSpec.ensemble)


#: settings that do not change what training computes, so a run may resume with them changed
RESUME_FREE_FIELDS = ("progress", "cache_dir", "cache_trunk", "device", "workers")


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


def warmup_cosine(opt: torch.optim.Optimizer, total: int, warmup: int):
    """Linear warmup over ``warmup`` steps ((step + 1) / warmup), then cosine decay to 0 at ``total``:
    torch's own LinearLR + CosineAnnealingLR."""
    from torch.optim.lr_scheduler import CosineAnnealingLR, LinearLR, SequentialLR

    cosine = CosineAnnealingLR(opt, T_max=max(1, total - warmup))
    if warmup <= 0:
        return cosine
    linear = LinearLR(opt, start_factor=1.0 / warmup, end_factor=1.0, total_iters=max(1, warmup - 1))
    return SequentialLR(opt, [linear, cosine], milestones=[warmup])


#: the training progress line: elapsed time, and the time remaining for the remaining steps
ETA_FORMAT = "{desc}{percentage:3.0f}%|{bar:20}| {n_fmt}/{total_fmt} steps [{elapsed} elapsed, ETA {remaining}{postfix}]"


def progress_bar(total: int, enabled: bool):
    """One bar over every training step of the run, with its ETA (validation time included in the
    rate, since the bar measures wall time between steps)."""
    return tqdm(total=total, desc="train", disable=not enabled, bar_format=ETA_FORMAT, leave=False,
                mininterval=1.0, smoothing=0.1)


def make_runtime(model: AnyMC3D, specs: dict[str, PreprocessSpec], cfg: TrainConfig) -> Runtime:
    """The runtime training runs on: cfg's device, precision, workers and activation cache."""
    return Runtime(model, specs, device=cfg.device, amp=cfg.amp, cache=cfg.cache_dir, cache_trunk=cfg.cache_trunk,
                   workers=cfg.workers)


def fit_embed_norm(model: AnyMC3D, rt: Runtime, train: list[PreparedCase], cfg: TrainConfig) -> None:
    """Set the plugin's slice-embedding normalisation from the un-augmented slices of up to
    ``FIT_CASES`` training cases (the same cases on every torchrun rank, so every rank gets the
    same statistics); nothing to do for a plugin without one."""
    if not len(getattr(model, "embed_norm", ())):  # e.g. a 3D CNN, or a plugin without one
        return
    pick = sorted(np.random.default_rng(cfg.seed).permutation(len(train))[:FIT_CASES].tolist())
    with model.fitting_embed_norm():
        rt.predict([train[i] for i in pick], cfg.batch_size)


def with_flip_copies(train: list[PreparedCase], copies: int) -> list[PreparedCase]:
    """The training cases followed by ``copies`` flipped copies of each (FLIP_COPIES order)."""
    if not 0 <= copies <= len(FLIP_COPIES):
        raise ValueError(f"flip_copies must be in 0..{len(FLIP_COPIES)}, got {copies}")
    return list(train) + [flip_case(c, dims) for dims in FLIP_COPIES[:copies] for c in train]


def copy_order(order: list[int], n: int, copies: int, seed: int, epoch: int) -> list[int]:
    """Each case index of this epoch's order replaced by itself or one of its copies (index + n * j), drawn
    from (seed, epoch) only: every torchrun rank draws the same, and a resumed run matches."""
    if not copies:
        return order
    pick = np.random.default_rng([seed, epoch, 7]).integers(0, copies + 1, n)
    return [i + n * int(pick[i]) for i in order]


def fit(model: AnyMC3D, specs: dict[str, PreprocessSpec], train: list[PreparedCase], val: list[PreparedCase],
        cfg: TrainConfig, out_dir: Path, resume: bool = False, runtime: Runtime | None = None) -> dict:
    """Train ``model``'s plugin parameters; returns a summary. The best state is left loaded in ``model``.

    Batches come from ``runtime`` (made from ``cfg`` when not given): a DataLoader whose workers
    augment and slice, the activation cache for un-augmented batches, and the device."""
    out_dir.mkdir(parents=True, exist_ok=True)
    seed_everything(cfg.seed)
    task_type = model.spec.task_type
    rt = runtime or make_runtime(model, specs, cfg)
    device = rt.device
    train, n_cases = with_flip_copies(train, cfg.flip_copies), len(train)
    model.set_trainable(True)
    lora = list(model.lora_parameters().values())
    head = list(model.head_parameters().values())
    use_seg = cfg.seg_weight > 0 and any(c.mask is not None for c in train)
    decoder = SegDecoder3D(model.backbone.embed_dim, cfg.seg_hidden).to(device) if use_seg else None
    if decoder is not None:
        head = head + list(decoder.parameters())  # trained with the head's settings, never saved
    groups = [{"params": head, "lr": cfg.lr_head, "weight_decay": cfg.wd_head}]
    if lora:
        groups.insert(0, {"params": lora, "lr": cfg.lr_lora, "weight_decay": cfg.wd_lora})
    opt = torch.optim.AdamW(groups)
    bs, steps_per_epoch = ddp.local_batch(n_cases, cfg.batch_size)  # torchrun: batch_size is the global batch
    total = steps_per_epoch * cfg.epochs
    sched = warmup_cosine(opt, total, int(cfg.warmup_epochs * steps_per_epoch))
    labels_np = np.stack([c.label.numpy() for c in train])
    cw = class_weights(labels_np, task_type, cfg.class_weighting)
    cw = cw.to(device) if cw is not None else None
    step_module = ddp.train_step(rt, decoder)  # DistributedDataParallel under torchrun, else the plain step

    ckpt_path, log_path = out_dir / "checkpoint.pt", out_dir / "train_log.csv"
    start_epoch, best, best_state, bad, history = 0, -math.inf, None, 0, []
    if resume and ckpt_path.is_file():
        ck = torch.load(ckpt_path, map_location=device, weights_only=True)
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
    if not cfg.augment and start_epoch < cfg.epochs:
        # every epoch reads the same frozen trunk: compute it once, up front, with its own progress bar
        rt.fill_cache(list(train) + list(val), cfg.batch_size, cfg.progress)
    if start_epoch == 0:  # a resumed run has its statistics back from the checkpoint
        fit_embed_norm(model, rt, train[:n_cases], cfg)
    bar = progress_bar(steps_per_epoch * (cfg.epochs - start_epoch), cfg.progress and ddp.is_main())
    for epoch in range(start_epoch, cfg.epochs):
        seed_everything(cfg.seed * 1000 + epoch)  # dropout RNG per (seed, epoch): a resumed run matches
        model.train()
        order = ddp.epoch_order(n_cases, cfg.seed * 1000, epoch)  # this rank's cases (DistributedSampler)
        order = copy_order(order, n_cases, cfg.flip_copies, cfg.seed, epoch)
        losses, seg_losses = [], []
        if decoder is not None:
            decoder.train()
        plans = []
        for step in range(steps_per_epoch):
            idx = order[step * bs:(step + 1) * bs]
            if idx:
                aug_seed = ((cfg.seed * 1_000_003 + epoch * 10_007 + step * 101) % (2**31) + ddp.rank_seed_offset(
                    cfg.batch_size)) if cfg.augment else None
                plans.append(BatchPlan(idx, aug_seed, with_masks=decoder is not None))
        bar.set_description(f"epoch {epoch + 1}/{cfg.epochs}")
        subset = None
        if cfg.slice_subset and decoder is None:  # the mask loss needs every slice of its stack
            subset = (int(cfg.slice_subset), torch.Generator().manual_seed(cfg.seed * 1000 + epoch + 17))
        for batch, _meta in rt.loader(train, plans):
            slices, masks, present, y, from_trunk = batch[:5]
            with_seg = decoder is not None and bool(batch[6].any())  # batches without any mask add no seg loss
            targets = rt.to_device(batch[5]) if with_seg else None
            out, seg_logits = step_module(slices, masks, present, from_trunk, targets, subset)
            y = y.to(device)
            # an ensemble trains each member on its own loss (the members stay independent), mean over members
            loss = sum(classification_loss(z.float(), y, task_type, cfg.loss, cfg.focal_gamma, cfg.focal_alpha, cw)
                       for z in (out.member_logits or [out.logits])) / max(1, len(out.member_logits))
            if with_seg:
                has_mask = batch[6].to(device)
                seg = [dice_ce_loss(seg_logits[s], t, has_mask) for s, t in targets.items()]
                seg_losses.append(float(sum(seg).detach()) / max(1, len(seg)))
                loss = loss + cfg.seg_weight * sum(seg) / max(1, len(seg))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip:
                torch.nn.utils.clip_grad_norm_(lora + head, cfg.grad_clip)
            opt.step()
            sched.step()
            losses.append(loss.item())
            bar.update(1)
            bar.set_postfix_str(f"loss={np.mean(losses):.4f}", refresh=False)
        row = {"epoch": epoch + 1, "train_loss": ddp.mean_over_ranks(float(np.mean(losses)) if losses else float("nan"))}
        # every rank joins the gather, also one whose batches carried no mask this epoch
        seg_loss = ddp.mean_over_ranks(float(np.mean(seg_losses)) if seg_losses else None)
        if seg_loss is not None:
            row["train_seg_loss"] = seg_loss
        if val:
            probs = ddp.gathered_predict(rt, val, cfg.batch_size)  # every rank gets every case's row
            yv = np.stack([c.label.numpy() for c in val])
            yv = yv[:, 0] if task_type != "multilabel" else yv
            sv = metric_scores(probs, task_type)
            thr = choose_threshold(yv, sv, task_type, cfg.threshold)
            m = compute_metrics(yv, sv, task_type, model.spec.label_names, threshold=thr, n_bootstrap=0)
            row.update(val_auc=m["auc"], val_acc=m["acc"], val_threshold=round(thr, 4))
            score = m["auc"] if m["auc"] is not None else m["acc"]
        else:
            score = -row["train_loss"]
        row["lr_head"] = opt.param_groups[-1]["lr"]
        row["elapsed_s"] = round(time.time() - t0, 2)
        improved = score > best
        if improved:
            best, bad = score, 0
            best_state = {k: v.detach().to("cpu", copy=True) for k, v in model.trainable_state().items()}
        else:
            bad += 1
        row["best"] = improved
        history.append(row)
        if cfg.progress and ddp.is_main():
            tqdm.write(" ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()))
        if ddp.is_main():  # torchrun: rank 0 alone writes the log and the checkpoint
            with atomic_write(log_path) as tmp:
                with open(tmp, "w", newline="", encoding="utf-8") as fh:
                    w = csv.DictWriter(fh, fieldnames=list(dict.fromkeys(k for r in history for k in r)))
                    w.writeheader()
                    w.writerows(history)
        ck = {"epoch": epoch, "trainable": {k: v.cpu() for k, v in model.trainable_state().items()},
              "optimizer": opt.state_dict(),
              "scheduler": sched.state_dict(), "best": best, "best_state": best_state, "bad_epochs": bad,
              "history": json.dumps(history), "config": json.dumps(asdict(cfg))}
        if decoder is not None:
            ck["decoder"] = decoder.state_dict()
        if ddp.is_main():
            with atomic_write(ckpt_path) as tmp:
                torch.save(ck, tmp)
        if val and bad >= cfg.patience:
            break
    bar.close()
    if best_state is not None:
        model.load_trainable_state(best_state)
    model.eval()
    best_row = max((r for r in history), key=lambda r: r.get("val_auc") or -1) if val else history[-1]
    return {"epochs_run": len(history), "best_epoch": best_row["epoch"], "best_val_auc": best_row.get("val_auc"),
            "best_val_acc": best_row.get("val_acc"), "train_wall_s": history[-1]["elapsed_s"] if history else 0.0,
            "history": history, "config": asdict(cfg), "version": __version__,
            "decoder_params": int(sum(p.numel() for p in decoder.parameters())) if decoder is not None else 0}
