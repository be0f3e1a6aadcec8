"""`anymc3d train`: data -> preprocessing spec -> backbone + plugin -> fit -> plugin file + metrics.

:func:`run_training` is the one training harness: :func:`train_plugin` and the baselines
(:mod:`anymc3d.baselines.variant`) differ only in its hooks (the model's specs and build, and what
is written besides ``metrics.json``)."""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
from sklearn.model_selection import train_test_split
from tqdm.auto import tqdm

from .. import __version__
from ..backbones import create_backbone
from ..data import Case, TaskData, check_training_labels, load_data
from ..errors import InputError
from ..evaluation import compute_metrics
from ..evaluation.threshold import DEFAULT_POLICY, choose_threshold, youden_threshold  # noqa: F401  (re-exported)
from ..io import write_json
from ..plugins import LoraSpec, PluginSpec, save_plugin
from ..plugins.embed_norm import resolve_embed_norm
from ..plugins.model import AnyMC3D
from ..preprocess import PreprocessOptions, PreprocessSpec
from ..runtime.batching import PreparedCase, prepare_case
from ..runtime.engine import Runtime
from .distributed import is_main
from .trainer import TrainConfig, fit, make_runtime, metric_scores, seed_everything

__all__ = ["PreprocessOptions", "TrainedRun", "assign_splits", "run_training", "score_splits", "train_plugin",
           "youden_threshold"]


#: test volumes predicted without the trunk cache to time inference honestly (0: skip)
COLD_TIMING_VOLUMES = 16


def score_splits(model, runtime: Runtime, prepared: dict, splits: dict, task: TaskData, batch_size: int,
                 threshold: str | float = DEFAULT_POLICY) -> tuple[float, dict]:
    """Predict the val/test splits, pick the decision threshold on val (``threshold``: a policy of
    :mod:`anymc3d.evaluation.threshold`, or a number) and compute each split's metrics at it;
    ``acc_at_0.5`` keeps MedMNIST's ACC definition alongside."""
    scores, timing = {}, {}
    for split in ("val", "test"):
        if prepared.get(split):
            t0 = time.time()
            probs, _ = runtime.predict(prepared[split], batch_size)
            timing[split] = (time.time() - t0) / len(prepared[split])
            if split == "test" and COLD_TIMING_VOLUMES and runtime.cache_trunk:
                # with cached trunk activations that pass was mostly a cache read; report what a new
                # volume costs instead: a cold prediction (whole backbone) of a few test volumes
                sample = prepared[split][:COLD_TIMING_VOLUMES]
                t0 = time.time()
                Runtime(model, runtime.specs, device=runtime.device).predict(sample, batch_size)
                timing[split] = (time.time() - t0) / len(sample)
            scores[split] = metric_scores(probs, task.task_type)
    yv = task.labels(splits["val"]) if "val" in scores else None
    thr = choose_threshold(yv, scores.get("val"), task.task_type, threshold)
    results = {}
    for split, sc in scores.items():
        y = task.labels(splits[split])
        results[split] = compute_metrics(y, sc, task.task_type, task.label_names, threshold=thr)
        results[split]["infer_s_per_volume"] = timing[split]
        if thr != 0.5:
            results[split]["acc_at_0.5"] = compute_metrics(y, sc, task.task_type, task.label_names, n_bootstrap=0)["acc"]
    return thr, results


def headline(results: dict) -> dict:
    """Top-level auc/acc/n of metrics.json: the test split when there is one, else validation."""
    top = "test" if "test" in results else "val"
    if top not in results:
        return {}
    r = results[top]
    return {"auc": r["auc"], "acc": r["acc"], "n": r["n"], "split": top,
            **({"acc_at_0.5": r["acc_at_0.5"]} if "acc_at_0.5" in r else {})}


def _stratify(cases: list[Case], task_type: str):
    if task_type == "multilabel":
        return None
    y = [int(c.label[0]) for c in cases]
    return y if min(np.bincount(y)[np.bincount(y) > 0]) >= 2 else None


def assign_splits(task: TaskData, seed: int) -> dict[str, list[Case]]:
    """Use the data's splits; carve a stratified validation set (15 %) from train when none is given."""
    labelled = [c for c in task.cases if c.label is not None]
    splits = {s: [c for c in labelled if c.split == s] for s in ("train", "val", "test")}
    if not splits["train"]:
        rest = [c for c in labelled if c.split not in ("val", "test")]
        if len(rest) < 4:
            raise InputError(f"{task.source}: need at least 4 labelled training cases, found {len(rest)}")
        if not splits["test"]:
            rest, splits["test"] = train_test_split(rest, test_size=0.15, random_state=seed, stratify=_stratify(rest, task.task_type))
        splits["train"] = rest
    if not splits["val"]:
        tr = splits["train"]
        splits["train"], splits["val"] = train_test_split(tr, test_size=0.15, random_state=seed, stratify=_stratify(tr, task.task_type))
    return splits


def prepare_all(cases: list[Case], specs: dict[str, PreprocessSpec], desc: str, progress: bool = True) -> list[PreparedCase]:
    return [prepare_case(c, specs) for c in tqdm(cases, desc=f"preprocess {desc}", disable=not progress, leave=False)]


