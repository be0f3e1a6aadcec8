"""Prediction from Python and the CLI: ``anymc3d.load(plugin).predict(volume)``.

A :class:`Predictor` is a loaded plugin on a :class:`~anymc3d.runtime.Runtime`: reading,
preprocessing, batching, the device and the backbone pass all happen there.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from .data.cases import Case
from .evaluation.conformal import DEFAULT_COVERAGE, check_coverage
from .evaluation.ood import EmbeddingCapture
from .io import write_json  # noqa: F401  (anymc3d.predict.write_json: the verbs' JSON writer)
from .plugins import load_plugin
from .plugins.trust import annotate
from .preprocess import PreprocessSpec
from .runtime.engine import Runtime
from .runtime.results import volume_result
from .volume import Volume


class Predictor:
    """A loaded plugin on its frozen backbone; preprocessing comes from the plugin's saved spec."""

    def __init__(self, model, source: str = "", device: str = "auto", workers: int = 0, cache=None,
                 cache_trunk: bool = False, coverage: float = DEFAULT_COVERAGE, amp: bool | None = None,
                 merge_lora: bool = True) -> None:
        """``cache`` / ``cache_trunk``: serve the frozen part from an activation cache (predict-all
        shares one between the plugins of a store). ``coverage``: the level of every answer's
        conformal prediction set (anymc3d.plugins.trust). ``amp=False``: full fp32 (no bf16 autocast,
        no TF32 on CUDA), for answers that must agree across devices to 1e-4 (docs/runtime.md).
        ``merge_lora``: on the CPU with an inference engine, each view's slice network may run whole on
        it with its LoRA merged (anymc3d.runtime.merged; ``--engine auto`` keeps it where it is faster)."""
        self.model = model
        self.coverage = check_coverage(coverage)
        self.trust = getattr(model, "trust", None)
        self.spec = model.spec
        self.source = source
        self.specs = {k: PreprocessSpec.from_dict(v) for k, v in self.spec.preprocess.items()}
        self.runtime = Runtime(model, self.specs, device=device, workers=workers, cache=cache, cache_trunk=cache_trunk,
                               amp=amp, merge_lora=merge_lora)

    @property
    def device(self):
        return self.runtime.device

    def case(self, item, case_id: str | None = None) -> Case:
        """A volume, a path, {input: volume or path} or a Case -> the Case this plugin reads."""
        if isinstance(item, Case):
            return item
        if isinstance(item, dict):
            images = {k: item.get(k) for k in self.spec.inputs}
        else:
            images = {self.spec.inputs[0]: item}
            for k in self.spec.inputs[1:]:
                images[k] = None
        if case_id is None:
            first = next((v for v in images.values() if v is not None), None)
            case_id = case_id_from(first)
        return Case(id=case_id, images=images)

    def predict(self, item: Volume | str | Path | dict | Case, case_id: str | None = None) -> dict:
        """One volume (or {input: volume} for multi-input plugins) -> JSON-ready result."""
        return self.predict_many([item], [case_id])[0]

    def predict_many(self, items: list, ids: list | None = None, batch_size: int = 4) -> list[dict]:
        return list(self.predict_stream(items, ids, batch_size))

    def predict_stream(self, items: list, ids: list | None = None, batch_size: int = 4):
        """The results of ``items`` in order, each as soon as its batch is done: one loader over all
        of them, whose workers read and prepare ahead (``predict --out`` writes each as it arrives)."""
        ids = ids or [None] * len(items)
        cases = [self.case(it, i) for it, i in zip(items, ids)]
        done = 0
        with EmbeddingCapture(self.runtime.model) as cap:
            for probs, outs in self.runtime.predict_batches(cases, batch_size):
                emb = cap.take("task_query")
                cap.clear()
                for j, (p, o) in enumerate(zip(probs, outs)):
                    case_emb = {s: e[j:j + 1] if o["present"].get(s, False) else np.full_like(e[j:j + 1], np.nan)
                                for s, e in emb.items()}  # a stream the case lacks has no embedding
                    yield self.result(cases[done + j].id, p, o, case_emb)
                done += len(outs)

    def result(self, case_id: str, probs: np.ndarray, case: dict, embeddings: dict) -> dict:
        """The JSON-ready result of one case from its forward pass: the model's ``probs`` (n_outputs,),
        its ``case`` outputs (slice / view weights, presence) and pooled ``embeddings`` (stream -> (1, D)),
        with the plugin's calibration, conformal set and OOD score. Also how ``predict --heatmaps``
        reports the pass that made the heatmaps (:attr:`anymc3d.explain.heatmap.Heatmaps.output`)."""
        return annotate(volume_result(self.spec, case_id, probs, case, self.source), self.trust, self.spec, probs,
                        embeddings, self.coverage)


def case_id_from(item) -> str:
    if isinstance(item, Case):
        return item.id
    if isinstance(item, Volume):
        item = item.meta.get("path", "volume")
    name = Path(str(item)).name
    for suffix in (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd", ".npy", ".dcm"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def load(plugin: str | Path, weights: str | None = None, device: str = "auto", workers: int = 0,
         coverage: float = DEFAULT_COVERAGE, amp: bool | None = None) -> Predictor:
    """Load a trained plugin (folder, .json or .safetensors) onto its backbone, on ``device``
    (``amp=False``: full fp32 instead of bf16 autocast)."""
    return Predictor(load_plugin(plugin, weights=weights), source=str(plugin), device=device, workers=workers,
                     coverage=coverage, amp=amp)
