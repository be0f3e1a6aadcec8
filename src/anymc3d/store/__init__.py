"""One backbone, many tasks: plugin store, predict-all with a shared trunk, activation cache."""
from .cache import ActivationCache, TrunkDiskCache
from .multi import MultiPredictor, forward_from_embeddings
from .store import PluginStore, describe

__all__ = ["ActivationCache", "MultiPredictor", "PluginStore", "TrunkDiskCache", "describe", "forward_from_embeddings"]
