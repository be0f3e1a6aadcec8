"""The adapted slice network as one frozen graph, for prediction on an inference engine.

Training keeps LoRA in torch (the adapters are what it differentiates). A trained plugin's slice
network is fixed, though: with each stream's LoRA merged into the weights it is a plain backbone,
which an engine can export whole like any frozen pass (cut ``embed``). That is the one path where a
full-depth plugin (LoRA in every block, no shared trunk: the GPU recipe) gets the engine at all on a
CPU, and where a shared-trunk plugin also gets its adapted tail onto it.

:class:`MergedSlices` is what :class:`~anymc3d.runtime.engine.Runtime` sets on a plugin for
prediction (``merge_lora=True``): per (member, stream) a merged copy of the backbone, made once and
dropped as soon as its runner is built; the runner comes from :func:`~anymc3d.runtime.engines.frozen_runner` like every frozen pass (so
``--engine auto`` keeps it only where it is faster than the plugin's own path on the first slices,
and any engine that differs from torch by more than the tolerance is not used). The copy's
fingerprint covers the frozen weights and the adapter's own tensors, so the export cache never
serves a graph of other LoRA weights. Heatmaps (patch tokens) and training never take this path.
"""
from __future__ import annotations

import copy

import torch

from ..backbones.base import tensors_fingerprint
from ..plugins.lora import activate, adapter_parameters


def adapter_fingerprint(backbone, name: str) -> str:
    """The fingerprint of the frozen weights and adapter ``name``'s tensors together."""
    return tensors_fingerprint(sorted(adapter_parameters(backbone.model, name).items()), seed=backbone.fingerprint)


def _sharing_memo(model, name: str) -> dict:
    """A ``copy.deepcopy`` memo that shares every tensor of ``model`` with the copy except the base
    weights adapter ``name`` is merged into: the copy then costs those layers alone, not a second
    backbone with every plugin's adapters (a store's shared backbone holds them all)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    changed = {id(t) for m in model.modules() if isinstance(m, BaseTunerLayer) and name in m.lora_A
               for t in m.get_base_layer().parameters()}
    return {id(t): t for t in (*model.parameters(), *model.buffers()) if id(t) not in changed}


@torch.no_grad()
def merge_in_place(model, name: str) -> None:
    """Merge adapter ``name`` into ``model``'s weights and replace every LoRA layer by its base layer
    (``model``'s own tensors change: call it on a copy)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = [(path, m) for path, m in model.named_modules() if isinstance(m, BaseTunerLayer)]
    for path, layer in layers:
        if name in layer.lora_A:
            layer.merge(adapter_names=[name])
        parent, _, child = path.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, layer.get_base_layer())


def merged_backbone(backbone, name: str):
    """A copy of ``backbone`` with adapter ``name`` merged into its weights and every LoRA layer
    replaced by its (merged) base layer: a plain frozen backbone computing what the adapted one does.
    Only the weights the merge changes are copied; every other tensor is the backbone's own (shared,
    never written)."""
    fingerprint = adapter_fingerprint(backbone, name)
    merged = copy.deepcopy(backbone, _sharing_memo(backbone.model, name))
    merge_in_place(merged.model, name)
    merged.fingerprint = fingerprint
    return merged.eval()


class MergedSlices:
    """``model.slice_engine``: (stream, slices) -> the engine's runner of that stream's merged slice
    network, or None (the plugin's own path). One per plugin model (ensemble members have their own).
    The runner is kept per (stream, slice shape, engine); the merged copy of the backbone is not (the
    runner holds its compiled graph), so a loaded plugin costs no second backbone in memory."""

    def __init__(self, model) -> None:
        self.model = model
        self.runners: dict[tuple, object] = {}

    def _torch_path(self, stream: str):
        """The plugin's own slice embeddings of ``stream`` (what ``auto`` times the engines against)."""
        def run(x: torch.Tensor) -> torch.Tensor:
            return self.model.embed_slices(stream, x, use_engine=False)[0]
        return run

    def __call__(self, stream: str, x: torch.Tensor):
        from .engines import current_engine, frozen_runner

        name = self.model.adapters.get(stream)
        engine = current_engine()
        if name is None or engine == "torch" or x.device.type != "cpu":
            return None  # nothing to merge for: the plugin's own path (no copy of the backbone is made)
        key = (stream, tuple(x.shape[1:]), engine)
        if key not in self.runners:
            merged = merged_backbone(self.model.backbone, name)
            try:
                # under auto the choice is silent: the plugin's own path is the fallback, and a note on every
                # prediction of a full-depth plugin would be noise; an engine the user named still says why not
                self.runners[key] = frozen_runner(merged, "embed", x, torch_path=self._torch_path(stream),
                                                  announce=engine != "auto")
            finally:
                activate(self.model.backbone.model, name)  # the reference pass may have moved the active adapter
        return self.runners[key]
