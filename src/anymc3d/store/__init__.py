"""One backbone, many tasks: plugin store, predict-all with a shared trunk, activation cache."""

# Exports load on first use, so `anymc3d --help` and other verbs do not import torch for this package.
_EXPORTS = {
    'ActivationCache': '.cache',
    'TrunkDiskCache': '.cache',
    'MultiPredictor': '.multi',
    'forward_from_embeddings': '.multi',
    'PluginStore': '.store',
    'describe': '.store',
}


def __getattr__(name: str):
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["ActivationCache", "MultiPredictor", "PluginStore", "TrunkDiskCache", "describe", "forward_from_embeddings"]
