"""Plugin training: AdamW in two groups, warmup + cosine, validation every epoch,
best-by-validation-AUROC, early stopping, resumable checkpoints, per-epoch CSV log.

:class:`Trainer` runs it in named phases (:func:`build_optimizer`, :class:`Checkpoint`, :class:`TrainLog`,
``train_epoch``, ``validate``, ``run``); :func:`fit` is its one-call wrapper.

Determinism: shuffling and augmentation are re-seeded from (seed, epoch) at the start of every
epoch, so a resumed run follows the same path as an uninterrupted one.
"""
from __future__ import annotations

import contextlib
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
from ..evaluation.threshold import DEFAULT_POLICY, choose_threshold
from ..io import atomic_write
from ..plugins.embed_norm import FIT_CASES
from ..plugins.mixup import Mix
from ..plugins.model import AnyMC3D
from ..preprocess import PreprocessSpec
from ..runtime.batching import FLIP_COPIES, Batch, Batcher, BatchPlan, PreparedCase, flip_case
from ..runtime.engine import Runtime
from . import distributed as ddp
from .decoder import SegDecoder3D, dice_ce_loss
from .averaging import WeightEMA, WeightSWA
from .losses import classification_loss
from .view_dropout import drop_views

__all__ = ["Batcher", "Checkpoint", "TrainConfig", "TrainLog", "Trainer", "build_optimizer", "class_weights",
           "config_changes", "fit", "metric_scores", "seed_everything"]


@dataclass
class TrainConfig:
    epochs: int = 30
    batch_size: int = 8
    lr_lora: float = 5e-4          # won on validation on Adrenal and 2 synthetic tasks over 1e-4 (docs/results.md, 2026-12-07)
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
    threshold: str | float = DEFAULT_POLICY  # decision-threshold policy on validation (anymc3d.evaluation.threshold)
    embed_norm: str = "auto"       # auto | none | center_scale (anymc3d.plugins.embed_norm; auto: the backbone's)
    flip_copies: int = 0           # flipped copies of every training volume (runtime.batching.FLIP_COPIES), cached
                                   # like the originals; each epoch shows every case as itself or one copy
    test_flips: list = field(default_factory=list)  # in-plane flips averaged at every prediction (PluginSpec.test_flips)
    ensemble: int = 1              # members trained together on one trunk (PluginSpec.ensemble)
    ema: float = 0.0               # per-step decay of an EMA of the trainable weights, validated and saved (0: off)
    swa: float = 0.0               # SWA: the mean of the weights at every epoch's end from epoch ceil(swa * epochs)
                                   # on, validated and saved like the EMA (0: off; not with ema)
    label_smoothing: float = 0.0   # targets pulled toward the uniform distribution by this much (0: off)
    mixup: float = 0.0             # Beta(a, a) mixup of slice embeddings between a batch's cases (plugins.mixup; 0: off)
    view_dropout: float = 0.0      # each training case's view hidden from the fusion with this probability (0: off)

    @classmethod
    def from_plan(cls, plan, **overrides) -> "TrainConfig":
        """The config a training plan trains with: its training fields (an ``anymc3d.planning.Plan`` or the
        settings dict ``anymc3d train`` makes of it; a missing or None field keeps this class's default),
        then ``overrides``, the caller's own settings (seed, device, ...). The one place a plan becomes a config."""
        d = plan if isinstance(plan, dict) else asdict(plan)
        values = {k: d[k] for k in PLAN_FIELDS if d.get(k) is not None}
        if "test_flips" in values:
            values["test_flips"] = list(values["test_flips"])
        return cls(**{**values, **overrides})


#: the plan fields that are training settings (anymc3d.planning.planner.Plan)
PLAN_FIELDS = ("epochs", "batch_size", "patience", "augment", "slice_subset", "workers", "flip_copies", "test_flips",
               "ensemble", "ema", "swa", "label_smoothing", "mixup", "view_dropout", "threshold")


#: settings that do not change what training computes, so a run may resume with them changed
RESUME_FREE_FIELDS = ("progress", "cache_dir", "cache_trunk", "device", "workers")


def config_changes(saved: dict, current: dict) -> list[str]:
    """``key: saved -> current`` for every result-changing setting that differs between two configs."""
    return [f"{k}: {saved.get(k)!r} -> {current.get(k)!r}" for k in sorted(set(saved) | set(current))
            if k not in RESUME_FREE_FIELDS and saved.get(k) != current.get(k)]


