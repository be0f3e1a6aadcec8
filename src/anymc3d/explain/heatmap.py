"""3D heatmaps in the input's own space: slice maps -> slice weights -> views -> input grid.

For every stream (input x view) the plugin's forward pass gives the slice pooling weights a_s
and, for each slice, a 2D map:

* ``attention`` (ViT backbones, the paper's heatmap): last-layer class-to-patch attention,
  averaged over heads, register tokens excluded (:mod:`.attention`), upsampled to the slice;
* ``gradcam`` (CNN backbones; also available for ViTs): the raw Grad-CAM of the slice's own logit
  ``head(h_s)[label]`` (:mod:`.gradcam`). Since the head is linear and sum_s a_s = 1, the volume
  logit is sum_s a_s head(h_s): weighting slice maps by a_s decomposes the decision.

Slice maps are multiplied by their slice weight, put back on the input's canonical grid with
``slices_to_canonical`` (undoes resizing, square padding and ``max_slices``), multiplied by the
stream's view weight and summed over views (and over co-registered inputs); ``canonical_to_input``
then undoes resampling and reorientation, so the map has exactly the input's shape and affine.
Maps are scaled so that their maximum is 1 (scores are invariant to that).

Labels: binary tasks explain the positive label by default (one map, ``<id>_heatmap.nii.gz``);
multi-class and multi-label tasks one map per requested label (``<id>_<label>_heatmap.nii.gz``).
Grad-CAM targets the label's own per-slice logit (centred over classes for multi-class). Attention
itself is label-agnostic; for multi-class/multi-label its slice weights become label-specific:
``a_s * relu(z_s[l] - sum_t a_t z_t[l])`` (renormalised; the slices whose own logit for that label
exceeds the volume's), falling back to ``a_s`` when no slice stands out. Binary attention maps use
``a_s`` exactly as in the paper.
"""
from __future__ import annotations

import contextlib
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from ..data.cases import Case
from ..errors import InputError
from ..io import check_allocation, write_nifti
from ..preprocess import PreprocessSpec, canonical_to_input, slices_to_canonical
from ..preprocess.spatial import SpatialRecord
from ..runtime.batching import prepare_case
from ..evaluation.ood import EmbeddingCapture
from ..runtime.engine import Runtime, case_outputs
from ..volume import Volume
from .attention import capture_cls_attention

METHODS = ("auto", "attention", "gradcam")


@dataclass
class Heatmaps:
    """Heatmaps of one case. ``maps[label]``: float32 on the input grid (``record.input_shape``)."""

    id: str
    method: str
    labels: list[str]
    maps: dict[str, np.ndarray]
    canonical: dict[str, np.ndarray]                 # same maps on the reference input's canonical grid
    record: SpatialRecord                            # the reference input's record (shape, affine)
    reference_input: str
    canonical_image: np.ndarray                      # (C, X, Y, Z) preprocessed reference input (figures)
    slice_weights: dict[str, np.ndarray]             # stream -> a_s
    label_slice_weights: dict[str, dict[str, np.ndarray]]  # label -> stream -> weight used for that map
    view_weights: dict[str, float]
    probabilities: dict[str, float]                 # calibrated (the plugin's stored calibration), as predict's
    seconds: float
    source: str = ""
    raw_probabilities: dict[str, float] = field(default_factory=dict)  # the model's own
    extra: dict = field(default_factory=dict)
    #: the forward pass as prediction reports it: ``probabilities`` (n_outputs,) of the model, ``case``
    #: (slice / view weights, presence, sources, warnings) and ``embeddings`` (stream -> (1, D) pooled
    #: embedding, for the OOD score); ``Predictor.result`` turns it into predict's JSON, so
    #: ``predict --heatmaps`` reads and runs each volume once
    output: dict = field(default_factory=dict)

    @property
    def affine(self) -> np.ndarray:
        return self.record.input_affine

    def filename(self, label: str, single: bool, suffix: str = "_heatmap.nii.gz") -> str:
        return f"{self.id}{suffix}" if single else f"{self.id}_{safe_name(label)}{suffix}"


def safe_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", str(text)).strip("_") or "label"


def _upsample(maps: torch.Tensor, size: int) -> torch.Tensor:
    """(S, h, w) -> (S, size, size), bilinear (align_corners=False, like the slicing code)."""
    if tuple(maps.shape[-2:]) == (size, size):
        return maps.float()
    return F.interpolate(maps[:, None].float(), size=(size, size), mode="bilinear", align_corners=False)[:, 0]


