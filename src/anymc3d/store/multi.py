"""Predict every task of a plugin store in one call, on one backbone loaded once.

Execution per volume:

1. each input file is read once;
2. it is canonicalised (orientation, spacing, intensity) once per distinct preprocessing spec
   (``prepare_case``'s per-volume memo), and cut into each plugin's slices;
3. every plugin runs on its own :class:`~anymc3d.runtime.Runtime`; the frozen compute is shared
   (``shared=True``, the default) through one memory-only activation cache for the volume, whose
   content keys make equal slice stacks of plugins with the same cut point meet:
   * shared-trunk plugins (``lora.last_k = k``): the backbone's first blocks run once per slice stack
     and k, with every adapter off; each plugin then runs only its own adapted tail on that output;
   * pooling-only plugins (``lora.r = 0``): the whole frozen backbone runs once per slice stack and all
     of them pool the same class embeddings;
   * full-depth LoRA plugins: the whole backbone with the plugin's own adapter (nothing to share);
4. each plugin's task queries, view fusion and head give its result, in the same format as
   ``anymc3d predict PLUGIN``.

``shared=False`` runs every plugin's whole backbone pass on its own (only reading and preprocessing
are shared): the reference for timing and for the equality tests.

Compatibility: every plugin attaches to the one backbone as peft named adapters (prefix ``tN_``). A
plugin trained on another backbone or other weights (fingerprint), or whose files cannot be read,
is reported in ``skipped`` (and in every result) and never run.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ..backbones import Backbone, create_backbone
from ..data.cases import Case
from ..errors import InputError
from ..plugins.file import load_plugin, read_spec
from ..plugins.model import AnyMC3D
from ..preprocess import PreprocessSpec
from ..runtime.batching import prepare_case
from ..runtime.cache import ActivationCache
from ..runtime.engine import Runtime, case_outputs
from ..runtime.results import volume_result
from ..evaluation.conformal import DEFAULT_COVERAGE
from ..evaluation.ood import EmbeddingCapture
from ..plugins.trust import annotate
from ..volume import Volume
from .store import PluginStore


@dataclass
class Attached:
    name: str
    path: Path
    model: AnyMC3D
    specs: dict[str, PreprocessSpec]
    predictor: object  # anymc3d.predict.Predictor: reads cases exactly like `anymc3d predict PLUGIN`

    @property
    def runtime(self) -> Runtime:
        return self.predictor.runtime

    @property
    def mode(self) -> str:
        if self.model.spec.lora.r == 0:
            return "frozen"
        return f"trunk:{self.model.last_k}" if self.model.last_k is not None else "full"


class MultiPredictor:
    """One backbone, many plugins. ``predict(volume)`` -> {"tasks": {name: result}, "skipped": [...], ...}."""

    def __init__(self, backbone: Backbone, attached: list[Attached], skipped: list[dict], shared: bool = True,
                 cache: ActivationCache | None = None) -> None:
        if not attached:
            why = "; ".join(f"{s['name']}: {s['reason']}" for s in skipped) or "the store is empty"
            raise InputError(f"no compatible plugin to run ({why})")
        self.backbone, self.attached, self.skipped, self.shared = backbone, attached, skipped, shared
        self.cache = cache if cache is not None else ActivationCache(None)
        self.last_timing: dict[str, float] = {}
        self.coverage = DEFAULT_COVERAGE  # every answer's conformal prediction set (anymc3d.plugins.trust)

    # ---- loading --------------------------------------------------------------------------------
    @classmethod
    def from_store(cls, root: str | Path, weights: str | None = None, backbone: Backbone | None = None,
                   shared: bool = True, device: str = "auto") -> "MultiPredictor":
        store = PluginStore(root)
        entries = store.entries()
        skipped = [{"name": e.name, "reason": e.error} for e in entries if e.spec is None]
        plugins = [(e.name, e.path) for e in entries if e.spec is not None]
        return cls.from_paths(plugins, weights=weights, backbone=backbone, shared=shared,
                              target=store.target_backbone(), skipped=skipped, device=device)

    @classmethod
    def from_paths(cls, plugins: list[tuple[str, str | Path]], weights: str | None = None, backbone: Backbone | None = None,
                   shared: bool = True, target: tuple[str, str] | None = None, skipped: list[dict] | None = None,
                   device: str = "auto") -> "MultiPredictor":
        from ..predict import Predictor

        skipped = list(skipped or [])
        specs = []
        for name, path in plugins:
            try:
                specs.append((name, Path(path), read_spec(path)))
            except InputError as exc:
                skipped.append({"name": name, "reason": str(exc)})
        if backbone is not None:
            target = (backbone.name, backbone.fingerprint)
        elif target is None and specs:
            target = (specs[0][2].backbone, specs[0][2].backbone_fingerprint)
        compatible = []
        for name, path, spec in specs:
            if (spec.backbone, spec.backbone_fingerprint) != tuple(target):
                skipped.append({"name": name, "reason": f"trained on {spec.backbone} ({spec.backbone_fingerprint}), "
                                                        f"not on the store's backbone {target[0]} ({target[1]})"})
            else:
                compatible.append((name, path, spec))
        if backbone is None and compatible:
            backbone = create_backbone(target[0], weights=weights, input_size=compatible[0][2].input_size)
        attached, cache = [], ActivationCache(None)
        for i, (name, path, spec) in enumerate(compatible):
            if backbone.fingerprint != spec.backbone_fingerprint:
                skipped.append({"name": name, "reason": f"trained on {spec.backbone} ({spec.backbone_fingerprint}) but "
                                f"the loaded weights ({backbone.weights_source}) have fingerprint {backbone.fingerprint}"})
                continue
            try:
                model = load_plugin(path, backbone=backbone, adapter_prefix=f"t{i}_")
            except InputError as exc:
                skipped.append({"name": name, "reason": str(exc)})
                continue
            # every plugin's runtime reads the one per-volume activation cache (shared trunk / frozen embeddings)
            pred = Predictor(model, source=str(path), device=device, cache=cache, cache_trunk=shared)
            attached.append(Attached(name, path, model, pred.specs, pred))
        return cls(backbone, attached, skipped, shared, cache)

    # ---- prediction -----------------------------------------------------------------------------
    @property
    def tasks(self) -> list[str]:
        return [a.name for a in self.attached]

    def predict_many(self, items: list, ids: list | None = None) -> list[dict]:
        ids = ids or [None] * len(items)
        return [self.predict(it, cid) for it, cid in zip(items, ids)]

    @torch.no_grad()
    def predict(self, item: Volume | str | Path | dict | Case, case_id: str | None = None) -> dict:
        from ..predict import case_id_from

        t0 = time.perf_counter()
        timing = {"read_preprocess": 0.0, "shared": 0.0, "plugins": 0.0}
        memo: dict = {}  # this volume's reading and canonicalisation, shared by plugins with the same preprocessing
        self.cache.clear_memory()  # this volume's frozen activations, shared by plugins with the same cut point

        if case_id is None:
            first = item if not isinstance(item, (dict, Case)) else next(
                (v for v in (item.images if isinstance(item, Case) else item).values() if v is not None), None)
            case_id = item.id if isinstance(item, Case) else case_id_from(first)

        results, failed, sources = {}, [], {}
        for a in self.attached:
            t_read = time.perf_counter()
            case = a.predictor.case(item, case_id)
            if not any(case.images.get(k) is not None for k in a.model.spec.inputs):
                failed.append({"name": a.name, "reason": f"none of the inputs {a.model.spec.inputs} is present"})
                continue
            prepared = prepare_case(Case(case.id, case.images), a.specs, memo)
            batch = a.runtime.batcher.batch([prepared])
            timing["read_preprocess"] += time.perf_counter() - t_read
            sources.update(prepared.sources)
            t1 = time.perf_counter()
            with EmbeddingCapture(a.model) as cap:  # the pooled embeddings, for the OOD score
                out = a.runtime.forward(batch)
            probs = a.model.probabilities(out.logits).float().cpu().numpy()[0]
            meta = [{"id": case_id, "sources": prepared.sources, "warnings": list(prepared.warnings)}]
            row = case_outputs(a.model.streams, out, batch, meta)[0]
            emb = {s: (e if row["present"].get(s, False) else e * float("nan")) for s, e in cap.take().items()}
            results[a.name] = annotate(volume_result(a.model.spec, case_id, probs, row, str(a.path)),
                                       getattr(a.model, "trust", None), a.model.spec, probs, emb, self.coverage)
            timing["shared"] += a.runtime.last_shared_s
            timing["plugins"] += time.perf_counter() - t1 - a.runtime.last_shared_s
        timing["total"] = time.perf_counter() - t0
        self.last_timing = timing
        return {"id": case_id, "inputs": sources, "backbone": self.backbone.name,
                "backbone_fingerprint": self.backbone.fingerprint, "shared_trunk": self.shared,
                "tasks": results, "tasks_failed": failed, "skipped_plugins": self.skipped,
                "seconds": round(timing["total"], 4)}