def subsample(cases: list[Case], fraction: float, task_type: str, seed: int) -> list[Case]:
    if fraction >= 1.0:
        return cases
    keep, _ = train_test_split(cases, train_size=fraction, random_state=seed, stratify=_stratify(cases, task_type))
    return keep


@dataclass
class TrainedRun:
    """What :func:`run_training` hands its ``finish`` hook once the model is trained and scored."""
    task: TaskData
    splits: dict[str, list[Case]]
    specs: dict[str, PreprocessSpec]
    prepared: dict[str, list[PreparedCase]]
    runtime: Runtime        # the one the splits were scored on
    train_runtime: Runtime  # the one training ran on (its trunk cache holds the training cases)
    summary: dict           # training.trainer.fit's
    policy: str | float     # the threshold policy
    threshold: float
    results: dict           # per split: score_splits' metrics
    n_params: int
    n_lora: int


def load_splits(data: str | Path | TaskData, cfg: TrainConfig, train_fraction: float,
                data_kwargs: dict | None = None) -> tuple[TaskData, dict[str, list[Case]]]:
    """The task and its train/val/test splits (:func:`assign_splits`, the training split thinned to
    ``train_fraction``); refused when the training split cannot train a classifier."""
    task = data if isinstance(data, TaskData) else load_data(data, **(data_kwargs or {}))
    splits = assign_splits(task, cfg.seed)
    splits["train"] = subsample(splits["train"], train_fraction, task.task_type, cfg.seed)
    check_training_labels(task, splits)  # one class only, or a class the training split never shows: refused
    return task, splits


def run_metrics(model, run: TrainedRun, t_start: float, extra: dict) -> dict:
    """metrics.json of a trained model: identity, sizes, timings, per-split results, history, headline."""
    s, prepared = run.summary, run.prepared
    metrics = {"task": model.spec.task, "task_type": run.task.task_type, "threshold": run.threshold,
               "label_names": run.task.label_names, "trainable_params": run.n_params, "lora_params": run.n_lora,
               "backbone": model.spec.backbone, "backbone_fingerprint": model.spec.backbone_fingerprint,
               "streams": model.streams, "train_wall_s": s["train_wall_s"],
               "total_wall_s": round(time.time() - t_start, 2),
               "epochs_run": s["epochs_run"], "best_epoch": s["best_epoch"], "seg_decoder_params": s["decoder_params"],
               "n_train_with_mask": sum(c.mask is not None for c in prepared["train"]),
               "n_train": len(run.splits["train"]), "splits": {k: len(v) for k, v in run.splits.items()}, **run.results,
               "history": s["history"], "config": s["config"], **extra}
    metrics.update(headline(run.results))
    return metrics


def log_cases(model, splits: dict, log=print) -> None:
    log(f"  trainable parameters: {model.n_trainable():,}; cases: train {len(splits['train'])}, "
        f"val {len(splits['val'])}, test {len(splits['test'])}")


def run_training(data: str | Path | TaskData, out: str | Path, specs_for: Callable, build: Callable,
                 config: TrainConfig | None = None, train_fraction: float = 1.0, threshold: str | float | None = None,
                 resume: bool = False, data_kwargs: dict | None = None, describe: Callable = log_cases,
                 finish: Callable | None = None, log=print) -> dict:
    """The one training harness of the plugin and of the baselines: data -> splits -> ``specs_for(task)`` ->
    seed -> ``build(task, specs)`` -> preprocessed splits -> fit -> val/test scored at the threshold of
    ``threshold`` (default: ``config.threshold``) -> ``finish(model, TrainedRun) -> extra metrics``
    (e.g. the plugin file) -> ``out/metrics.json``. ``describe(model, splits, log)`` logs the model."""
    t_start, out, cfg = time.time(), Path(out), config or TrainConfig()
    task, splits = load_splits(data, cfg, train_fraction, data_kwargs)
    specs = specs_for(task)
    seed_everything(cfg.seed)  # LoRA A matrices are drawn from the global RNG: same seed, same model
    model = build(task, specs)
    n_params, n_lora = model.n_trainable(), sum(p.numel() for p in model.lora_parameters().values())
    describe(model, splits, log)
    prepared = {k: prepare_all(v, specs, k, cfg.progress) for k, v in splits.items()}
    runtime = make_runtime(model, specs, cfg)
    log(f"device {runtime.device} ({'bf16 autocast' if model.autocast else 'fp32'}"
        f"{', channels_last' if getattr(model, 'channels_last', False) else ''}; {cfg.workers} loader worker(s))")
    summary = fit(model, specs, prepared["train"], prepared["val"], cfg, out, resume=resume, runtime=runtime)
    if not is_main():  # torchrun: rank 0 alone scores the splits and writes the model's files and metrics
        return {"rank_summary": summary}
    train_runtime = runtime  # with its trunk cache: the OOD reference's pass over the training cases hits it
    if cfg.cache_dir is None:  # the in-memory trunk cache served training; score with the whole backbone
        runtime = Runtime(model, specs, device=runtime.device)
    policy = cfg.threshold if threshold is None else threshold
    thr, results = score_splits(model, runtime, prepared, splits, task, cfg.batch_size, policy)
    run = TrainedRun(task, splits, specs, prepared, runtime, train_runtime, summary, policy, thr, results,
                     n_params, n_lora)
    metrics = run_metrics(model, run, t_start, finish(model, run) if finish is not None else {})
    write_json(metrics, out / "metrics.json")
    return metrics


