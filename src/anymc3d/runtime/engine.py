"""The runtime: one path from cases to model outputs, on any device.

:class:`Runtime` binds one plugin model to a device, a :class:`~anymc3d.runtime.batching.Batcher`
and (for shared-trunk and pooling-only plugins) a view of the one activation cache. Trainer
validation, ``evaluate``, ``predict``, ``predict --plugins``, ``explain``, the bench baselines and
the frozen-feature extractors all go through it:

* :meth:`Runtime.loader` - batches from a ``DataLoader`` (workers read, preprocess, augment, slice);
* :meth:`Runtime.forward` - a :class:`~anymc3d.runtime.batching.Batch` on the device: cached activations where the batch allows it,
  else the backbone with the stream's adapter (``AnyMC3D.embed_slices``) -> ``ModelOutput``;
* :meth:`Runtime.predict` - probabilities and per-case outputs (slice / view weights, presence);
* :func:`frozen_embeddings` - per-case class embeddings of a frozen backbone (baselines).
"""
from __future__ import annotations

import math
import time
from typing import Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from ..plugins.model import ModelOutput, average_outputs
from .batching import Batch, Batcher, BatchPlan, batch_loader, collate, eval_plans, per_case_stacks, slice_subset
from .cache import ActivationCache, PluginActivations, cut_point, frozen_engine
from .device import place, resolve_device
from .merged import MergedSlices


