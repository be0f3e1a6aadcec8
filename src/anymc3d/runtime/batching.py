"""Cases -> model inputs, the same code path for training, evaluation and prediction.

Each input of a case is read and canonicalised once (orientation, spacing, intensity) with the
plugin's saved preprocessing spec; augmentation (training only) acts on the canonical 3D array;
then every view is cut into slices and padded into a batch with a slice mask.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .data.cases import Case
from .errors import InputError
from .io import read_volume
from .preprocess import PreprocessSpec, canonicalize, canonicalize_mask, to_slices
from .volume import Volume


@dataclass
class PreparedCase:
    id: str
    arrays: dict[str, torch.Tensor]        # input -> canonical (C, X, Y, Z) float32; missing inputs are absent
    records: dict[str, object]             # input -> SpatialRecord (to map outputs back to the input grid)
    label: torch.Tensor | None
    mask: torch.Tensor | None = None       # canonical (1, X, Y, Z) of the first input, or None
    sources: dict[str, str] = field(default_factory=dict)


def _as_volume(item: Volume | Path | str) -> Volume:
    return item if isinstance(item, Volume) else read_volume(item)


def prepare_case(case: Case, specs: dict[str, PreprocessSpec]) -> PreparedCase:
    arrays, records, sources = {}, {}, {}
    for name, spec in specs.items():
        item = case.images.get(name)
        if item is None:
            continue
        vol = _as_volume(item)
        arr, rec = canonicalize(vol, spec)
        arrays[name] = torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32))
        records[name] = rec
        sources[name] = vol.source
    if not arrays:
        raise InputError(f"case {case.id}: none of the inputs {list(specs)} is present")
    mask = None
    if case.mask is not None:
        first = next(iter(arrays))
        mvol = _as_volume(case.mask)
        m = canonicalize_mask(mvol, specs[first], records[first])
        mask = torch.from_numpy(np.ascontiguousarray(m)).to(torch.float32)[None]
    label = torch.from_numpy(case.label) if case.label is not None else None
    return PreparedCase(case.id, arrays, records, label, mask, sources)


def slice_streams(case: PreparedCase, specs: dict[str, PreprocessSpec], streams: list[str],
                  arrays: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """stream 'input:view' -> (S, C, size, size) slices for the inputs this case has."""
    arrays = arrays if arrays is not None else case.arrays
    out = {}
    for s in streams:
        inp, view = s.split(":")
        if inp in arrays:
            out[s] = to_slices(arrays[inp], specs[inp], view)
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
        batch = torch.zeros(b, n, *ref.shape[1:])
        m = torch.zeros(b, n, dtype=torch.bool)
        for i, x in enumerate(stacks):
            if x is not None:
                batch[i, : x.shape[0]] = x
                m[i, : x.shape[0]] = True
                present[i, j] = True
        slices[s], masks[s] = batch, m
    return slices, masks, present
