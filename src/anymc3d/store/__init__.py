"""One backbone, many tasks: plugin store, predict-all with a shared trunk, activation cache."""

from anymc3d._lazy import lazy_exports

# Exports load on first use, so `anymc3d --help` and other verbs do not import torch for this package.
_EXPORTS = {
    'ActivationCache': '..runtime.cache',  # the one activation cache lives in the runtime
    'MultiPredictor': '.multi',
    'PluginStore': '.store',
    'describe': '.store',
}

__getattr__ = lazy_exports(__name__, _EXPORTS)


__all__ = ["ActivationCache", "MultiPredictor", "PluginStore", "describe"]
