"""Train any AnyMC3D-like model in the plugin's harness (splits, preprocessing, augmentation,
trainer, validation threshold policy, metrics) -- for the ablations and baselines whose model is not the
stock plugin: other slice aggregations, a fine-tuned backbone + slice transformer, 3D CNNs.

:func:`train_model` mirrors :func:`anymc3d.training.run.train_plugin` step for step, except
that the model comes from a ``build(task, prepared_train_case) -> (model, specs)`` callable and
no plugin file is written (only ``metrics.json``).
"""
from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Callable

from ..backbones import create_backbone
from ..data import TaskData, load_data
from ..io import write_json
from ..plugins import LoraSpec, PluginSpec
from ..plugins.embed_norm import resolve_embed_norm
from ..preprocess import PreprocessOptions
from ..runtime.batching import prepare_case
from ..runtime.engine import Runtime
from ..training.run import assign_splits, headline, prepare_all, score_splits, subsample
from ..training.distributed import is_main
from ..training.trainer import TrainConfig, fit, seed_everything
from .aggregators import AggregatorAnyMC3D
from .cnn3d import Volume3DClassifier


def train_model(data, build: Callable, out: str | Path, config: TrainConfig | None = None,
                train_fraction: float = 1.0, threshold: str | float = "youden", specs_for: Callable | None = None,
                resume: bool = False, log=print) -> dict:
    t_start = time.time()
    out = Path(out)
    cfg = config or TrainConfig()
    task = data if isinstance(data, TaskData) else load_data(data)
    splits = assign_splits(task, cfg.seed)
    splits["train"] = subsample(splits["train"], train_fraction, task.task_type, cfg.seed)
    specs = specs_for(task)
    seed_everything(cfg.seed)
    model = build(task, specs)
    if "cache_trunk" in TrainConfig.__dataclass_fields__ and cfg.cache_trunk and (
            isinstance(model, Volume3DClassifier) or getattr(model, "finetune_backbone", False)
            or model.spec.lora.r == 0):
        # the trainer's frozen-activation cache assumes the stock plugin on a frozen trunk: a fine-tuned
        # backbone, a 3D CNN, or another pooling on the whole frozen backbone must not read it
        cfg = dataclasses.replace(cfg, cache_trunk=False)
    n_params = model.n_trainable()
    log(f"  trainable parameters: {n_params:,}; cases: train {len(splits['train'])}, val {len(splits['val'])}, "
        f"test {len(splits['test'])}")
    prepared = {k: prepare_all(v, specs, k, cfg.progress) for k, v in splits.items()}
    summary = fit(model, specs, prepared["train"], prepared["val"], cfg, out, resume=resume)
    if not is_main():  # torchrun: rank 0 alone scores the splits and writes the metrics
        return {"rank_summary": summary}
    thr, results = score_splits(model, Runtime(model, specs, device=cfg.device), prepared, splits, task,
                                cfg.batch_size, threshold)
    metrics = {"task": task.name, "task_type": task.task_type, "threshold": thr, "trainable_params": n_params,
               "train_wall_s": summary["train_wall_s"], "total_wall_s": round(time.time() - t_start, 2),
               "epochs_run": summary["epochs_run"], "best_epoch": summary["best_epoch"], "n_train": len(splits["train"]),
               "splits": {k: len(v) for k, v in splits.items()}, **results, "history": summary["history"],
               "config": summary["config"]}
    metrics.update(headline(results))
    write_json(metrics, out / "metrics.json")
    return metrics


def _spec(task: TaskData, specs: dict, backbone_name: str, fingerprint: str, input_size: int,
          lora: LoraSpec, head_dropout: float = 0.2, embed_norm: str = "none") -> PluginSpec:
    return PluginSpec(task=task.name, task_type=task.task_type, label_names=task.label_names, inputs=task.inputs,
                      preprocess={k: v.to_dict() for k, v in specs.items()}, backbone=backbone_name,
                      backbone_fingerprint=fingerprint, input_size=input_size, lora=lora, head_dropout=head_dropout,
                      embed_norm=embed_norm)


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

    return train_model(data, build, out, config, train_fraction, specs_for=specs_for, resume=resume, log=log)


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

    return train_model(data, build, out, config, train_fraction, specs_for=specs_for, resume=resume, log=log)
