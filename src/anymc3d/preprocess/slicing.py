"""Canonical (C,X,Y,Z) volume <-> per-view square slice stacks, and the exact inverse.

On the RAS canonical grid: axial slices along z (each slice has rows = x, columns = y),
coronal along y (rows = x, columns = z), sagittal along x (rows = y, columns = z).
Each slice is zero-padded to a centred square and resized to ``size``; if the view has more than
``max_slices`` slices the slice axis is linearly resampled (align_corners=False) to max_slices.
"""
from __future__ import annotations

from typing import Union

import numpy as np
import torch
import torch.nn.functional as F

from anymc3d.io.allocation import check_allocation
from anymc3d.preprocess.spatial import SpatialRecord
from anymc3d.preprocess.spec import VIEW_AXIS, VIEWS, PreprocessSpec

# (S, C, H, W) <- (C, X, Y, Z)
_FORWARD_PERM = {"axial": (3, 0, 1, 2), "coronal": (2, 0, 1, 3), "sagittal": (1, 0, 2, 3)}
# (X, Y, Z) <- (S, H, W)
_BACKWARD_PERM = {"axial": (1, 2, 0), "coronal": (1, 0, 2), "sagittal": (0, 1, 2)}


def _check_view(view: str) -> None:
    if view not in VIEWS:
        raise ValueError(f"view must be one of {VIEWS}, got {view!r}")


def _torch_mode(mode: str, dims: int) -> str:
    if mode in ("nearest", "nearest-exact"):
        return "nearest-exact"
    if mode in ("linear", "bilinear"):
        return "linear" if dims == 1 else "bilinear"
    raise ValueError(f"mode must be 'bilinear' or 'nearest', got {mode!r}")


def _resize_slice_axis(x: torch.Tensor, n: int, mode: str) -> torch.Tensor:
    """Resample dim 0 of (S, ...) to n slices."""
    s, rest = x.shape[0], x.shape[1:]
    flat = x.reshape(s, -1).transpose(0, 1).unsqueeze(0)  # (1, rest, S)
    kw = {"align_corners": False} if _torch_mode(mode, 1) == "linear" else {}
    flat = F.interpolate(flat, size=n, mode=_torch_mode(mode, 1), **kw)
    return flat.squeeze(0).transpose(0, 1).reshape(n, *rest)


def _resize_2d(x: torch.Tensor, size: int, mode: str) -> torch.Tensor:
    """(N, C, H, W) square -> (N, C, size, size); antialiased when shrinking bilinearly."""
    if x.shape[-1] == size and x.shape[-2] == size:
        return x
    m = _torch_mode(mode, 2)
    if m == "bilinear":
        return F.interpolate(x, size=(size, size), mode=m, align_corners=False, antialias=x.shape[-1] > size)
    return F.interpolate(x, size=(size, size), mode=m)


def _pad_amounts(h: int, w: int) -> tuple[int, int, int]:
    m = max(h, w)
    return m, (m - h) // 2, (m - w) // 2


def slice_allocation(spec: PreprocessSpec, view: str, canonical_shape, channels: int = 1) -> tuple[int, int, int, int]:
    """The largest tensor ``to_slices`` allocates for one view: (slices after max_slices, channels, side, side),
    side = the larger of the zero-padded square (the longer in-plane axis) and ``spec.size``."""
    shape = tuple(int(v) for v in canonical_shape)
    axis = VIEW_AXIS[view]
    h, w = (shape[a] for a in range(3) if a != axis)
    side = max(h, w, spec.size)
    return n_slices(spec, view, shape), max(1, int(channels)), side, side


def check_slices(spec: PreprocessSpec, canonical_shape, channels: int = 1, source="<array>",
                 views=None) -> None:
    """The allocation guard for every view's slice stack (max_slices counted), before any slice is cut."""
    for view in (views or spec.views):
        _check_view(view)
        check_allocation(source, slice_allocation(spec, view, canonical_shape, channels),
                         f"its {view} slices (slices x channels x side x side, zero-padded to a square and resized "
                         f"to {spec.size}) make")


def neighbour_channels(x: torch.Tensor) -> torch.Tensor:
    """(S, 1, H, W) -> (S, 3, H, W): slice i's channels are slices i-1, i and i+1 (the ends repeat)."""
    idx = torch.arange(x.shape[0], device=x.device)
    lo, hi = (idx - 1).clamp(min=0), (idx + 1).clamp(max=x.shape[0] - 1)
    return torch.cat([x[lo], x, x[hi]], dim=1)


