"""`anymc3d train`: data -> preprocessing spec -> backbone + plugin -> fit -> plugin file + metrics."""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
from sklearn.model_selection import train_test_split
from tqdm.auto import tqdm

from .. import __version__
from ..backbones import create_backbone
from ..data import Case, TaskData, check_training_labels, load_data
from ..errors import InputError
from ..evaluation import compute_metrics
from ..evaluation.threshold import choose_threshold, youden_threshold  # noqa: F401  (re-exported)
from ..io import write_json
from ..plugins import LoraSpec, PluginSpec, save_plugin
from ..plugins.embed_norm import resolve_embed_norm
from ..plugins.model import AnyMC3D
from ..preprocess import PreprocessOptions, PreprocessSpec
from ..runtime.batching import PreparedCase, prepare_case
from ..runtime.engine import Runtime
from .distributed import is_main
from .trainer import TrainConfig, fit, make_runtime, metric_scores, seed_everything

__all__ = ["PreprocessOptions", "assign_splits", "score_splits", "train_plugin", "youden_threshold"]


#: test volumes predicted without the trunk cache to time inference honestly (0: skip)
COLD_TIMING_VOLUMES = 16


def score_splits(model, runtime: Runtime, prepared: dict, splits: dict, task: TaskData, batch_size: int,
                 threshold: str | float = "platt") -> tuple[float, dict]:
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
    t_start = time.time()
    out = Path(out)
    cfg = config or TrainConfig()
    task = data if isinstance(data, TaskData) else load_data(data, **(data_kwargs or {}))
    splits = assign_splits(task, cfg.seed)
    splits["train"] = subsample(splits["train"], train_fraction, task.task_type, cfg.seed)
    check_training_labels(task, splits)  # one class only, or a class the training split never shows: refused
    pre = preprocess or PreprocessOptions()
    bb = create_backbone(backbone, weights=weights, input_size=pre.size)
    specs = {inp: pre.spec_for(task, bb.input_size) for inp in task.inputs}
    spec = PluginSpec(task=task_name or task.name, task_type=task.task_type, label_names=task.label_names,
                      inputs=task.inputs, preprocess={k: v.to_dict() for k, v in specs.items()},
                      backbone=bb.name, backbone_fingerprint=bb.fingerprint, input_size=bb.input_size,
                      lora=lora or LoraSpec(), head_dropout=head_dropout,
                      embed_norm=resolve_embed_norm(cfg.embed_norm, bb), test_flips=list(cfg.test_flips),
                      ensemble=int(cfg.ensemble),
                      version=__version__)
    seed_everything(cfg.seed)  # LoRA A matrices are drawn from the global RNG: same seed, same plugin
    model = AnyMC3D(bb, spec)
    n_params = model.n_trainable()
    n_lora = sum(p.numel() for p in model.lora_parameters().values())
    log(f"backbone {bb.name} ({bb.fingerprint}); streams {', '.join(model.streams)}; "
        f"trainable parameters: {n_params:,} (LoRA {n_lora:,}, queries + head {n_params - n_lora:,})")
    log(f"cases: train {len(splits['train'])}, val {len(splits['val'])}, test {len(splits['test'])}")
    if cfg.cache_dir is not None:
        log("activation cache " + str(cfg.cache_dir) + ": " + (
            "not used (full-depth LoRA has no frozen trunk; use --lora-last-k K or --lora-rank 0)"
            if model.last_k is None and spec.lora.r > 0 else
            "validation/test passes only (training batches are augmented, they run the whole backbone)"
            if cfg.augment else "every pass"))
    prepared = {k: prepare_all(v, specs, k, cfg.progress) for k, v in splits.items()}
    runtime = make_runtime(model, specs, cfg)
    log(f"device {runtime.device} ({'bf16 autocast' if model.autocast else 'fp32'}"
        f"{', channels_last' if model.channels_last else ''}; {cfg.workers} loader worker(s))")
    summary = fit(model, specs, prepared["train"], prepared["val"], cfg, out, resume=resume, runtime=runtime)
    if not is_main():  # torchrun: rank 0 alone scores the splits and writes the plugin and metrics
        return {"rank_summary": summary}
    train_runtime = runtime  # with its trunk cache: the OOD reference's pass over the training cases hits it
    if cfg.cache_dir is None:  # the in-memory trunk cache served training; score with the whole backbone as before
        runtime = Runtime(model, specs, device=runtime.device)
    spec.threshold, results = score_splits(model, runtime, prepared, splits, task, cfg.batch_size,
                                           cfg.threshold if threshold is None else threshold)
    spec.metrics = {s: {"auc": m["auc"], "acc": m["acc"], "n": m["n"]} for s, m in results.items()}
    spec.training = {"data": task.source, "epochs_run": summary["epochs_run"], "best_epoch": summary["best_epoch"],
                     "train_wall_s": summary["train_wall_s"], "config": summary["config"], "train_fraction": train_fraction,
                     "n_train": len(splits["train"]), "trainable_params": n_params,
                     "threshold_policy": cfg.threshold if threshold is None else threshold}
    if plan is not None:  # the training plan (anymc3d.planning) this plugin was trained with
        spec.training["plan"] = plan
    if prepared.get("val"):  # calibration, OOD reference and conformal scores (anymc3d.plugins.trust)
        from ..plugins.trust import fit_trust

        model.trust = fit_trust(model, runtime, prepared["train"], prepared["val"], task.labels(splits["val"]),
                                cfg.batch_size, seed=cfg.seed, log=log, train_runtime=train_runtime)
        model.trust.operating_point = {"policy": spec.training["threshold_policy"], "threshold": spec.threshold}
    save_plugin(model, out)
    metrics = {"task": spec.task, "task_type": task.task_type, "threshold": spec.threshold, "label_names": task.label_names,
               "trainable_params": n_params, "lora_params": n_lora, "backbone": bb.name,
               "backbone_fingerprint": bb.fingerprint, "streams": model.streams,
               "train_wall_s": summary["train_wall_s"], "total_wall_s": round(time.time() - t_start, 2),
               "epochs_run": summary["epochs_run"], "best_epoch": summary["best_epoch"],
               "seg_decoder_params": summary["decoder_params"],
               "n_train_with_mask": sum(c.mask is not None for c in prepared["train"]),
               "n_train": len(splits["train"]), "splits": {k: len(v) for k, v in splits.items()}, **results,
               "history": summary["history"], "config": summary["config"],
               **({"plan": plan} if plan is not None else {})}
    metrics.update(headline(results))
    write_json(metrics, out / "metrics.json")
    return metrics
