"""Cases -> batches: the same code path for training, evaluation, prediction and heatmaps.

Each input of a case is read and canonicalised once (orientation, spacing, intensity) with the
plugin's saved preprocessing spec (:func:`prepare_case`); augmentation (training only) acts on the
canonical 3D array; then every view is cut into slices and padded into a batch with a slice mask
(:class:`Batcher`). :func:`batch_loader` runs that work in a ``torch.utils.data.DataLoader``:
worker processes (``workers > 0``) do the reading, preprocessing, 3D augmentation and slicing,
with pinned memory when the model sits on CUDA. Every batch is fully determined by its cases and
its augmentation seed, so any number of workers gives the same batches as none.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from ..data.cases import Case
from ..errors import InputError
from ..io import read_volume
from ..preprocess import PreprocessSpec, canonicalize, canonicalize_mask, to_slices
from ..preprocess.augment import build_augmentation
from ..volume import Volume


@dataclass
class PreparedCase:
    id: str
    arrays: dict[str, torch.Tensor]        # input -> canonical (C, X, Y, Z) float32; missing inputs are absent
    records: dict[str, object]             # input -> SpatialRecord (to map outputs back to the input grid)
    label: torch.Tensor | None
    mask: torch.Tensor | None = None       # canonical (1, X, Y, Z) of the first input, or None
    sources: dict[str, str] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)  # reader warnings (constant volume, several series, ...)


#: the volume flips of the cached augmented copies, in order (dims of a canonical (C, X, Y, Z) array)
FLIP_COPIES = ((1,), (2,), (3,), (1, 2), (1, 3), (2, 3), (1, 2, 3))


def flip_case(case: PreparedCase, dims: tuple[int, ...]) -> PreparedCase:
    """A copy of a prepared case with every input (and the mask) flipped along the canonical spatial
    ``dims``: an augmented view of the volume whose frozen trunk can be cached like the original's."""
    tag = "".join("xyz"[d - 1] for d in dims)
    return PreparedCase(f"{case.id}~flip{tag}", {k: a.flip(dims) for k, a in case.arrays.items()}, case.records,
                        case.label, None if case.mask is None else case.mask.flip(dims), case.sources, case.warnings)


def _as_volume(item: Volume | Path | str) -> Volume:
    return item if isinstance(item, Volume) else read_volume(item)


def prepare_case(case: Case, specs: dict[str, PreprocessSpec], memo: dict | None = None) -> PreparedCase:
    """Read and canonicalise every input of ``case``. ``memo`` (a dict kept by the caller for one
    volume) shares reading and canonicalisation between plugins with the same preprocessing."""
    memo = {} if memo is None else memo
    arrays, records, sources, warns = {}, {}, {}, []
    for name, spec in specs.items():
        item = case.images.get(name)
        if item is None:
            continue
        vkey = ("volume", id(item) if isinstance(item, Volume) else str(Path(item).resolve()))
        if vkey not in memo:
            memo[vkey] = _as_volume(item)
        vol = memo[vkey]
        ckey = (vkey, spec.canonical_key())
        if ckey not in memo:
            arr, rec = canonicalize(vol, spec)
            memo[ckey] = (torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32)), rec)
        arr, rec = memo[ckey]
        if arr.shape[0] not in (1, 3):
            raise InputError(f"{vol.source}: {arr.shape[0]} channels after preprocessing (input {name}); the 2D "
                             "backbones take 1 (grey) or 3 (e.g. three CT windows of a grey volume)")
        arrays[name], records[name], sources[name] = arr, rec, vol.source
        warns += [w for w in (vol.meta or {}).get("warnings", []) if w not in warns]
    if not arrays:
        raise InputError(f"case {case.id}: none of the inputs {list(specs)} is present")
    mask = None
    if case.mask is not None:
        first = next(iter(arrays))
        mvol = _as_volume(case.mask)
        m = canonicalize_mask(mvol, specs[first], records[first])
        mask = torch.from_numpy(np.ascontiguousarray(m)).to(torch.float32)[None]
    label = torch.from_numpy(case.label) if case.label is not None else None
    return PreparedCase(case.id, arrays, records, label, mask, sources, warns)