class Runtime:
    """One plugin model on one device. ``cache``: an :class:`ActivationCache` (shared between
    runtimes, e.g. every plugin of a store), a folder (disk + memory) or None (memory only); it is
    used only with ``cache_trunk`` and a shared-trunk or pooling-only plugin."""

    def __init__(self, model, specs: dict, device: str | torch.device = "auto", amp: bool | None = None,
                 cache: ActivationCache | str | None = None, cache_trunk: bool = False, workers: int = 0,
                 merge_lora: bool = False) -> None:
        """``merge_lora`` (prediction only: the plugin's weights must not change afterwards): each stream's
        slice network with its LoRA merged may run whole on ``--engine``'s engine (anymc3d.runtime.merged)."""
        self.model, self.specs = model, specs
        self.device = resolve_device(device)
        place(model, self.device, model.autocast if amp is None else amp)
        if cut_point(model) is not None and model.spec.lora.r > 0:  # the frozen trunk runs on --engine's engine
            model.trunk_engine = lambda x, m=model: frozen_engine(m, "", x)
        if hasattr(model, "slice_engine"):  # a plugin (the baselines' models have no slice network to merge)
            merge = merge_lora and model.spec.lora.r > 0 and self.device.type == "cpu"
            for m in (model, *model.members):
                m.slice_engine = MergedSlices(m) if merge else None
        self.batcher = Batcher(model, specs, cache_trunk=cache_trunk)
        self.workers = int(workers)
        self.activations = None
        if self.batcher.cache_trunk:  # the Batcher allows it only for a plugin with a cut point
            store = cache if isinstance(cache, ActivationCache) else ActivationCache(cache, memory=True)
            self.activations = PluginActivations(store, model, specs)
        self.last_shared_s = 0.0  # seconds of the last forward spent computing cache misses

    @property
    def cache_trunk(self) -> bool:
        return self.activations is not None

    # ---- batches ------------------------------------------------------------------------------
    def loader(self, cases: Sequence, plans: list[BatchPlan]):
        """``(batch, meta)`` per plan; reading / preprocessing / augmentation run in the workers."""
        return batch_loader(self.batcher, cases, plans, self.workers, pin_memory=self.device.type == "cuda")

    def to_device(self, x):
        """A tensor, or a dict of them, on the runtime's device (non-blocking from pinned memory)."""
        if isinstance(x, dict):
            return {k: self.to_device(v) for k, v in x.items()}
        if isinstance(x, torch.Tensor):
            return x.to(self.device, non_blocking=True)
        return x

    # ---- forward ------------------------------------------------------------------------------
    def frozen_per_case(self, slices: dict, masks: dict) -> tuple[list[dict], float]:
        """Per case of a padded batch: stream -> the cached (or now computed) frozen activations of
        that case's own slices (CPU), and the seconds spent computing the misses."""
        per_case, secs = [dict() for _ in range(next(iter(masks.values())).shape[0])], 0.0
        for s, x in slices.items():
            for i, m in enumerate(masks[s]):
                if bool(m.any()):
                    acts, sec = self.activations.activations(s, x[i][m], with_seconds=True, device=self.device)
                    secs += sec
                    per_case[i][s] = acts
        return per_case, secs

    def forward(self, batch: Batch, keep_patches: bool = False,
                subset: tuple[int, torch.Generator] | None = None) -> ModelOutput:
        """A :class:`Batch` on the device (gradients flow where the caller allows them).

        ``subset=(k, generator)``: use at most k random slices per case and stream (training); with
        cached activations the subset is drawn after the cache lookup, so the cache still hits.

        A plugin with ``spec.test_flips`` (evaluation mode only) is run on the slices flipped in-plane
        as listed and as they are; the output's probabilities are the mean of the passes' (its logits
        are the logits of that mean), its slice and view weights the mean of theirs. The unflipped pass
        runs last, so hooks (heatmaps) see the slices as they are."""
        flips = list(getattr(self.model.spec, "test_flips", None) or [])
        if not flips or self.model.training:
            return self._forward_once(batch, keep_patches, subset)
        outs = [self._forward_once(batch.replace(slices=flip_slices(batch.slices, f)), False, subset) for f in flips]
        outs.append(self._forward_once(batch, keep_patches, subset))
        return average_outputs(outs, self.model.spec.task_type)

    def _forward_once(self, batch: Batch, keep_patches: bool,
                      subset: tuple[int, torch.Generator] | None) -> ModelOutput:
        self.last_shared_s = 0.0
        slices, masks, present = batch.slices, batch.masks, batch.present
        if batch.from_trunk and self.activations is not None:
            per_case, self.last_shared_s = self.frozen_per_case(slices, masks)
            if subset is not None:
                per_case = slice_subset(per_case, *subset)
            acts, sub_masks, _ = collate(per_case, [s for s in self.model.streams if s in slices])
            if subset is not None:
                masks = sub_masks
            acts = {s: a.float() for s, a in self.to_device(acts).items()}
            masks, present = self.to_device(masks), self.to_device(present)
            if self.activations.cut == "embed":  # class embeddings: only pooling and head are left
                return self.model.pool_and_classify(acts, masks, present)
            return self.model(acts, masks, present, from_trunk=True, keep_patches=keep_patches)
        if subset is not None and masks:
            slices, masks, _ = collate(slice_subset(per_case_stacks(slices, masks), *subset),
                                       [s for s in self.model.streams if s in slices])
        return self.model(self.to_device(slices), self.to_device(masks), self.to_device(present),
                          keep_patches=keep_patches)

    @torch.no_grad()
    def fill_cache(self, cases: Sequence, batch_size: int = 8, progress: bool = False,
                   desc: str = "frozen trunk") -> float:
        """Compute (or read) the cached frozen activations of every case once, with a progress bar
        (training does this before its first epoch, so the epochs' ETA is the epochs' own). Returns
        the seconds spent computing cache misses."""
        if self.activations is None:
            return 0.0
        secs = 0.0
        it = self.loader(cases, eval_plans(len(cases), batch_size))
        for batch, _meta in tqdm(it, desc=desc, total=math.ceil(len(cases) / batch_size),
                                 disable=not progress, leave=False, unit="batch"):
            secs += self.frozen_per_case(batch.slices, batch.masks)[1]
        return secs

    # ---- prediction ---------------------------------------------------------------------------
    @torch.no_grad()
    def predict(self, cases: Sequence, batch_size: int = 4, progress: bool = False) -> tuple[np.ndarray, list[dict]]:
        """Probabilities (N, n_outputs) and per-case outputs of prepared cases (or :class:`Case`s, read
        by the loader's workers) without augmentation."""
        probs, outs = [], []
        for p, o in tqdm(self.predict_batches(cases, batch_size), desc="predict", disable=not progress, leave=False,
                         total=math.ceil(len(cases) / batch_size)):
            probs.append(p)
            outs += o
        return np.concatenate(probs), outs

    @torch.no_grad()
    def predict_batches(self, cases: Sequence, batch_size: int = 4):
        """``(probabilities (B, n_outputs), per-case outputs)`` per batch of ``cases``, in order, from one
        loader over all of them: its workers read and prepare the next batches while this one runs
        (streaming prediction writes each case as its batch arrives)."""
        model = self.model
        model.eval()
        for batch, meta in self.loader(cases, eval_plans(len(cases), batch_size)):
            out = self.forward(batch)
            yield model.probabilities(out.logits).float().cpu().numpy(), case_outputs(model.streams, out, batch, meta)


