"""anymc3d: 3D medical volume classification with one frozen 2D foundation model and small plugins."""
from __future__ import annotations

__version__ = "0.1.0"