def weight_average(model: AnyMC3D, cfg: TrainConfig) -> WeightEMA | WeightSWA | None:
    """The average of the plugin's trainable weights that ``cfg`` asks for (the decoder is never saved, so
    never averaged); None without ``ema`` or ``swa``."""
    if cfg.ema and cfg.swa:
        raise InputError("--ema and --swa: choose one weight average")
    params = {**model.lora_parameters(), **model.head_parameters()}
    if cfg.ema:
        return WeightEMA(params, cfg.ema)
    return WeightSWA(params, max(1, math.ceil(cfg.swa * cfg.epochs))) if cfg.swa else None


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


def build_optimizer(model: AnyMC3D, decoder: torch.nn.Module | None, cfg: TrainConfig, steps_per_epoch: int):
    """AdamW in groups: LoRA (``lr_lora`` / ``wd_lora``; absent without LoRA) and the head with the task
    queries and the auxiliary mask decoder (``lr_head`` / ``wd_head``), under :func:`warmup_cosine` over the
    whole run. Returns ``(optimizer, scheduler, the trained parameters)``."""
    lora = list(model.lora_parameters().values())
    head = list(model.head_parameters().values())
    if decoder is not None:
        head = head + list(decoder.parameters())  # trained with the head's settings, never saved
    groups = [{"params": head, "lr": cfg.lr_head, "weight_decay": cfg.wd_head}]
    if lora:
        groups.insert(0, {"params": lora, "lr": cfg.lr_lora, "weight_decay": cfg.wd_lora})
    opt = torch.optim.AdamW(groups)
    sched = warmup_cosine(opt, steps_per_epoch * cfg.epochs, int(cfg.warmup_epochs * steps_per_epoch))
    return opt, sched, lora + head


class Checkpoint:
    """``checkpoint.pt``: the run's whole state after every epoch (rank 0 writes it, atomically), and
    its restore on ``resume``, refused when the checkpoint was written with other result-changing
    settings (:func:`config_changes`)."""

    def __init__(self, path: Path, cfg: TrainConfig) -> None:
        self.path, self.cfg = path, cfg

    def save(self, t: "Trainer", epoch: int) -> None:
        if not ddp.is_main():  # torchrun: rank 0 alone writes the checkpoint
            return
        ck = {"epoch": epoch, "trainable": {k: v.cpu() for k, v in t.model.trainable_state().items()},
              "optimizer": t.opt.state_dict(), "scheduler": t.sched.state_dict(), "best": t.best,
              "best_state": t.best_state, "bad_epochs": t.bad, "history": json.dumps(t.log.history),
              "config": json.dumps(asdict(self.cfg))}
        if t.decoder is not None:
            ck["decoder"] = t.decoder.state_dict()
        if t.average is not None:
            ck["ema"] = t.average.state_dict()  # the key the EMA was saved under first; SWA's too
        with atomic_write(self.path) as tmp:
            torch.save(ck, tmp)

    def restore(self, t: "Trainer") -> bool:
        """Load the checkpoint (when there is one) into ``t``; whether there was one."""
        if not self.path.is_file():
            return False
        ck = torch.load(self.path, map_location=t.device, weights_only=True)
        changed = config_changes(json.loads(ck.get("config", "{}")), asdict(self.cfg))
        if changed:
            raise InputError(f"{self.path}: written with other training settings ({'; '.join(changed)}); "
                             "resume with the same settings or train into a new folder")
        t.model.load_trainable_state(ck["trainable"])
        t.opt.load_state_dict(ck["optimizer"])
        t.sched.load_state_dict(ck["scheduler"])
        t.start_epoch, t.best, t.best_state, t.bad = ck["epoch"] + 1, ck["best"], ck["best_state"], ck["bad_epochs"]
        if t.decoder is not None and "decoder" in ck:
            t.decoder.load_state_dict(ck["decoder"])
        if t.average is not None:
            t.average.load_state_dict(ck["ema"])
        t.log.history = json.loads(ck["history"])
        return True


