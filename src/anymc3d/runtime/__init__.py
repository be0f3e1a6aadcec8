"""The runtime: batching (Dataset/DataLoader workers), device, the backbone pass, results, the activation cache.

Every verb reaches the model through here; nothing else slices, chunks or forwards.
"""
from __future__ import annotations

from anymc3d._lazy import lazy_exports

_EXPORTS = {
    "ActivationCache": ".cache",
    "PluginActivations": ".cache",
    "Batch": ".batching",
    "Batcher": ".batching",
    "BatchPlan": ".batching",
    "PreparedCase": ".batching",
    "collate": ".batching",
    "prepare_case": ".batching",
    "slice_streams": ".batching",
    "Runtime": ".engine",
    "frozen_embeddings": ".engine",
    "resolve_device": ".device",
    "volume_result": ".results",
}

__getattr__ = lazy_exports(__name__, _EXPORTS)

__all__ = sorted(_EXPORTS)
