"""One request's work on the loaded store: the predictions of ``anymc3d predict --plugins`` and the
heatmaps of ``anymc3d explain``, through the same objects (``MultiPredictor`` / ``Explainer`` on each
plugin's runtime). Nothing here runs a model itself.

:class:`Engine` is what one worker thread holds: the store's backbone and plugins loaded once, and one
heatmap explainer per plugin (built on first use). :func:`load_engines` loads ``workers`` of them.
"""
from __future__ import annotations

import json
import threading
from dataclasses import dataclass, field

import numpy as np

from ..errors import InputError
from .results import ResultsFull, ResultStore
from .uploads import Upload


class ServiceError(Exception):
    """An HTTP error with the one-line message of the CLI (``detail``)."""

    def __init__(self, status: int, detail: str, headers: dict | None = None) -> None:
        super().__init__(detail)
        self.status, self.detail, self.headers = status, detail, headers or {}


class Redactor:
    """Server paths out of answers: the plugin store (``<store>/lesion`` -> ``lesion``), the service's
    own folder and the temporary directory (-> ``<server>``)."""

    def __init__(self, store, *folders) -> None:
        import os
        import tempfile
        from pathlib import Path

        pairs = {}
        for p in {str(Path(store).resolve()), os.path.abspath(str(store)), os.path.realpath(str(store))}:
            pairs[p.rstrip("/") + "/"] = ""
            pairs[p.rstrip("/")] = "<store>"
        for f in [*folders, tempfile.gettempdir()]:
            for p in {os.path.abspath(str(f)), os.path.realpath(str(f))}:
                if len(p) > 1:
                    pairs[p.rstrip("/")] = "<server>"
        self.pairs = sorted(pairs.items(), key=lambda kv: -len(kv[0]))

    def __call__(self, text: str) -> str:
        for old, new in self.pairs:
            if old in text:
                text = text.replace(old, new)
        return text

    def json(self, obj):
        """``obj`` (JSON data) with every string redacted."""
        if isinstance(obj, str):
            return self(obj)
        if isinstance(obj, dict):
            return {self(k) if isinstance(k, str) else k: self.json(v) for k, v in obj.items()}
        if isinstance(obj, (list, tuple)):
            return [self.json(v) for v in obj]
        return obj


# ---- reader options (process-wide in anymc3d.io.options): on while any request reads ----------------
_reader_lock = threading.Lock()
_reader_users = 0
_reader_previous = None


class reader_scope:
    """The CLI's reader options (``--max-voxels``, ``--allow-gaps``, ``--series``, 1 or 3 channels) while
    requests are being read; the caller's options come back when the last request has finished, so a
    service created inside another program (the tests) leaves its settings unchanged."""

    def __init__(self, args) -> None:
        self.args = args

    def __enter__(self):
        global _reader_users, _reader_previous
        from ..io import options

        with _reader_lock:
            if _reader_users == 0:
                _reader_previous = options.OPTIONS
                options.apply_reader_args(self.args)
            _reader_users += 1
        return self

    def __exit__(self, *exc):
        global _reader_users
        from ..io import options

        with _reader_lock:
            _reader_users -= 1
            if _reader_users == 0:
                options.OPTIONS = _reader_previous
        return False


@dataclass
class Engine:
    predictor: object                       # anymc3d.store.multi.MultiPredictor
    explainers: dict = field(default_factory=dict)

    @property
    def tasks(self) -> list[str]:
        return self.predictor.tasks

    def subset(self, tasks: list[str] | None):
        """The predictor restricted to ``tasks`` (the same loaded plugins and cache)."""
        mp = self.predictor
        if not tasks:
            return mp
        return type(mp)(mp.backbone, [a for a in mp.attached if a.name in tasks], mp.skipped, mp.shared, mp.cache)

    def explainer(self, name: str):
        if name not in self.explainers:
            from ..explain.heatmap import Explainer

            at = next(a for a in self.predictor.attached if a.name == name)
            ex = Explainer(at.predictor, method="auto")
            ex.source = name  # the plugin's name: its server path never reaches an answer or a file
            self.explainers[name] = ex
        return self.explainers[name]


def load_engines(config) -> list[Engine]:
    """The store loaded ``config.workers`` times (once per worker thread). Store problems raise InputError."""
    from ..store.multi import MultiPredictor

    with reader_scope(config.reader_args()):
        return [Engine(MultiPredictor.from_store(config.plugins, weights=config.weights, device=config.device))
                for _ in range(config.workers)]