def to_slices(
    array_cxyz: Union[np.ndarray, torch.Tensor], spec: PreprocessSpec, view: str, mode: str = "bilinear",
    source="<array>",
) -> torch.Tensor:
    """Cut a canonical (C,X,Y,Z) volume (numpy or torch, any device) into (S, C, size, size) slices.

    A 3D (X,Y,Z) input is treated as one channel. ``mode="nearest"`` for masks/labels (never 2.5D).
    With ``spec.neighbours`` a one-channel image gives (S, 3, size, size): each slice with its two
    neighbours along the view's axis (after ``max_slices``), as the three channels.
    Works on torch tensors so augmentation can run between ``canonicalize`` and here.
    The stack is checked against ``--max-voxels`` first (:func:`check_slices`; ``source`` names the file).
    """
    _check_view(view)
    x = torch.as_tensor(array_cxyz) if not isinstance(array_cxyz, torch.Tensor) else array_cxyz
    if x.ndim == 3:
        x = x.unsqueeze(0)
    if x.ndim != 4:
        raise ValueError(f"to_slices expects (C,X,Y,Z) or (X,Y,Z), got shape {tuple(x.shape)}")
    neighbours = spec.neighbours and mode != "nearest" and x.shape[0] == 1
    check_slices(spec, tuple(x.shape[1:]), 3 if neighbours else int(x.shape[0]), source, views=[view])
    if not x.is_floating_point():
        x = x.float()
    x = x.permute(*_FORWARD_PERM[view])  # (S, C, H, W)
    if spec.max_slices is not None and x.shape[0] > spec.max_slices:
        x = _resize_slice_axis(x, spec.max_slices, mode)
    if neighbours:
        x = neighbour_channels(x)
    h, w = x.shape[-2:]
    m, top, left = _pad_amounts(h, w)
    if (h, w) != (m, m):
        x = F.pad(x, (left, m - w - left, top, m - h - top))
    return _resize_2d(x.contiguous(), spec.size, mode)


def n_slices(spec: PreprocessSpec, view: str, canonical_shape: tuple[int, int, int]) -> int:
    """How many slices ``to_slices`` yields for this view (after max_slices)."""
    s = int(canonical_shape[VIEW_AXIS[view]])
    return min(s, spec.max_slices) if spec.max_slices is not None else s


def slices_to_canonical(
    maps: Union[np.ndarray, torch.Tensor], spec: PreprocessSpec, view: str, record: SpatialRecord, mode: str = "bilinear"
) -> np.ndarray:
    """Invert ``to_slices`` for per-slice maps (S, size, size): resize back, unpad, undo max_slices.

    Returns float32 (X, Y, Z) on the canonical grid (``record.canonical_shape``); feed it to
    ``canonical_to_input`` to reach the input's own grid.
    """
    _check_view(view)
    x = torch.as_tensor(maps) if not isinstance(maps, torch.Tensor) else maps
    x = x.detach().to("cpu", torch.float32)
    shape = tuple(int(v) for v in record.canonical_shape)
    axis = VIEW_AXIS[view]
    in_plane = [shape[a] for a in range(3) if a != axis]
    h, w = in_plane
    check_slices(spec, shape, 1, record.input_path, views=[view])  # the maps are upsampled to the padded square
    expected = (n_slices(spec, view, shape), spec.size, spec.size)
    if tuple(x.shape) != expected:
        raise ValueError(f"slices_to_canonical: maps shape {tuple(x.shape)} != expected {expected} for view {view}")
    m, top, left = _pad_amounts(h, w)
    x = x.unsqueeze(1)  # (S, 1, size, size)
    if spec.size != m:
        tm = _torch_mode(mode, 2)
        if tm == "bilinear":
            x = F.interpolate(x, size=(m, m), mode=tm, align_corners=False, antialias=spec.size > m)
        else:
            x = F.interpolate(x, size=(m, m), mode=tm)
    x = x[:, 0, top : top + h, left : left + w]
    if x.shape[0] != shape[axis]:
        x = _resize_slice_axis(x, shape[axis], mode)
    return np.ascontiguousarray(x.permute(*_BACKWARD_PERM[view]).numpy(), dtype=np.float32)
