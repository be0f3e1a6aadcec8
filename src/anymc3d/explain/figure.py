"""PNG figure: the k most-weighted slices with the heatmap overlaid, plus the slice-weight curve.

Slices are shown on the canonical (RAS) grid the model saw, from the view with the largest view
weight (the only view for single-view plugins): axial slices with x (patient right -> left)
horizontal and y (posterior -> anterior) up; coronal x horizontal, z up; sagittal y horizontal,
z up. A mask, when given, is outlined in white.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from ..io import atomic_write
from ..preprocess import VIEW_AXIS

_AXES_LABELS = {"axial": ("x (R→L)", "y (P→A)"), "coronal": ("x (R→L)", "z (I→S)"), "sagittal": ("y (P→A)", "z (I→S)")}


def _take(arr: np.ndarray, axis: int, index: int) -> np.ndarray:
    return np.take(arr, index, axis=axis).T  # rows -> vertical after transpose, origin lower


def heatmap_figure(hm, label: str, path: str | Path, top_k: int = 6, mask: np.ndarray | None = None) -> Path:
    """Write the figure for one label of a :class:`~anymc3d.explain.heatmap.Heatmaps`; returns the path."""
    ref = hm.reference_input
    streams = [s for s in hm.slice_weights if s.split(":")[0] == ref] or list(hm.slice_weights)
    stream = max(streams, key=lambda s: hm.view_weights.get(s, 0.0))
    view = stream.split(":")[1]
    axis = VIEW_AXIS[view]
    image = hm.canonical_image[0]
    heat = hm.canonical[label]
    weights = hm.label_slice_weights[label][stream]
    n_can = image.shape[axis]
    # "most weighted" = the slices carrying most of the heatmap (slice weight x that slice's map)
    mass = heat.sum(axis=tuple(a for a in range(3) if a != axis))
    k = max(1, min(top_k, n_can, int((mass > 0).sum()) or 1))
    picks = sorted(int(i) for i in np.argsort(-mass, kind="stable")[:k])
    cmask = None
    if mask is not None:
        from .localization import canonical_mask

        cmask = canonical_mask(mask, hm.record)

    ncol = len(picks)
    fig = Figure(figsize=(max(2.1 * ncol, 6.0), 4.6), dpi=110)
    FigureCanvasAgg(fig)
    gs = fig.add_gridspec(2, ncol, height_ratios=[2.0, 1.0], hspace=0.3, left=0.07, right=0.98, top=0.88, bottom=0.1)
    vmax = float(heat.max()) or 1.0
    lo, hi = np.percentile(image, [0.5, 99.5])
    for j, idx in enumerate(picks):
        ax = fig.add_subplot(gs[0, j])
        ax.imshow(_take(image, axis, idx), cmap="gray", origin="lower", vmin=lo, vmax=hi if hi > lo else lo + 1)
        h = _take(heat, axis, idx)
        ax.imshow(h, cmap="jet", origin="lower", vmin=0, vmax=vmax, alpha=np.clip(h / vmax, 0, 1) * 0.6)
        if cmask is not None:
            m = _take(cmask, axis, idx)
            if m.any():
                ax.contour(m.astype(float), levels=[0.5], colors="white", linewidths=0.8, origin="lower")
        ax.set_title(f"{view} {idx}", fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])
        if j == 0:
            ax.set_xlabel(_AXES_LABELS[view][0], fontsize=7)
            ax.set_ylabel(_AXES_LABELS[view][1], fontsize=7)
    ax = fig.add_subplot(gs[1, :])
    for s in streams:
        a = hm.slice_weights[s]
        ax.plot(np.arange(len(a)), a, lw=1.2, label=f"a_s {s}")
    if not np.allclose(weights, hm.slice_weights[stream]):
        ax.plot(np.arange(len(weights)), weights, lw=1.0, ls="--", label=f"weight for {label}")
    if mass.sum() > 0:  # heatmap mass per slice, on the same (stream) index axis, scaled to sum like a_s
        pos = (np.arange(n_can) + 0.5) * len(weights) / n_can - 0.5
        ax.plot(pos, mass / mass.sum() * (len(weights) / n_can), lw=1.0, color="tab:red", alpha=0.7,
                label="heatmap mass per slice")
    for idx in picks:
        ax.axvline((idx + 0.5) * len(weights) / n_can - 0.5, color="0.6", lw=0.6, ls=":")
    ax.set_xlabel("slice index (model's slice stack)", fontsize=8)
    ax.set_ylabel("slice weight", fontsize=8)
    ax.tick_params(labelsize=7)
    ax.ticklabel_format(axis="y", useOffset=False)
    ax.legend(fontsize=7, loc="upper right")
    p = hm.probabilities.get(label)
    fig.suptitle(f"{hm.id} — {label}" + (f" (p={p:.3f})" if p is not None else "") + f" — {hm.method}", fontsize=9)
    path = Path(path)
    with atomic_write(path) as tmp:
        fig.savefig(str(tmp), format="png")
    return path
