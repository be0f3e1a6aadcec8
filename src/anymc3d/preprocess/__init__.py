"""Preprocessing: a saved spec (no train/inference drift) and an invertible volume -> slices path."""
from __future__ import annotations

from anymc3d.preprocess.intensity import apply_intensity
from anymc3d.preprocess.pipeline import canonicalize, canonicalize_mask, plan_volume
from anymc3d.preprocess.slicing import check_slices, n_slices, slice_allocation, slices_to_canonical, to_slices
from anymc3d.preprocess.spatial import SpatialRecord, apply_spatial, canonical_to_input, plan_spatial
from anymc3d.preprocess.spec import (
    DEFAULT_CT_WINDOWS,
    INTENSITY_MODES,
    VIEW_AXIS,
    VIEWS,
    WINDOW_PRESETS,
    PreprocessOptions,
    PreprocessSpec,
)

__all__ = [
    "DEFAULT_CT_WINDOWS",
    "INTENSITY_MODES",
    "VIEWS",
    "VIEW_AXIS",
    "WINDOW_PRESETS",
    "PreprocessOptions",
    "PreprocessSpec",
    "SpatialRecord",
    "apply_intensity",
    "apply_spatial",
    "canonical_to_input",
    "canonicalize",
    "canonicalize_mask",
    "check_slices",
    "n_slices",
    "plan_spatial",
    "plan_volume",
    "slice_allocation",
    "slices_to_canonical",
    "to_slices",
]
