"""Predict every task of a plugin store in one call, on one backbone loaded once.

Execution per volume:

1. each input file is read once;
2. it is canonicalised (orientation, spacing, intensity) once per distinct preprocessing spec, and
   cut into slices once per (spec, view, slice size, max_slices);
3. the frozen compute is shared (``shared=True``, the default):
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

import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..backbones import Backbone, create_backbone
from ..data.cases import Case
from ..errors import InputError
from ..inputs import PreparedCase
from ..io import read_volume
from ..model import AnyMC3D
from ..plugins.file import load_plugin, read_spec
from ..plugins.lora import activate
from ..preprocess import PreprocessSpec, canonicalize, to_slices
from ..volume import Volume
from .store import PluginStore

_SLICE_ONLY = ("views", "size", "max_slices")  # spec fields used only when cutting slices


@dataclass
class Attached:
    name: str
    path: Path
    model: AnyMC3D
    specs: dict[str, PreprocessSpec]
    predictor: object  # anymc3d.predict.Predictor: formats results exactly like `anymc3d predict PLUGIN`

    @property
    def mode(self) -> str:
        if self.model.spec.lora.r == 0:
            return "frozen"
        return f"trunk:{self.model.last_k}" if self.model.last_k is not None else "full"


def _canon_key(spec: PreprocessSpec) -> str:
    return json.dumps({k: v for k, v in spec.to_dict().items() if k not in _SLICE_ONLY}, sort_keys=True)


class MultiPredictor:
    """One backbone, many plugins. ``predict(volume)`` -> {"tasks": {name: result}, "skipped": [...], ...}."""

    def __init__(self, backbone: Backbone, attached: list[Attached], skipped: list[dict], shared: bool = True) -> None:
        if not attached:
            why = "; ".join(f"{s['name']}: {s['reason']}" for s in skipped) or "the store is empty"
            raise InputError(f"no compatible plugin to run ({why})")
        self.backbone, self.attached, self.skipped, self.shared = backbone, attached, skipped, shared
        self.last_timing: dict[str, float] = {}

    # ---- loading --------------------------------------------------------------------------------
    @classmethod
    def from_store(cls, root: str | Path, weights: str | None = None, backbone: Backbone | None = None,
                   shared: bool = True) -> "MultiPredictor":
        store = PluginStore(root)
        entries = store.entries()
        skipped = [{"name": e.name, "reason": e.error} for e in entries if e.spec is None]
        plugins = [(e.name, e.path) for e in entries if e.spec is not None]
        return cls.from_paths(plugins, weights=weights, backbone=backbone, shared=shared,
                              target=store.target_backbone(), skipped=skipped)

    @classmethod
    def from_paths(cls, plugins: list[tuple[str, str | Path]], weights: str | None = None, backbone: Backbone | None = None,
                   shared: bool = True, target: tuple[str, str] | None = None, skipped: list[dict] | None = None
                   ) -> "MultiPredictor":
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
        attached = []
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
            pred = Predictor(model, source=str(path))
            attached.append(Attached(name, path, model, pred.specs, pred))
        return cls(backbone, attached, skipped, shared)

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
        volumes: dict = {}
        canon: dict = {}
        slices: dict = {}
        trunks: dict = {}
        frozen: dict = {}

        def images_for(a: Attached) -> dict:
            inputs = a.model.spec.inputs
            if isinstance(item, Case):
                return {k: item.images.get(k) for k in inputs}
            if isinstance(item, dict):
                return {k: item.get(k) for k in inputs}
            return {inputs[0]: item, **{k: None for k in inputs[1:]}}

        def volume(x):
            key = id(x) if isinstance(x, Volume) else str(Path(x).resolve())
            if key not in volumes:
                volumes[key] = x if isinstance(x, Volume) else read_volume(x)
            return key, volumes[key]

        if case_id is None:
            first = item if not isinstance(item, (dict, Case)) else next(
                (v for v in (item.images if isinstance(item, Case) else item).values() if v is not None), None)
            case_id = item.id if isinstance(item, Case) else case_id_from(first)

        results, failed, sources = {}, [], {}
        for a in self.attached:
            t_read = time.perf_counter()
            arrays, records, srcs, xs = {}, {}, {}, {}
            for inp, src in images_for(a).items():
                if src is None:
                    continue
                vkey, vol = volume(src)
                spec = a.specs[inp]
                ckey = (vkey, _canon_key(spec))
                if ckey not in canon:
                    arr, rec = canonicalize(vol, spec)
                    canon[ckey] = (torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32)), rec)
                arrays[inp], records[inp] = canon[ckey]
                srcs[inp] = vol.source
                for view in spec.views:
                    skey = (ckey, view, spec.size, spec.max_slices)
                    if skey not in slices:
                        slices[skey] = to_slices(arrays[inp], spec, view)
                    xs[f"{inp}:{view}"] = skey
            timing["read_preprocess"] += time.perf_counter() - t_read
            if not xs:
                failed.append({"name": a.name, "reason": f"none of the inputs {a.model.spec.inputs} is present"})
                continue
            sources.update(srcs)
            emb = {}
            for s, skey in xs.items():
                x = slices[skey]
                mode = a.mode if self.shared else "full"
                if mode == "frozen":
                    t1 = time.perf_counter()
                    if skey not in frozen:
                        activate(self.backbone.model, None)
                        frozen[skey] = a.model.embed_slices(s, x)[0]
                    timing["shared"] += time.perf_counter() - t1
                    emb[s] = frozen[skey]
                elif mode.startswith("trunk:"):
                    t1 = time.perf_counter()
                    tkey = (skey, a.model.last_k)
                    if tkey not in trunks:
                        activate(self.backbone.model, None)
                        trunks[tkey] = a.model.trunk(x)
                    timing["shared"] += time.perf_counter() - t1
                    t2 = time.perf_counter()
                    emb[s] = a.model.embed_slices(s, trunks[tkey], from_trunk=True)[0]
                    timing["plugins"] += time.perf_counter() - t2
                else:
                    t2 = time.perf_counter()
                    emb[s] = a.model.embed_slices(s, x)[0]
                    timing["plugins"] += time.perf_counter() - t2
            t3 = time.perf_counter()
            streams = a.model.streams
            present = torch.tensor([[s in emb for s in streams]])
            masks = {s: torch.ones(1, e.shape[0], dtype=torch.bool) for s, e in emb.items()}
            out = a.model.pool_and_classify({s: e[None] for s, e in emb.items()}, masks, present)
            probs = a.model.probabilities(out.logits).float().numpy()[0]
            outd = {"slice_weights": {s: w[0].tolist() for s, w in out.slice_weights.items() if s in emb},
                    "view_weights": {s: float(out.view_weights[0, k]) for k, s in enumerate(streams)},
                    "present": {s: bool(present[0, k]) for k, s in enumerate(streams)}}
            prepared = PreparedCase(case_id, arrays, records, None, None, srcs)
            results[a.name] = a.predictor._result(Case(id=case_id, images={}), prepared, probs, outd)
            timing["plugins"] += time.perf_counter() - t3
        timing["total"] = time.perf_counter() - t0
        self.last_timing = timing
        return {"id": case_id, "inputs": sources, "backbone": self.backbone.name,
                "backbone_fingerprint": self.backbone.fingerprint, "shared_trunk": self.shared,
                "tasks": results, "tasks_failed": failed, "skipped_plugins": self.skipped,
                "seconds": round(timing["total"], 4)}