def parse_tasks(text: str | None, engine: Engine) -> list[str] | None:
    if text is None or not text.strip():
        return None
    wanted = [t.strip() for t in text.split(",") if t.strip()]
    unknown = [t for t in wanted if t not in engine.tasks]
    if unknown:
        skipped = {s["name"]: s["reason"] for s in engine.predictor.skipped}
        why = "; ".join(f"{t}: {skipped[t]}" for t in unknown if t in skipped)
        raise ServiceError(400, f"tasks: unknown task(s) {', '.join(unknown)}; this service runs "
                                f"{', '.join(engine.tasks)}" + (f" (skipped: {why})" if why else ""))
    return list(dict.fromkeys(wanted))


def plugins_info(engine: Engine) -> dict:
    mp = engine.predictor
    rows = []
    for a in mp.attached:
        s = a.model.spec
        rows.append({"task": a.name, "task_name": s.task, "task_type": s.task_type, "labels": list(s.label_names),
                     "threshold": float(s.threshold), "backbone": s.backbone,
                     "backbone_fingerprint": s.backbone_fingerprint, "inputs": list(s.inputs),
                     "streams": list(a.model.streams), "mode": a.mode})
    return {"backbone": mp.backbone.name, "backbone_fingerprint": mp.backbone.fingerprint, "plugins": rows,
            "skipped": [dict(s) for s in mp.skipped]}


def slice_positions(hm, explainer) -> dict[str, list[list[float]]]:
    """World (RAS mm) centre of every slice of each stream of the reference input: where a click on the
    slice-weight curve puts the viewer's crosshair. Slice i of n covers canonical index
    (i + 0.5) * N / n - 0.5 along the view's axis (the inverse of ``max_slices`` resampling)."""
    from ..preprocess import VIEW_AXIS

    rec = hm.record
    shape = [int(v) for v in rec.canonical_shape]
    aff = np.asarray(rec.canonical_affine, dtype=float)
    out = {}
    for stream, w in hm.slice_weights.items():
        inp, view = stream.split(":")
        if inp != hm.reference_input:
            continue
        axis, n = VIEW_AXIS[view], len(w)
        pts = []
        for i in range(n):
            vox = [(d - 1) / 2.0 for d in shape]
            vox[axis] = (i + 0.5) * shape[axis] / n - 0.5
            pts.append([round(float(v), 3) for v in (aff @ np.array([*vox, 1.0]))[:3]])
        out[stream] = pts
    return out


def run_request(engine: Engine, upload: Upload, tasks: list[str] | None, heatmaps: bool, results: ResultStore,
                reader_args, url_prefix: str = "") -> dict:
    """Predict (and explain) one uploaded volume; returns the JSON of ``predict --plugins`` plus heatmap URLs."""
    from ..predict import case_id_from

    case_id = case_id_from(upload.filename) if not upload.path.is_dir() else upload.path.name
    mp = engine.subset(tasks)
    try:
        with reader_scope(reader_args):
            result = mp.predict(str(upload.path), case_id=case_id)
            extra = _heatmaps(engine, upload, case_id, result, results, url_prefix) if heatmaps else None
    except ResultsFull:
        raise
    except InputError as exc:
        raise ServiceError(422, upload.public(" ".join(str(exc).split()))) from exc
    out = json.loads(upload.public(json.dumps(result, default=float)))
    if extra is not None:
        out.update(extra)
    return out


def _heatmaps(engine: Engine, upload: Upload, case_id: str, result: dict, results: ResultStore,
              url_prefix: str) -> dict:
    from ..io import read_volume, write_nifti

    rid, folder = results.new()
    try:
        base = f"{url_prefix}/v1/results/{rid}"
        maps = {}
        for name in result["tasks"]:
            ex = engine.explainer(name)
            hm = ex.explain(str(upload.path), case_id=case_id)
            files = ex.write(hm, folder / name, figure=True)
            for p in files:
                results.register(rid, p)
            labels = {}
            for lab in hm.labels:
                nii = hm.filename(lab, ex.single_map)
                png = hm.filename(lab, ex.single_map, "_heatmap.png")
                labels[lab] = {"nifti": f"{base}/{name}/{nii}", "png": f"{base}/{name}/{png}",
                               "slice_weights": {s: [float(v) for v in w] for s, w in hm.label_slice_weights[lab].items()}}
            maps[name] = {"method": hm.method, "labels": labels, "view_weights": hm.view_weights,
                          "slice_positions_mm": slice_positions(hm, ex), "seconds": round(hm.seconds, 4)}
        vol = read_volume(str(upload.path), content_warnings=False)
        arr = vol.array if vol.array.ndim == 3 else vol.array[0]
        image = write_nifti(arr.astype(np.float32), vol.affine, folder / "image.nii.gz")
        results.register(rid, image)
        results.publish(rid)
    except BaseException:
        results.discard(rid)
        raise
    return {"heatmaps": maps, "result": {"id": rid, "image": f"{base}/image.nii.gz",
                                         "expires_in_s": round(results.ttl_s)}}