class TrainLog:
    """The per-epoch history rows, ``train_log.csv`` (rank 0, atomically rewritten after every epoch),
    the progress bar over every step of the run and the one line per epoch under it."""

    def __init__(self, path: Path, progress: bool) -> None:
        self.path, self.progress = path, progress
        self.history: list[dict] = []
        self.bar = None
        self.t0 = time.time()

    def start_clock(self) -> None:
        """``elapsed_s`` counts from now, continued from the history's last row on resume."""
        self.t0 = time.time() - (self.history[-1]["elapsed_s"] if self.history else 0.0)

    def open_bar(self, total_steps: int) -> None:
        self.bar = progress_bar(total_steps, self.progress and ddp.is_main())

    def elapsed(self) -> float:
        return round(time.time() - self.t0, 2)

    def step(self, mean_loss: float) -> None:
        self.bar.update(1)
        self.bar.set_postfix_str(f"loss={mean_loss:.4f}", refresh=False)

    def add(self, row: dict) -> None:
        self.history.append(row)
        if self.progress and ddp.is_main():
            tqdm.write(" ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()))
        if ddp.is_main():  # torchrun: rank 0 alone writes the log
            with atomic_write(self.path) as tmp:
                with open(tmp, "w", newline="", encoding="utf-8") as fh:
                    w = csv.DictWriter(fh, fieldnames=list(dict.fromkeys(k for r in self.history for k in r)))
                    w.writeheader()
                    w.writerows(self.history)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class Trainer:
    """One training run of a model's plugin parameters, in named phases: the optimiser
    (:func:`build_optimizer`), :meth:`resume` (:class:`Checkpoint`), :meth:`prepare` (trunk cache,
    embedding statistics), :meth:`train_epoch`, :meth:`validate`, and :meth:`run`, the epoch loop
    with best-state tracking and early stopping.

    Batches come from ``runtime`` (made from ``cfg`` when not given): a DataLoader whose workers
    augment and slice, the activation cache for un-augmented batches, and the device. Under torchrun the
    step is DistributedDataParallel, unless ``local`` (one process alone: the planner times steps on rank 0)."""

    def __init__(self, model: AnyMC3D, specs: dict[str, PreprocessSpec], train: list[PreparedCase],
                 val: list[PreparedCase], cfg: TrainConfig, out_dir: Path, runtime: Runtime | None = None,
                 local: bool = False) -> None:
        out_dir.mkdir(parents=True, exist_ok=True)
        seed_everything(cfg.seed)
        self.model, self.val, self.cfg = model, val, cfg
        self.task_type = model.spec.task_type
        self.rt = runtime or make_runtime(model, specs, cfg)
        self.device = self.rt.device
        self.train, self.n_cases = with_flip_copies(train, cfg.flip_copies), len(train)
        model.set_trainable(True)
        use_seg = cfg.seg_weight > 0 and any(c.mask is not None for c in self.train)
        self.decoder = SegDecoder3D(model.backbone.embed_dim, cfg.seg_hidden).to(self.device) if use_seg else None
        self.bs, self.steps_per_epoch = ddp.local_batch(self.n_cases, cfg.batch_size)  # batch_size: the global batch
        self.opt, self.sched, self.params = build_optimizer(model, self.decoder, cfg, self.steps_per_epoch)
        self.average = weight_average(model, cfg)
        cw = class_weights(np.stack([c.label.numpy() for c in self.train]), self.task_type, cfg.class_weighting)
        self.cw = cw.to(self.device) if cw is not None else None
        # DistributedDataParallel under torchrun; ``local``: this process alone (the planner's timing on rank 0)
        self.step_module = ddp.TrainStep(self.rt, self.decoder) if local else ddp.train_step(self.rt, self.decoder)
        self.checkpoint = Checkpoint(out_dir / "checkpoint.pt", cfg)
        self.log = TrainLog(out_dir / "train_log.csv", cfg.progress)
        self.start_epoch, self.best, self.best_state, self.bad = 0, -math.inf, None, 0
        self.rng = np.random.default_rng([cfg.seed, 0, 11])  # train_epoch redraws it per epoch

    def resume(self) -> bool:
        """Continue from ``checkpoint.pt`` when there is one (same settings only); whether there was one."""
        return self.checkpoint.restore(self)

    def prepare(self) -> None:
        """Before the first epoch: the frozen trunk of a run without augmentation, computed once up front
        (every epoch reads the same), and the embedding statistics of a run that is not resumed."""
        if not self.cfg.augment and self.start_epoch < self.cfg.epochs:
            self.rt.fill_cache(list(self.train) + list(self.val), self.cfg.batch_size, self.cfg.progress)
        if self.start_epoch == 0:  # a resumed run has its statistics back from the checkpoint
            fit_embed_norm(self.model, self.rt, self.train[:self.n_cases], self.cfg)

    def plans(self, epoch: int) -> list[BatchPlan]:
        """This rank's batches of ``epoch``: the case order and augmentation seeds from (seed, epoch) only."""
        cfg = self.cfg
        order = ddp.epoch_order(self.n_cases, cfg.seed * 1000, epoch)  # this rank's cases (DistributedSampler)
        order = copy_order(order, self.n_cases, cfg.flip_copies, cfg.seed, epoch)
        plans = []
        for step in range(self.steps_per_epoch):
            idx = order[step * self.bs:(step + 1) * self.bs]
            if idx:
                aug_seed = ((cfg.seed * 1_000_003 + epoch * 10_007 + step * 101) % (2**31) + ddp.rank_seed_offset(
                    cfg.batch_size)) if cfg.augment else None
                plans.append(BatchPlan(idx, aug_seed, with_masks=self.decoder is not None))
        return plans

    def slice_subset(self, epoch: int):
        """``(slices per stack, generator)`` of ``cfg.slice_subset``, or None (also with the mask loss,
        which needs every slice of its stack)."""
        if self.cfg.slice_subset and self.decoder is None:
            return int(self.cfg.slice_subset), torch.Generator().manual_seed(self.cfg.seed * 1000 + epoch + 17)
        return None

    def regularised(self, batch: Batch) -> tuple[Batch, Mix | None]:
        """The batch with ``cfg.view_dropout`` applied to its present views, and this step's embedding
        mixup (``cfg.mixup``; None when off, or for a batch of one case or with the mask loss), both drawn
        from the epoch's generator."""
        cfg = self.cfg
        if cfg.view_dropout > 0:
            batch = batch.replace(present=drop_views(batch.present, cfg.view_dropout, self.rng))
        n = batch.labels.shape[0]
        # mixup blends slice embeddings before pooling: plugins only (a 3D CNN baseline has none)
        mixes = cfg.mixup > 0 and n > 1 and self.decoder is None and hasattr(self.model, "mixing")
        mix = Mix.draw(n, cfg.mixup, self.rng) if mixes else None
        return batch, mix

    def loss_of(self, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        cfg = self.cfg
        return classification_loss(z.float(), y, self.task_type, cfg.loss, cfg.focal_gamma, cfg.focal_alpha,
                                   self.cw, label_smoothing=cfg.label_smoothing)

    def step(self, batch: Batch, subset) -> tuple[float, float | None]:
        """One optimiser step on a loader batch; its loss and its mask loss (None without one)."""
        cfg = self.cfg
        batch, mix = self.regularised(batch)
        with_seg = self.decoder is not None and batch.with_seg  # batches without any mask add no seg loss
        targets = self.rt.to_device(batch.seg_targets) if with_seg else None
        with self.model.mixing(mix) if mix is not None else contextlib.nullcontext():
            out, seg_logits = self.step_module(batch, targets, subset)
        y = batch.labels.to(self.device)
        member_loss = self.loss_of if mix is None else (lambda z, t: mix.loss(self.loss_of, z, t))
        # an ensemble trains each member on its own loss (the members stay independent), mean over members
        loss = sum(member_loss(z, y) for z in (out.member_logits or [out.logits])) / max(1, len(out.member_logits))
        seg_loss = None
        if with_seg:
            has_mask = batch.has_mask.to(self.device)
            seg = [dice_ce_loss(seg_logits[s], t, has_mask) for s, t in targets.items()]
            seg_loss = float(sum(seg).detach()) / max(1, len(seg))
            loss = loss + cfg.seg_weight * sum(seg) / max(1, len(seg))
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.params, cfg.grad_clip)
        self.opt.step()
        self.sched.step()
        if isinstance(self.average, WeightEMA):
            self.average.update()
        return loss.item(), seg_loss

    def train_epoch(self, epoch: int) -> dict:
        """One pass over this rank's cases of ``epoch``; the epoch's row (losses averaged over the ranks)."""
        seed_everything(self.cfg.seed * 1000 + epoch)  # dropout RNG per (seed, epoch): a resumed run matches
        self.rng = np.random.default_rng([self.cfg.seed, epoch, 11])  # view dropout and mixup, likewise
        self.model.train()
        if self.decoder is not None:
            self.decoder.train()
        plans = self.plans(epoch)
        if self.log.bar is not None:
            self.log.bar.set_description(f"epoch {epoch + 1}/{self.cfg.epochs}")
        subset = self.slice_subset(epoch)
        losses, seg_losses = [], []
        for batch, _meta in self.rt.loader(self.train, plans):
            loss, seg_loss = self.step(batch, subset)
            losses.append(loss)
            if seg_loss is not None:
                seg_losses.append(seg_loss)
            if self.log.bar is not None:
                self.log.step(np.mean(losses))
        row = {"epoch": epoch + 1, "train_loss": ddp.mean_over_ranks(float(np.mean(losses)) if losses else float("nan"))}
        # every rank joins the gather, also one whose batches carried no mask this epoch
        seg_loss = ddp.mean_over_ranks(float(np.mean(seg_losses)) if seg_losses else None)
        if seg_loss is not None:
            row["train_seg_loss"] = seg_loss
        return row

    def validate(self) -> tuple[dict, float | None]:
        """The validation row (AUROC, accuracy at the threshold policy's threshold) and the score the best
        state is chosen by (AUROC, else accuracy); ``({}, None)`` without validation cases."""
        if not self.val:
            return {}, None
        probs = ddp.gathered_predict(self.rt, self.val, self.cfg.batch_size)  # every rank gets every case's row
        yv = np.stack([c.label.numpy() for c in self.val])
        yv = yv[:, 0] if self.task_type != "multilabel" else yv
        sv = metric_scores(probs, self.task_type)
        thr = choose_threshold(yv, sv, self.task_type, self.cfg.threshold)
        m = compute_metrics(yv, sv, self.task_type, self.model.spec.label_names, threshold=thr, n_bootstrap=0)
        row = {"val_auc": m["auc"], "val_acc": m["acc"], "val_threshold": round(thr, 4)}
        return row, m["auc"] if m["auc"] is not None else m["acc"]

    def averaged(self):
        """A context in which the model holds the averaged weights (``cfg.ema`` or ``cfg.swa``); a no-op without."""
        return self.average.applied() if self.average is not None else contextlib.nullcontext()

    def track_best(self, score: float) -> bool:
        """Keep the trainable state when ``score`` beats the best so far, else count a bad epoch; whether it did."""
        if score > self.best:
            self.best, self.bad = score, 0
            self.best_state = {k: v.detach().to("cpu", copy=True) for k, v in self.model.trainable_state().items()}
            return True
        self.bad += 1
        return False

    def run(self) -> dict:
        """The epoch loop (from the checkpoint's next epoch after :meth:`resume`): train, validate, keep the
        best state, log, checkpoint, stop after ``patience`` epochs without a better validation score. The
        best state is left loaded in the model; returns the summary."""
        cfg = self.cfg
        self.log.start_clock()
        self.prepare()
        self.log.open_bar(self.steps_per_epoch * (cfg.epochs - self.start_epoch))
        for epoch in range(self.start_epoch, cfg.epochs):
            row = self.train_epoch(epoch)
            if isinstance(self.average, WeightSWA):
                self.average.end_epoch(epoch + 1)
            with self.averaged():  # with --ema / --swa the averaged weights are validated and kept as the best state
                val_row, score = self.validate()
                row.update(val_row)
                row["best"] = self.track_best(-row["train_loss"] if score is None else score)
            row["lr_head"] = self.opt.param_groups[-1]["lr"]
            row["elapsed_s"] = self.log.elapsed()
            self.log.add(row)
            self.checkpoint.save(self, epoch)
            if self.val and self.bad >= cfg.patience:
                break
        self.log.close()
        if self.best_state is not None:
            self.model.load_trainable_state(self.best_state)
        self.model.eval()
        return self.summary()

    def summary(self) -> dict:
        history = self.log.history
        best_row = max((r for r in history), key=lambda r: r.get("val_auc") or -1) if self.val else history[-1]
        return {"epochs_run": len(history), "best_epoch": best_row["epoch"], "best_val_auc": best_row.get("val_auc"),
                "best_val_acc": best_row.get("val_acc"), "train_wall_s": history[-1]["elapsed_s"] if history else 0.0,
                "history": history, "config": asdict(self.cfg), "version": __version__,
                "decoder_params": int(sum(p.numel() for p in self.decoder.parameters()))
                if self.decoder is not None else 0}


def fit(model: AnyMC3D, specs: dict[str, PreprocessSpec], train: list[PreparedCase], val: list[PreparedCase],
        cfg: TrainConfig, out_dir: Path, resume: bool = False, runtime: Runtime | None = None) -> dict:
    """Train ``model``'s plugin parameters (a :class:`Trainer` run; ``resume``: continue from
    ``out_dir/checkpoint.pt`` when there is one); returns a summary. The best state is left loaded in ``model``.

    Batches come from ``runtime`` (made from ``cfg`` when not given): a DataLoader whose workers
    augment and slice, the activation cache for un-augmented batches, and the device. Under torchrun the
    step is DistributedDataParallel, unless ``local`` (one process alone: the planner times steps on rank 0)."""
    trainer = Trainer(model, specs, train, val, cfg, out_dir, runtime=runtime)
    if resume:
        trainer.resume()
    return trainer.run()