def slice_streams(case: PreparedCase, specs: dict[str, PreprocessSpec], streams: list[str],
                  arrays: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """stream 'input:view' -> (S, C, size, size) slices for the inputs this case has."""
    arrays = arrays if arrays is not None else case.arrays
    out = {}
    for s in streams:
        inp, view = s.split(":")
        if inp in arrays:
            out[s] = to_slices(arrays[inp], specs[inp], view, source=case.sources.get(inp, "<array>"))
    return out


def collate(per_case: list[dict[str, torch.Tensor]], streams: list[str]):
    """Pad slice stacks to the batch's longest stack. Returns slices, slice masks and stream presence."""
    b = len(per_case)
    slices, masks = {}, {}
    present = torch.zeros(b, len(streams), dtype=torch.bool)
    for j, s in enumerate(streams):
        stacks = [c.get(s) for c in per_case]
        ref = next((x for x in stacks if x is not None), None)
        if ref is None:
            continue
        n = max(x.shape[0] for x in stacks if x is not None)
        batch = torch.zeros(b, n, *ref.shape[1:], dtype=ref.dtype)
        m = torch.zeros(b, n, dtype=torch.bool)
        for i, x in enumerate(stacks):
            if x is not None:
                batch[i, : x.shape[0]] = x
                m[i, : x.shape[0]] = True
                present[i, j] = True
        slices[s], masks[s] = batch, m
    return slices, masks, present


def per_case_stacks(slices: dict[str, torch.Tensor], masks: dict[str, torch.Tensor]) -> list[dict[str, torch.Tensor]]:
    """A padded batch back to its cases: per case, stream -> that case's own (real) slices."""
    b = next(iter(masks.values())).shape[0]
    return [{s: x[i][masks[s][i]] for s, x in slices.items() if bool(masks[s][i].any())} for i in range(b)]


def slice_subset(per_case: list[dict[str, torch.Tensor]], k: int, generator: torch.Generator) -> list[dict]:
    """At most ``k`` slices per case and stream, drawn at random (kept in their order). The task
    query pools a set of slices, so a random subset is a valid training view of the volume."""
    out = []
    for c in per_case:
        d = {}
        for s, t in c.items():
            if t.shape[0] > k:
                t = t[torch.randperm(t.shape[0], generator=generator)[:k].sort().values]
            d[s] = t
        out.append(d)
    return out


@dataclass
class Batch:
    """One padded batch of slices, as :class:`Batcher` builds it and :meth:`Runtime.forward` takes it.

    ``slices``: stream 'input:view' -> (B, S, C, size, size); ``masks``: stream -> (B, S) bool, True
    on real slices; ``present``: (B, n_streams) bool, which streams each case has; ``labels``: (B, ...)
    or None (prediction); ``from_trunk``: the batch may be served from the activation cache;
    ``seg_targets`` (mask batches only): stream -> (B, S, size, size) segmentation targets of the first
    input's streams, with ``has_mask`` (B,) saying which cases carry a mask."""

    slices: dict[str, torch.Tensor]
    masks: dict[str, torch.Tensor]
    present: torch.Tensor
    labels: torch.Tensor | None = None
    from_trunk: bool = False
    seg_targets: dict[str, torch.Tensor] | None = None
    has_mask: torch.Tensor | None = None

    @property
    def with_seg(self) -> bool:
        """Whether any case of the batch carries a mask (batches without one add no mask loss)."""
        return self.has_mask is not None and bool(self.has_mask.any())

    def pin_memory(self) -> "Batch":
        """The batch in pinned memory (the DataLoader calls this with ``pin_memory=True``)."""
        def pin(x):
            if isinstance(x, dict):
                return {k: pin(v) for k, v in x.items()}
            return x.pin_memory() if isinstance(x, torch.Tensor) else x
        return Batch(**{f.name: pin(getattr(self, f.name)) for f in dataclasses.fields(self)})

    def replace(self, **fields) -> "Batch":
        """A copy with ``fields`` replaced (e.g. flipped or perturbed slices)."""
        return dataclasses.replace(self, **fields)


class Batcher:
    """Turns prepared cases into :class:`Batch` es: CPU data work only.

    ``from_trunk`` says that the batch may be served from the activation cache (an un-augmented
    batch of a shared-trunk or pooling-only plugin with ``cache_trunk``); the slices are still the
    raw slices, and :class:`anymc3d.runtime.Runtime` turns them into cached activations."""

    def __init__(self, model, specs: dict[str, PreprocessSpec], cache_trunk: bool = False) -> None:
        self.specs, self.streams = specs, list(model.streams)
        self.first_input = model.spec.inputs[0]
        # pooling-only plugins (r=0): the "trunk" is the whole frozen backbone; its class embeddings are cached
        self.cache_trunk = cache_trunk and (model.last_k is not None or model.spec.lora.r == 0)
        self.trunk_patches = model.last_k is not None

    def augment(self, case: PreparedCase, seed: int) -> dict[str, torch.Tensor]:
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

    def batch(self, cases: list[PreparedCase], augment_seed: int | None = None, with_masks: bool = False) -> Batch:
        """The :class:`Batch` of ``cases`` (augmented with ``augment_seed``; with segmentation targets
        when ``with_masks``)."""
        # mask batches need the tail's patch tokens: a cached trunk (cut trunk:k) still gives them,
        # cached class embeddings (pooling-only plugins) do not
        from_trunk = self.cache_trunk and augment_seed is None and (not with_masks or self.trunk_patches)
        per_case, seg = [], []
        for i, c in enumerate(cases):
            arrays = self.augment(c, augment_seed + i) if augment_seed is not None else dict(c.arrays)
            mask = arrays.pop("mask", c.mask)
            per_case.append(slice_streams(c, self.specs, self.streams, arrays))
            if with_masks:
                seg.append(self._mask_slices(mask))
        slices, masks, present = collate(per_case, self.streams)
        labels = torch.stack([c.label for c in cases]) if cases[0].label is not None else None
        batch = Batch(slices, masks, present, labels, from_trunk)
        if not with_masks:
            return batch
        seg_streams = [s for s in self.streams if s.split(":")[0] == self.first_input]
        targets, _, _ = collate([{s: m[s] for s in seg_streams} if m else {} for m in seg], seg_streams)
        return batch.replace(seg_targets={s: t[:, :, 0] for s, t in targets.items()},
                             has_mask=torch.tensor([m is not None for m in seg]))

    def _mask_slices(self, mask: torch.Tensor | None) -> dict[str, torch.Tensor] | None:
        if mask is None:
            return None
        inp = self.first_input
        return {s: (to_slices(mask, self.specs[inp], s.split(":")[1], mode="nearest") > 0.5).float()
                for s in self.streams if s.split(":")[0] == inp}


@dataclass
class BatchPlan:
    """One batch to build: indices into the case list, its augmentation seed, and whether it carries masks."""

    indices: list[int]
    augment_seed: int | None = None
    with_masks: bool = False


class BatchDataset(Dataset):
    """Item i = the whole i-th batch of ``plans`` (cases read lazily when they are :class:`Case`)."""

    def __init__(self, batcher: Batcher, cases: Sequence, plans: list[BatchPlan],
                 specs: dict[str, PreprocessSpec] | None = None) -> None:
        self.batcher, self.cases, self.plans = batcher, cases, plans
        self.specs = specs or batcher.specs

    def __len__(self) -> int:
        return len(self.plans)

    def __getitem__(self, i: int):
        plan = self.plans[i]
        cases = [self.cases[j] for j in plan.indices]
        prepared = [c if isinstance(c, PreparedCase) else prepare_case(c, self.specs) for c in cases]
        out = self.batcher.batch(prepared, plan.augment_seed, with_masks=plan.with_masks)
        meta = [{"id": p.id, "sources": p.sources, "warnings": p.warnings} for p in prepared]
        return out, meta


def _identity(x):
    return x


def batch_loader(batcher: Batcher, cases: Sequence, plans: list[BatchPlan], workers: int = 0,
                 pin_memory: bool = False) -> DataLoader:
    """A DataLoader that yields ``(batch, meta)`` for each plan, in order (no shuffling here: the
    trainer's plans already hold the epoch's seeded order)."""
    kw = {"num_workers": workers, "pin_memory": pin_memory, "collate_fn": _identity, "batch_size": None}
    if workers > 0:
        kw["persistent_workers"] = False
        kw["prefetch_factor"] = 2
    return DataLoader(BatchDataset(batcher, cases, plans), **kw)


def eval_plans(n: int, batch_size: int) -> list[BatchPlan]:
    return [BatchPlan(list(range(i, min(n, i + batch_size)))) for i in range(0, n, batch_size)]
