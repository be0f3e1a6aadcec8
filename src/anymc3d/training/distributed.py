"""Data-parallel training under ``torchrun``: the hooks ``training.trainer.fit`` calls.

One process per device; every process holds the whole frozen backbone and the plugin, and
``DistributedDataParallel`` averages the gradients of the trainable parameters (LoRA, task
queries, head, and the auxiliary mask decoder when it trains) over the ranks in every step.
Without a launch (plain ``anymc3d train``) each hook is the single-process behaviour, unchanged.

* :func:`epoch_order` - this rank's cases of the epoch from a ``DistributedSampler`` seeded per
  epoch (``set_epoch``). Its permutation is the one the single-process trainer draws for the same
  (seed, epoch), and rank r takes positions r, r + W, r + 2W, ... of it, so step s of a W-rank run
  covers exactly the cases of step s of a one-process run;
* :func:`local_batch` - ``--batch-size`` is the global batch (as in nnU-Net's DDP): each rank takes
  ``batch_size / W`` cases per step, so the number of steps, the learning-rate schedule and the
  effective batch equal the single-process run's;
* :class:`TrainStep` / :func:`train_step` - the forward of one training step (runtime forward +
  decoder) as one module, wrapped in DDP when distributed, so DDP sees every trainable parameter
  used in that step (``find_unused_parameters``: a batch without masks or without a stream leaves
  some unused);
* :func:`gathered_predict` - validation split over the ranks, probabilities gathered back in case
  order on every rank, so every rank computes the same metrics and stops at the same epoch;
* :func:`is_main` - only rank 0 writes ``train_log.csv``, ``checkpoint.pt``, the plugin and metrics.

Checkpoints are written by rank 0 into ``--out``; ``--resume`` reads them on every rank, so
``--out`` must be a folder every rank sees (a shared filesystem on several nodes).
"""
from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn
from torch.utils.data import DistributedSampler

from ..runtime.distributed import all_gather_object, is_initialized, is_main, rank, world_size

__all__ = ["TrainStep", "epoch_order", "gathered_predict", "is_main", "local_batch", "mean_over_ranks", "train_step"]


def local_batch(n_cases: int, batch_size: int) -> tuple[int, int]:
    """(cases per rank per step, steps per epoch). One process: (batch_size, ceil(n / batch_size))."""
    w = world_size()
    bs = max(1, math.ceil(batch_size / w))
    per_rank = math.ceil(n_cases / w)  # DistributedSampler pads every shard to this length
    return bs, max(1, math.ceil(per_rank / bs))


def epoch_order(n_cases: int, seed: int, epoch: int) -> list[int]:
    """This rank's case indices for ``epoch``, shuffled with ``seed + epoch`` (torch's DistributedSampler;
    with one process it is exactly ``torch.randperm(n, generator=manual_seed(seed + epoch))``)."""
    sampler = DistributedSampler(range(n_cases), num_replicas=world_size(), rank=rank(), shuffle=True, seed=seed,
                                 drop_last=False)
    sampler.set_epoch(epoch)
    return list(sampler)


def rank_seed_offset(batch_size: int) -> int:
    """Added to a step's augmentation seed on this rank, so the cases of one global batch get distinct
    augmentation seeds (the single-process run gives case i of a batch ``seed + i``)."""
    return rank() * max(1, math.ceil(batch_size / world_size()))


class TrainStep(nn.Module):
    """One training step's forward: the runtime's forward of the plugin model (cached activations
    where the batch allows) and, when it trains, the auxiliary mask decoder on the patch tokens.
    Returns ``(ModelOutput, {stream: mask logits} or None)``."""

    def __init__(self, runtime, decoder: nn.Module | None = None) -> None:
        super().__init__()
        self.model = runtime.model
        self.decoder = decoder
        self._runtime = [runtime]  # not a submodule: the runtime is not an nn.Module

    def forward(self, batch, seg_targets: dict | None = None, subset=None):
        rt = self._runtime[0]
        out = rt.forward(batch, keep_patches=self.decoder is not None, subset=subset)
        seg = None
        if self.decoder is not None and seg_targets is not None:
            seg = {s: self.decoder(out.patches[s], t.shape[-2:]) for s, t in seg_targets.items()}
        return out, seg


def train_step(runtime, decoder: nn.Module | None = None) -> nn.Module:
    """The step module of ``fit``: plain with one process, ``DistributedDataParallel`` under torchrun.

    Only trainable parameters are synchronised: the frozen backbone (same weights on every rank by
    construction, checked by its fingerprint) is excluded from DDP's initial broadcast and buckets."""
    step = TrainStep(runtime, decoder)
    if not is_initialized() or world_size() == 1:
        return step
    from torch.nn.parallel import DistributedDataParallel as DDP

    frozen = [n for n, p in step.named_parameters() if not p.requires_grad]
    frozen += [n for n, _ in step.named_buffers()]  # BatchNorm statistics of the frozen (eval-mode) backbone
    DDP._set_params_and_buffers_to_ignore_for_model(step, frozen)
    dev = runtime.device
    return DDP(step, device_ids=[dev.index] if dev.type == "cuda" else None,
               find_unused_parameters=True)


def mean_over_ranks(value: float | None) -> float | None:
    """The mean of a per-rank number over the ranks (the epoch's training loss, its mask loss); the
    number itself with one process. A rank with nothing to report passes ``None`` (it still joins the
    collective) and is left out of the mean; ``None`` when no rank has a value."""
    if not is_initialized() or world_size() == 1:
        return value
    values = [float(v) for v in all_gather_object(None if value is None else float(value)) if v is not None]
    return float(np.mean(values)) if values else None


def gathered_predict(runtime, cases: list, batch_size: int) -> np.ndarray:
    """Probabilities of ``cases`` in their order; under DDP each rank predicts every W-th case and the
    rows are gathered on every rank (``runtime.predict`` with one process)."""
    w = world_size()
    if not is_initialized() or w == 1:
        return runtime.predict(cases, batch_size)[0]
    idx = list(range(rank(), len(cases), w))
    probs = runtime.predict([cases[i] for i in idx], batch_size)[0] if idx else None
    parts = all_gather_object((idx, probs))
    n_out = next(p.shape[1] for _, p in parts if p is not None)
    full = np.zeros((len(cases), n_out), dtype=np.float32)
    for ids, p in parts:
        if ids:
            full[ids] = p
    return full