#: the dimensions of a (B, S, C, H, W) slice batch that each test-time flip reverses
FLIP_DIMS = {"w": (-1,), "h": (-2,), "hw": (-2, -1)}


def flip_slices(slices: dict, flip: str) -> dict:
    """Every stream's slices flipped in-plane (``flip`` in :data:`anymc3d.plugins.spec.TEST_FLIPS`)."""
    return {s: x.flip(FLIP_DIMS[flip]) for s, x in slices.items()}


def case_outputs(streams: list[str], out: ModelOutput, batch: Batch, meta: list[dict]) -> list[dict]:
    """Per case of a batch: slice weights of its real slices, view weights, which streams were present."""
    masks, present = batch.masks, batch.present
    sw = {s: w.float().cpu() for s, w in out.slice_weights.items() if s in masks}
    vw = out.view_weights.float().cpu()
    rows = []
    for j, m in enumerate(meta):
        rows.append({**m, "slice_weights": {s: w[j][masks[s][j]].tolist() for s, w in sw.items()},
                     "view_weights": {s: float(vw[j, k]) for k, s in enumerate(streams)},
                     "present": {s: bool(present[j, k]) for k, s in enumerate(streams)}})
    return rows


@torch.no_grad()
def frozen_embeddings(backbone, cases: Sequence, specs: dict, views: Sequence[str], device: str = "auto",
                      cache: ActivationCache | str | None = None, progress: bool = False, desc: str = "features",
                      batch_size: int = 4, workers: int = 0, amp: bool = False) -> tuple[list[list], float]:
    """Class embeddings of every slice of every case and stream (``input:view``) from the frozen
    backbone, through the activation cache (cut ``embed``). Returns ``rows`` (per case: one
    (S, D) float32 array per stream, or None where the input is missing) and the seconds the
    backbone took for the entries that had to be computed (stored with each entry, so a cache hit
    reports the original cost). ``amp=False`` (the default) keeps the features in fp32, as the
    frozen baselines have always been measured."""
    from ..plugins.lora import LoraSpec
    from ..plugins.model import AnyMC3D
    from ..plugins.spec import PluginSpec

    inputs = list(specs)
    spec = PluginSpec.for_task(None, {k: {**v.to_dict(), "views": list(views)} for k, v in specs.items()}, backbone,
                               task="frozen-features", task_type="binary", label_names=["0", "1"], inputs=inputs,
                               lora=LoraSpec(r=0))
    model = AnyMC3D(backbone, spec, autocast=amp)
    rt = Runtime(model, specs, device=device, amp=amp, cache=cache, cache_trunk=True, workers=workers)
    rows, secs = [], 0.0
    t0 = time.perf_counter()
    it = rt.loader(cases, eval_plans(len(cases), batch_size))
    for batch, _meta in tqdm(it, desc=desc, disable=not progress, leave=False):
        per_case, sec = rt.frozen_per_case(batch.slices, batch.masks)
        secs += sec
        rows += [[c[s].float().numpy() if s in c else None for s in model.streams] for c in per_case]
    return rows, (secs if secs > 0 else time.perf_counter() - t0)
