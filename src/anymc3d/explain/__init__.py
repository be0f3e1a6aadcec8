"""Interpretable 3D heatmaps in the input's own space, figures, and localisation scores.

``Explainer(model).explain(volume)`` -> :class:`Heatmaps` (one map per label on the input grid);
``localization_scores(map, mask)`` -> pointing game, energy in mask, voxel AUROC. CLI: ``anymc3d
explain`` and ``anymc3d predict --heatmaps``. See docs/heatmaps.md.
"""
from __future__ import annotations

from .heatmap import METHODS, Explainer, Heatmaps, load_mask
from .localization import SCORES, energy_in_mask, localization_scores, pointing_game, random_map, voxel_auroc

__all__ = ["METHODS", "SCORES", "Explainer", "Heatmaps", "energy_in_mask", "load_mask", "localization_scores",
           "pointing_game", "random_map", "voxel_auroc"]
