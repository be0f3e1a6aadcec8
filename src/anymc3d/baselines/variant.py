"""Train any AnyMC3D-like model in the plugin's harness (splits, preprocessing, augmentation,
trainer, validation threshold policy, metrics) -- for the ablations and baselines whose model is not the
stock plugin: other slice aggregations, a fine-tuned backbone + slice transformer, 3D CNNs.

Both run :func:`anymc3d.training.run.run_training`, the harness of
:func:`~anymc3d.training.run.train_plugin`, with their own ``specs_for(task)`` and
``build(task, specs) -> model`` hooks; no plugin file is written (only ``metrics.json``).
"""
from __future__ import annotations

import dataclasses

from ..backbones import create_backbone
from ..data import TaskData
from ..plugins import LoraSpec, PluginSpec
from ..plugins.embed_norm import resolve_embed_norm
from ..preprocess import PreprocessOptions
from ..runtime.batching import prepare_case
from ..training.run import run_training
from ..training.trainer import TrainConfig
from .aggregators import AggregatorAnyMC3D
from .cnn3d import Volume3DClassifier


def without_trunk_cache(cfg: TrainConfig | None) -> TrainConfig:
    """``cfg`` with ``cache_trunk`` off: the trainer's frozen-activation cache assumes the stock plugin on a
    frozen trunk, so a fine-tuned backbone, a 3D CNN, or another pooling on the whole frozen backbone
    (LoRA r=0) must not read it."""
    return dataclasses.replace(cfg or TrainConfig(), cache_trunk=False)


def _spec(task: TaskData, specs: dict, backbone_name: str, fingerprint: str, input_size: int,
          lora: LoraSpec, head_dropout: float = 0.2, embed_norm: str = "none") -> PluginSpec:
    return PluginSpec.for_task(task, specs, None, backbone=backbone_name, backbone_fingerprint=fingerprint,
                               input_size=input_size, lora=lora, head_dropout=head_dropout, embed_norm=embed_norm)


def train_aggregator_plugin(data, backbone: str, out, pooling: str = "attention", weights: str | None = None,
                            preprocess: PreprocessOptions | None = None, lora: LoraSpec | None = None,
                            config: TrainConfig | None = None, train_fraction: float = 1.0,
                            finetune_backbone: bool = False, pool_kw: dict | None = None, resume: bool = False,
                            log=print) -> dict:
    """The plugin with another slice aggregation (and optionally the full backbone fine-tuned)."""
    pre = preprocess or PreprocessOptions()
    bb = create_backbone(backbone, weights=weights, input_size=pre.size)
    lora = lora or LoraSpec()

    def specs_for(task):
        return {inp: pre.spec_for(task, bb.input_size) for inp in task.inputs}

    def build(task, specs):
        spec = _spec(task, specs, bb.name, bb.fingerprint, bb.input_size, lora,
                     embed_norm=resolve_embed_norm((config or TrainConfig()).embed_norm, bb))
        return AggregatorAnyMC3D(bb, spec, pooling=pooling, pool_kw=pool_kw, finetune_backbone=finetune_backbone)

    cfg = without_trunk_cache(config) if finetune_backbone or lora.r == 0 else config
    return run_training(data, out, specs_for, build, cfg, train_fraction, resume=resume, log=log)


def train_cnn3d(data, arch: str, out, config: TrainConfig | None = None, train_fraction: float = 1.0,
                intensity: str | None = None, resume: bool = False, log=print) -> dict:
    """MONAI 3D CNN from scratch on the canonical volume (axial slices at native in-plane size, restacked)."""
    task_cache: dict = {}

    def specs_for(task):
        probe = PreprocessOptions(views=["axial"], intensity=intensity)
        specs = {inp: probe.spec_for(task, 32) for inp in task.inputs}
        first = next(c for c in task.cases if c.label is not None)
        pc = prepare_case(first, specs)
        arr = next(iter(pc.arrays.values()))
        side = int(max(arr.shape[1], arr.shape[2]))
        task_cache["channels"] = int(sum(a.shape[0] for a in pc.arrays.values()))
        pre = PreprocessOptions(views=["axial"], size=side, intensity=intensity)
        return {inp: pre.spec_for(task, side) for inp in task.inputs}

    def build(task, specs):
        side = next(iter(specs.values())).size
        spec = _spec(task, specs, f"monai_{arch}_3d", "", side, LoraSpec(r=0))
        return Volume3DClassifier(spec, arch, task_cache["channels"])

    return run_training(data, out, specs_for, build, without_trunk_cache(config), train_fraction, resume=resume,
                        log=log)
