"""anymc3d: 3D medical volume classification with one frozen 2D foundation model and small plugins."""
from __future__ import annotations

__version__ = "0.1.0"


def load(plugin, weights=None):
    """Load a trained plugin onto its backbone: ``anymc3d.load("runs/task").predict("scan.nii.gz")``."""
    from .predict import load as _load

    return _load(plugin, weights=weights)


__all__ = ["__version__", "load"]
