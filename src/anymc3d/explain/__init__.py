"""Interpretable 3D heatmaps in the input's own space, figures, and localisation scores.

``Explainer(model).explain(volume)`` -> :class:`Heatmaps` (one map per label on the input grid);
``localization_scores(map, mask)`` -> pointing game, energy in mask, voxel AUROC. CLI: ``anymc3d
explain`` and ``anymc3d predict --heatmaps``. See docs/heatmaps.md.
"""
from __future__ import annotations


from anymc3d._lazy import lazy_exports

# Exports load on first use, so `anymc3d --help` and other verbs do not import torch for this package.
_EXPORTS = {
    'METHODS': '.heatmap',
    'Explainer': '.heatmap',
    'Heatmaps': '.heatmap',
    'load_mask': '.localization',
    'SCORES': '.localization',
    'energy_in_mask': '.localization',
    'localization_scores': '.localization',
    'pointing_game': '.localization',
    'random_map': '.localization',
    'voxel_auroc': '.localization',
}

__getattr__ = lazy_exports(__name__, _EXPORTS)


__all__ = ["METHODS", "SCORES", "Explainer", "Heatmaps", "energy_in_mask", "load_mask", "localization_scores",
           "pointing_game", "random_map", "voxel_auroc"]