def _to_reference(arr: np.ndarray, src: SpatialRecord, ref: SpatialRecord) -> np.ndarray:
    """A canonical-grid map of one input onto another input's canonical grid (through world mm)."""
    same = (tuple(src.canonical_shape) == tuple(ref.canonical_shape)
            and np.allclose(src.canonical_affine, ref.canonical_affine, atol=1e-3))
    if same:
        return arr
    m = np.linalg.inv(np.asarray(src.canonical_affine)) @ np.asarray(ref.canonical_affine)
    return ndimage.affine_transform(arr, m[:3, :3], offset=m[:3, 3], output_shape=tuple(ref.canonical_shape),
                                    order=1, mode="constant", cval=0.0).astype(np.float32)


def check_heatmaps(source, record: SpatialRecord, n_labels: int) -> None:
    """The allocation guard for one case's heatmaps, before the forward pass: every label's map is kept on the
    model's (canonical) grid and on the input's grid."""
    n = max(1, int(n_labels))
    check_allocation(source, (n, *record.canonical_shape), "its heatmaps on the model's grid (labels x X x Y x Z) make")
    check_allocation(source, (n, *record.input_shape), "its heatmaps on the input's grid (labels x X x Y x Z) make")


class Explainer:
    """Heatmaps for a loaded plugin (an ``AnyMC3D`` model or a ``Predictor``)."""

    def __init__(self, model, method: str = "auto", cam_layers: str = "auto", smooth_mm: float = 0.0,
                 device: str = "auto") -> None:
        runtime = getattr(model, "runtime", None)  # a Predictor: explain on its runtime (same device)
        model = getattr(model, "model", model)
        if method not in METHODS:
            raise InputError(f"heatmap method must be one of {', '.join(METHODS)}, got {method!r}")
        kind = model.backbone.kind
        if method == "auto":
            method = "attention" if kind == "vit" else "gradcam"
        if method == "attention" and kind != "vit":
            what = ("windowed attention without a class token" if kind == "hybrid" else "no attention")
            raise InputError(f"backbone {model.backbone.name} ({kind}) has {what}; use --method gradcam")
        self.model = model
        self.spec = model.spec
        self.method = method
        self.cam_layers = cam_layers
        if smooth_mm < 0:
            raise InputError(f"smoothing must be >= 0 mm, got {smooth_mm}")
        self.smooth_mm = float(smooth_mm)
        self.specs = {k: PreprocessSpec.from_dict(v) for k, v in self.spec.preprocess.items()}
        self.runtime = runtime if runtime is not None else Runtime(model, self.specs, device=device)

    @property
    def resolved_cam_layers(self) -> str | None:
        """The Grad-CAM layers actually used (None for attention)."""
        if self.method != "gradcam":
            return None
        if self.model.backbone.kind == "vit":
            return "blocks[-1].norm1"
        if self.model.backbone.kind == "hybrid":
            return "stages[-1]"
        from .gradcam import DEFAULT_CNN_LAYERS

        return DEFAULT_CNN_LAYERS if self.cam_layers == "auto" else self.cam_layers

    # ---- labels ------------------------------------------------------------------------------
    @property
    def single_map(self) -> bool:
        return self.spec.task_type == "binary"

    def default_labels(self) -> list[str]:
        names = self.spec.label_names
        return [names[1]] if self.spec.task_type == "binary" else list(names)

    def _label_targets(self, labels: list[str] | None) -> list[tuple[str, int, float]]:
        """label name -> (output index, sign). Binary: the positive label is +logit, the negative -logit."""
        names = self.spec.label_names
        labels = labels or self.default_labels()
        out = []
        for lab in labels:
            if lab not in names:
                raise InputError(f"label {lab!r} is not one of the plugin's labels ({', '.join(names)})")
            i = names.index(lab)
            out.append((lab, 0, 1.0 if i == 1 else -1.0) if self.spec.task_type == "binary" else (lab, i, 1.0))
        return out

    # ---- inputs --------------------------------------------------------------------------------
    def _case(self, item, case_id: str | None, mask=None) -> Case:
        from ..predict import case_id_from

        if isinstance(item, Case):
            return item
        if isinstance(item, dict):
            images = {k: item.get(k) for k in self.spec.inputs}
        else:
            images = {k: None for k in self.spec.inputs}
            images[self.spec.inputs[0]] = item
        if case_id is None:
            case_id = case_id_from(next(v for v in images.values() if v is not None))
        return Case(id=case_id, images=images, mask=mask)

    # ---- the work ------------------------------------------------------------------------------
    def explain(self, item: Volume | str | Path | dict | Case, case_id: str | None = None,
                labels: list[str] | None = None) -> Heatmaps:
        """One case -> heatmaps (per requested label) on the input's grid."""
        t0 = time.perf_counter()
        case = self._case(item, case_id)
        no_mask = Case(id=case.id, images=case.images, label=case.label, mask=None, split=case.split)
        prepared = prepare_case(no_mask, self.specs)
        targets = self._label_targets(labels)
        for inp, rec in prepared.records.items():
            check_heatmaps(prepared.sources.get(inp, rec.input_path), rec, len(targets))
        model = self.model
        model.eval()
        batch = self.runtime.batcher.batch([prepared])
        stacks = {s: x[0] for s, x in batch.slices.items()}
        streams = [s for s in model.streams if s in stacks]
        with EmbeddingCapture(model) as cap:  # the pooled embeddings, for the OOD score of the shared result
            emb, att, out = self._forward(batch)
        meta = [{"id": case.id, "sources": prepared.sources, "warnings": list(prepared.warnings)}]
        row = case_outputs(model.streams, out, batch, meta)[0]
        output = {"probabilities": model.probabilities(out.logits).float().cpu().numpy()[0], "case": row,
                  "embeddings": {s: e[0:1] if row["present"].get(s, False) else np.full_like(e[0:1], np.nan)
                                 for s, e in cap.take("task_query").items()}}
        sw = {s: out.slice_weights[s][0].float().cpu() for s in streams}
        vw = {s: float(out.view_weights[0, model.streams.index(s)]) for s in streams}
        probs = model.probabilities(out.logits.float())[0].cpu().numpy()

        label_w: dict[str, dict[str, np.ndarray]] = {lab: {} for lab, _, _ in targets}
        canon_by_input: dict[str, dict[str, np.ndarray]] = {lab: {} for lab, _, _ in targets}
        for s in streams:
            att_s = att[s] if self.method == "attention" else None
            self._stream_maps(s, prepared, stacks[s], emb[s], att_s, sw[s], vw[s], targets, label_w, canon_by_input)
        ref = next(k for k in self.spec.inputs if k in prepared.records)
        rec_ref = prepared.records[ref]
        maps, canonical = {}, {}
        for lab, _, _ in targets:
            maps[lab], canonical[lab] = self._label_map(canon_by_input[lab], prepared, rec_ref)
        probabilities, raw_probabilities = self._probabilities(probs)
        return Heatmaps(id=case.id, method=self.method, labels=[t[0] for t in targets], maps=maps,
                        canonical=canonical, record=rec_ref, reference_input=ref,
                        canonical_image=prepared.arrays[ref].numpy(),
                        slice_weights={s: v.numpy() for s, v in sw.items()}, label_slice_weights=label_w,
                        view_weights=vw, probabilities=probabilities, raw_probabilities=raw_probabilities,
                        seconds=time.perf_counter() - t0,
                        source=prepared.sources.get(ref, ""), output=output)

    def _stream_maps(self, s: str, prepared, stack: torch.Tensor, emb: torch.Tensor, att: torch.Tensor | None,
                     a: torch.Tensor, vw: float, targets: list[tuple[str, int, float]],
                     label_w: dict, canon_by_input: dict) -> None:
        """One stream's per-label slice maps, weighted by its slice and view weights, added (in canonical
        space) to ``canon_by_input[label][input]``; the slice weights used go to ``label_w[label][s]``."""
        model = self.model
        inp, view = s.split(":")
        spec, rec = self.specs[inp], prepared.records[inp]
        with torch.no_grad():
            z = model.head(emb).float().cpu()  # (S, n_outputs) per-slice logits (eval: dropout off)
        if self.spec.task_type == "multiclass":
            z = z - z.mean(dim=1, keepdim=True)
        if self.method == "attention":
            base = _upsample(att, spec.size)
            per_label = {lab: base for lab, _, _ in targets}
        else:
            from .gradcam import slice_cams

            cams = slice_cams(model, s, stack.to(self.runtime.device), [(i, sg) for _, i, sg in targets],
                              self.cam_layers)
            per_label = {lab: cams[(i, sg)].float().cpu() for lab, i, sg in targets}
        for lab, i, sg in targets:
            w = a
            if self.method == "attention" and self.spec.task_type != "binary":
                c = torch.relu(z[:, i] - (a * z[:, i]).sum())
                if float((a * c).sum()) > 0:
                    w = a * c / (a * c).sum()
            label_w[lab][s] = w.numpy()
            weighted = per_label[lab] * w[:, None, None]
            canon = slices_to_canonical(weighted, spec, view, rec) * vw
            prev = canon_by_input[lab].get(inp)
            canon_by_input[lab][inp] = canon if prev is None else prev + canon

    def _label_map(self, by_input: dict[str, np.ndarray], prepared, rec_ref) -> tuple[np.ndarray, np.ndarray]:
        """One label's inputs summed on the reference grid -> (input-grid map, canonical map), both
        clipped at 0, optionally smoothed and scaled so the input-grid map peaks at 1."""
        total = None
        for inp, arr in by_input.items():
            arr = _to_reference(arr, prepared.records[inp], rec_ref)
            total = arr if total is None else total + arr
        total = np.clip(total, 0, None)
        heat = np.clip(canonical_to_input(total, rec_ref, order=1), 0, None).astype(np.float32)
        if self.smooth_mm > 0:  # Gaussian, sigma in mm on the input grid (anisotropic spacing respected)
            spacing = np.sqrt((np.asarray(rec_ref.input_affine)[:3, :3] ** 2).sum(axis=0))
            heat = ndimage.gaussian_filter(heat, sigma=self.smooth_mm / spacing, mode="constant")
            total = ndimage.gaussian_filter(total, sigma=self.smooth_mm / np.sqrt(
                (np.asarray(rec_ref.canonical_affine)[:3, :3] ** 2).sum(axis=0)), mode="constant")
        scale = float(heat.max())
        if scale > 0:
            heat /= scale
            total = total / scale
        return heat, total.astype(np.float32)

    def _probabilities(self, probs) -> tuple[dict[str, float], dict[str, float]]:
        """``(calibrated, raw)`` probabilities per label name (calibrated == raw without a trust model)."""
        names = self.spec.label_names

        def as_dict(pr) -> dict[str, float]:
            if self.spec.task_type == "binary":
                return {names[0]: 1 - float(pr[0]), names[1]: float(pr[0])}
            return {n: float(v) for n, v in zip(names, pr)}

        trust = getattr(self.model, "trust", None)  # the calibrated probability, as every verb reports it
        raw_probabilities = as_dict(probs)
        probabilities = as_dict(trust.calibrate(np.asarray(probs)[None])[0]) if trust is not None else raw_probabilities
        return probabilities, raw_probabilities

    def _forward(self, batch):
        """The plugin's forward pass on the runtime, with hooks that keep each stream's slice
        embeddings and (attention method) the last block's class-to-patch attention."""
        model = self.model
        emb: dict[str, torch.Tensor] = {}
        att: dict[str, torch.Tensor] = {}
        stacks = batch.slices
        use_att = self.method == "attention"
        ctx = capture_cls_attention(model.backbone) if use_att else contextlib.nullcontext([])
        handles = []
        with ctx as store:
            for s in stacks:
                def hook(_m, inputs, _out, s=s):
                    emb[s] = inputs[0][0].detach().float()
                    if use_att:
                        n = inputs[0].shape[1]
                        maps = torch.cat(store).float().cpu()
                        store.clear()
                        h = w = int(round((maps.shape[1]) ** 0.5))
                        att[s] = maps.reshape(n, h, w)
                handles.append(model.slice_pool[s.replace(":", "__")].register_forward_hook(hook))
            try:
                with torch.no_grad():
                    out = self.runtime.forward(batch.replace(from_trunk=False))
            finally:
                for h in handles:
                    h.remove()
        return emb, att, out

    # ---- outputs -------------------------------------------------------------------------------
    def write(self, hm: Heatmaps, out_dir: str | Path, figure: bool = True, top_k: int = 6,
              mask: np.ndarray | None = None) -> list[Path]:
        """Write one NIfTI per label (input shape and affine) and, optionally, one PNG per label."""
        out_dir = Path(out_dir)
        paths = []
        for lab in hm.labels:
            p = write_nifti(hm.maps[lab], hm.affine, out_dir / hm.filename(lab, self.single_map))
            paths.append(p)
            if figure:
                from .figure import heatmap_figure

                png = out_dir / hm.filename(lab, self.single_map, "_heatmap.png")
                paths.append(heatmap_figure(hm, lab, png, top_k=top_k, mask=mask))
        return paths


__all__ = ["Explainer", "Heatmaps", "METHODS", "check_heatmaps"]