def _describe_plugin(cfg: TrainConfig):
    def describe(model: AnyMC3D, splits: dict, log) -> None:
        n_params, spec = model.n_trainable(), model.spec
        n_lora = sum(p.numel() for p in model.lora_parameters().values())
        log(f"backbone {spec.backbone} ({spec.backbone_fingerprint}); streams {', '.join(model.streams)}; "
            f"trainable parameters: {n_params:,} (LoRA {n_lora:,}, queries + head {n_params - n_lora:,})")
        log(f"cases: train {len(splits['train'])}, val {len(splits['val'])}, test {len(splits['test'])}")
        if cfg.cache_dir is not None:
            log("activation cache " + str(cfg.cache_dir) + ": " + (
                "not used (full-depth LoRA has no frozen trunk; use --lora-last-k K or --lora-rank 0)"
                if model.last_k is None and spec.lora.r > 0 else
                "validation/test passes only (training batches are augmented, they run the whole backbone)"
                if cfg.augment else "every pass"))
    return describe


def _finish_plugin(out: Path, cfg: TrainConfig, train_fraction: float, plan: dict | None, log):
    """The plugin's own step after scoring: threshold, metrics and training record in its spec, the
    trust state (calibration, OOD reference, conformal scores) from validation, the plugin file."""
    def finish(model: AnyMC3D, run: TrainedRun) -> dict:
        spec, s = model.spec, run.summary
        spec.threshold = run.threshold
        spec.metrics = {k: {"auc": m["auc"], "acc": m["acc"], "n": m["n"]} for k, m in run.results.items()}
        spec.training = {"data": run.task.source, "epochs_run": s["epochs_run"], "best_epoch": s["best_epoch"],
                         "train_wall_s": s["train_wall_s"], "config": s["config"], "train_fraction": train_fraction,
                         "n_train": len(run.splits["train"]), "trainable_params": run.n_params,
                         "threshold_policy": run.policy}
        if plan is not None:  # the training plan (anymc3d.planning) this plugin was trained with
            spec.training["plan"] = plan
        if run.prepared.get("val"):  # calibration, OOD reference and conformal scores (anymc3d.plugins.trust)
            from ..plugins.trust import fit_trust

            model.trust = fit_trust(model, run.runtime, run.prepared["train"], run.prepared["val"],
                                    run.task.labels(run.splits["val"]), cfg.batch_size, seed=cfg.seed, log=log,
                                    train_runtime=run.train_runtime)
            model.trust.operating_point = {"policy": run.policy, "threshold": spec.threshold}
        save_plugin(model, out)
        return {"plan": plan} if plan is not None else {}
    return finish


def train_plugin(data: str | Path | TaskData, backbone: str, out: str | Path, weights: str | None = None,
                 preprocess: PreprocessOptions | None = None, lora: LoraSpec | None = None,
                 config: TrainConfig | None = None, task_name: str | None = None, head_dropout: float = 0.2,
                 train_fraction: float = 1.0, resume: bool = False, data_kwargs: dict | None = None,
                 threshold: str | float | None = None, plan: dict | None = None, log=print) -> dict:
    """Train one plugin; writes plugin.safetensors, plugin.json, metrics.json, train_log.csv into ``out``.

    ``threshold`` (default: ``config.threshold``): the binary decision threshold's policy
    (:mod:`anymc3d.evaluation.threshold`), applied to the validation split; the threshold is stored
    in the plugin. Focal loss with alpha=0.25 shifts probabilities down, so a fixed 0.5 would
    under-call positives.
    """
    cfg, pre = config or TrainConfig(), preprocess or PreprocessOptions()
    made = {}

    def specs_for(task: TaskData) -> dict[str, PreprocessSpec]:  # the specs need the backbone's input size
        made["bb"] = bb = create_backbone(backbone, weights=weights, input_size=pre.size)
        return {inp: pre.spec_for(task, bb.input_size) for inp in task.inputs}

    def build(task: TaskData, specs: dict[str, PreprocessSpec]) -> AnyMC3D:
        bb = made["bb"]
        spec = PluginSpec.for_task(task, specs, bb, task=task_name or task.name, lora=lora or LoraSpec(),
                                   head_dropout=head_dropout, embed_norm=resolve_embed_norm(cfg.embed_norm, bb),
                                   test_flips=list(cfg.test_flips), ensemble=int(cfg.ensemble), version=__version__)
        return AnyMC3D(bb, spec)

    finish = _finish_plugin(Path(out), cfg, train_fraction, plan, log)
    return run_training(data, out, specs_for, build, cfg, train_fraction, threshold, resume, data_kwargs,
                        describe=_describe_plugin(cfg), finish=finish, log=log)
