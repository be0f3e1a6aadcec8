"""``anymc3d predict ... --out DIR``: progressive, sharded, resumable prediction into a folder.

The same for one plugin (``predict PLUGIN IMAGE...``) and for a store (``predict --plugins STORE
IMAGE...``); single-process or under ``torchrun`` (one share of the volumes per rank):

1. **Which volumes are left.** Rank 0 lists the inputs whose ``DIR/<id>.json`` is missing or not
   complete (not valid JSON, another case id, written by another plugin - the plugin's tensor
   sha256 is recorded in every JSON - or, with ``--heatmaps``, a heatmap file missing) and sends
   the list to every rank; ``--overwrite`` redoes every volume. Leftover temporaries
   (``.tmp-*``) of a killed run are removed.
2. **Bad input fails before anything is written.** Every rank checks each of its volumes from its
   header (the reader's checks without reading a voxel: unreadable or truncated files, voxel type,
   dimensions, channels, size limit, geometry; a DICOM series folder from its files'
   headers: series, order, gaps),
   and plans its preprocessing (the allocation guards); the ranks compare notes, and if any volume is
   bad the run stops with the project's one line ``anymc3d: error: <file>: <cause>`` and exit code 2,
   and nothing is written. What only the voxels show (NaN/Inf values, a damaged .nii.gz) stops the
   run, with the same line, when that volume is read for its prediction; the volumes before it are
   written and a rerun resumes. ``--no-input-check`` skips the check (outputs start at once).
3. **Progressive output.** Each rank predicts its share (round robin over the pending volumes)
   through one loader over all of it, whose ``--workers`` read and prepare the next volumes while the
   model runs (with ``--heatmaps``, one volume at a time), and writes every volume's outputs as soon
   as it is done, each file atomically (temporary file +
   rename): heatmaps first, the JSON last, so an existing JSON means a finished volume. A rank that
   dies loses only the volumes in flight (at most one batch).
4. **Merge.** After a barrier, rank 0 writes ``predictions.csv`` once (several inputs), sorted by case
   id, one row per input volume, from the JSON files (so volumes finished by an earlier run are in it).

A rerun with the same command finishes the job: finished volumes are skipped (their files are not
touched), nothing is duplicated. Two inputs that would write the same ``<id>.json`` are refused
up front.
"""
from __future__ import annotations

import csv
import json
import time
from pathlib import Path
from typing import Callable, NamedTuple

from .errors import InputError
from .io import atomic_write, write_json
from .runtime import distributed as dist
from .plugins.trust import trust_text
from .runtime.results import decision_text


# ------------------------------------------------------------------------------------------ jobs
class PluginJob:
    """One plugin (``anymc3d.predict.Predictor``); with ``heatmaps`` also its heatmaps (``explain``)."""

    def __init__(self, predictor, heatmaps: bool = False) -> None:
        self.predictor = predictor
        self.spec = predictor.spec
        self.sha = self.spec.tensors_sha256 or ""
        self.explainer = None
        if heatmaps:
            from .explain.heatmap import Explainer

            self.explainer = Explainer(predictor, method="auto")
            self.explainer.source = getattr(predictor, "source", "")

    def images(self, item) -> list:
        case = self.predictor.case(item)
        return [v for v in case.images.values() if v is not None]

    def plans(self, item) -> list:
        """(image, preprocessing spec, heatmap labels) for every input of ``item``: what the input check plans."""
        case = self.predictor.case(item)
        n = len(self.explainer.default_labels()) if self.explainer is not None else 0
        return [(v, self.predictor.specs[k], n) for k, v in case.images.items() if v is not None]

    def predict(self, item, case_id: str, mask=None, out: Path | None = None, label=None) -> dict:
        """One volume's result; with heatmaps, from the pass that made them (read and run once)."""
        if self.explainer is None:
            res = self.predictor.predict(item, case_id=case_id)
        else:
            hm = self.explainer.explain(item, case_id=case_id)
            o = hm.output
            res = self.predictor.result(case_id, o["probabilities"], o["case"], o["embeddings"])
            res["heatmaps"] = self._heatmaps(hm, case_id, mask, out, label)
        res["plugin_sha256"] = self.sha
        return res

    def predict_stream(self, entries: list, out: Path, batch_size: int = 4):
        """The results of ``entries`` in order, each as its batch is done (one loader over all of them);
        with heatmaps one at a time, as :meth:`predict`."""
        if self.explainer is not None:
            for e in entries:
                yield self.predict(e.item, e.id, mask=e.mask, out=out, label=e.label)
            return
        for res in self.predictor.predict_stream([e.item for e in entries], [e.id for e in entries], batch_size):
            res["plugin_sha256"] = self.sha
            yield res

    def _heatmaps(self, hm, case_id: str, mask, out: Path, label=None) -> dict:
        """Write this volume's maps and figure; with a mask (a manifest's mask column) also its
        localisation scores, kept in the volume's JSON until the merge writes ``localization.json``."""
        from .explain.localization import load_mask, score_case

        m = load_mask(mask, hm.record) if mask is not None else None
        files = self.explainer.write(hm, out, figure=True, top_k=6, mask=m)
        entry = {"method": hm.method, "labels": hm.labels, "files": [p.name for p in files]}
        if m is not None:
            entry["mask"] = str(getattr(mask, "source", mask))
            entry["scores"] = score_case(self.explainer, hm, m, case_id, label)  # None: empty mask
        return entry

    def complete(self, res: dict, case_id: str, out: Path, has_mask: bool = False) -> bool:
        if not (res.get("id") == case_id and isinstance(res.get("probabilities"), dict)
                and res.get("plugin_sha256", None) == self.sha and res.get("task") == self.spec.task
                and res.get("backbone_fingerprint") == self.spec.backbone_fingerprint):
            return False
        if self.explainer is not None:
            hm = res.get("heatmaps") or {}
            files = hm.get("files")
            # a volume that has a mask now but was explained without one lacks its localisation scores
            return bool(files) and all((out / f).is_file() for f in files) and (not has_mask or "mask" in hm)
        return True

    def line(self, res: dict) -> str:
        # with the threshold that made the decision, the conformal set and the OOD score
        return _note_once(self, res) + f"{res['id']}: {decision_text(res)}{trust_text(res)}" + _ood_warning(res)

    def table(self, rows: list[dict]) -> tuple[list[str], list[list]]:
        names = list(rows[0]["probabilities"])
        body = [[r["id"], *[f"{r['probabilities'][n]:.6f}" for n in names], ";".join(r["predicted"]), *_trust_cells(r)]
                for r in rows]
        return ["id", *[f"p_{n}" for n in names], "predicted", *TRUST_COLUMNS], body

    def finish(self, rows: list[dict], out: Path) -> None:
        """With heatmaps: ``explain.json`` (which files belong to which case), as ``anymc3d explain`` writes."""
        if self.explainer is None:
            return
        from .explain.localization import localization_table

        cases = [{"id": r["id"], "probabilities": r["probabilities"], **r["heatmaps"]} for r in rows]
        write_json({"plugin": self.explainer.source, "backbone": self.spec.backbone, "method": self.explainer.method,
                    "cases": cases}, out / "explain.json", default=float)
        masked = [c for c in cases if "mask" in c]
        if masked:  # the same tables as ``anymc3d explain``, from every rank's per-volume scores
            localization_table(self.explainer, [s for c in masked for s in (c["scores"] or [])],
                               [c["id"] for c in masked if c["scores"] is None], out)


class StoreJob:
    """Every compatible plugin of a store (``anymc3d.store.multi.MultiPredictor``) on each volume."""

    def __init__(self, mp) -> None:
        self.mp = mp
        self.shas = {a.name: a.model.spec.tensors_sha256 or "" for a in mp.attached}

    def images(self, item) -> list:
        seen = []
        for a in self.mp.attached:
            for v in a.predictor.case(item).images.values():
                if v is not None and not any(v is s or str(v) == str(s) for s in seen):
                    seen.append(v)
        return seen

    def plans(self, item) -> list:
        return [(v, a.predictor.specs[k], 0) for a in self.mp.attached
                for k, v in a.predictor.case(item).images.items() if v is not None]

    def predict(self, item, case_id: str, mask=None, out: Path | None = None, label=None) -> dict:
        res = self.mp.predict(item, case_id=case_id)
        res["plugins_sha256"] = self.shas
        return res

    def complete(self, res: dict, case_id: str, out: Path, has_mask: bool = False) -> bool:
        return (res.get("id") == case_id and isinstance(res.get("tasks"), dict)
                and res.get("plugins_sha256") == self.shas
                and res.get("backbone_fingerprint") == self.mp.backbone.fingerprint)

    def line(self, res: dict) -> str:
        notes = "".join(_note_once(self, r, t) for t, r in res["tasks"].items())
        return (notes + f"{res['id']}: " + "; ".join(f"{t}: {decision_text(r)}{trust_text(r)}" for t, r in res["tasks"].items())
                + f"  ({res['seconds']:.2f} s)" + "".join(_ood_warning(r, t) for t, r in res["tasks"].items()))

    def table(self, rows: list[dict]) -> tuple[list[str], list[list]]:
        names = {t: next((list(r["tasks"][t]["probabilities"]) for r in rows if t in r["tasks"]), [])
                 for t in self.mp.tasks}
        cols = [(t, n) for t in self.mp.tasks for n in names[t]]
        header = ["id", *[f"{t}:p_{n}" for t, n in cols], *[f"{t}:predicted" for t in self.mp.tasks]]
        body = []
        for r in rows:
            probs = [r["tasks"].get(t, {}).get("probabilities", {}).get(n) for t, n in cols]
            body.append([r["id"], *["" if p is None else f"{p:.6f}" for p in probs],
                         *[";".join(r["tasks"].get(t, {}).get("predicted", [])) for t in self.mp.tasks]])
        return header, body

    def finish(self, rows: list[dict], out: Path) -> None:
        return None


# ------------------------------------------------------------------------------------------ helpers
TRUST_COLUMNS = ("prediction_set", "ood_score", "ood_flag")


def _trust_cells(r: dict) -> list[str]:
    ps, o = r.get("prediction_set"), r.get("ood")
    return [";".join(ps["labels"]) if ps else "", f"{o['score']:.6g}" if o else "", str(o["flag"]).lower() if o else ""]


def _note_once(job, res: dict, task: str = "") -> str:
    """A plugin's ``trust_note`` (e.g. an old plugin without calibration/OOD), printed before its first line."""
    note = res.get("trust_note")
    seen = job.__dict__.setdefault("_notes_shown", set())
    if not note or (task, note) in seen:
        return ""
    seen.add((task, note))
    return f"note: {task + ': ' if task else ''}{note}\n"


def _ood_warning(res: dict, task: str = "") -> str:
    o = res.get("ood")
    if not o or not o.get("flag"):
        return ""
    w = next((w for w in res.get("warnings", []) if w.startswith("out of distribution")), "out of distribution")
    return f"\nwarning: {res['id']}: {task + ': ' if task else ''}{w}"


def _read_json(path: Path) -> dict | None:
    try:
        obj = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return obj if isinstance(obj, dict) else None


class _Entry(NamedTuple):
    """One input of the job: its position in the input list, case id, item, and a manifest's mask and label."""
    index: int
    id: str
    item: object
    mask: object = None
    label: object = None


def check_inputs(job, entries: list[_Entry]) -> tuple[int, str] | None:
    """Check every volume of ``entries`` from its header (``read_volume(..., header_only=True)``: the
    reader's checks of size, voxel type, dimensions, channels and geometry, no voxel read) and plan its
    preprocessing (the allocation guards of the resampled grid, the slice stacks and the heatmaps);
    the first problem as (index, message), or None. What only the voxels show (NaN/Inf, a damaged
    .nii.gz) stops the run when that volume is predicted, with the same one line. Reader warnings are
    not printed here (the prediction of that volume prints them)."""
    import contextlib
    import io

    from .io import read_volume
    from .preprocess import plan_volume
    from .volume import Volume

    for e in entries:
        try:
            # silent: a questionable volume's warning line comes once, from its prediction
            with contextlib.redirect_stderr(io.StringIO()):
                read: dict[str, Volume] = {}
                plans = job.plans(e.item) if hasattr(job, "plans") else [(v, None, 0) for v in job.images(e.item)]
                for img, spec, n_heat in plans:
                    vol = img if isinstance(img, Volume) else read.get(str(img))
                    if vol is None:
                        vol = read[str(img)] = read_volume(img, header_only=True)
                    if spec is not None:
                        record = plan_volume(vol, spec)
                        if n_heat:
                            from .explain.heatmap import check_heatmaps

                            check_heatmaps(vol.source, record, n_heat)
                del read
        except InputError as exc:
            return e.index, str(exc)
    return None


def _remove_temporaries(out: Path) -> int:
    n = 0
    for p in out.glob(".tmp-*"):
        if p.is_file():
            p.unlink(missing_ok=True)
            n += 1
    return n


def _write_table(job, rows: list[dict], out: Path) -> None:
    header, body = job.table(rows)
    with atomic_write(out / "predictions.csv") as tmp:
        with open(tmp, "w", newline="", encoding="utf-8") as fh:
            w = csv.writer(fh)
            w.writerow(header)
            w.writerows(body)


# ------------------------------------------------------------------------------------------ the run
def summary_line(summary: dict, out: Path) -> str:
    """The one line ``predict --out`` ends with (rank 0): how many JSONs it wrote, skipped, on how many ranks."""
    return (f"wrote {summary['n'] - summary['skipped']} JSON file(s) to {out}"
            + (f" ({summary['skipped']} already done)" if summary["skipped"] else "")
            + (f"; {summary['world']} ranks" if summary["world"] > 1 else ""))


def predict_to_folder(job, items: list, out: str | Path, overwrite: bool = False, input_check: bool = True,
                      log: Callable = print, warn: Callable | None = None) -> dict:
    """Predict ``items`` ((case id or None, item) pairs from :func:`anymc3d.inputs.expand_inputs`) into ``out``.

    Returns ``{"n", "skipped", "predicted", "rank", "world"}`` (this rank's counts; ``n`` and
    ``skipped`` are the whole job's)."""
    from .predict import case_id_from

    out = Path(out)
    entries = []
    for i, it in enumerate(items):
        cid, item = it.id if hasattr(it, "id") else it[0], it.item if hasattr(it, "item") else it[1]
        entries.append(_Entry(i, cid or case_id_from(item), item, getattr(it, "mask", None), getattr(it, "label", None)))
    seen: dict[str, object] = {}
    for e in entries:
        if not e.id or e.id in (".", "..") or any(c in "/\\" or ord(c) < 32 or ord(c) == 127 for c in e.id):
            raise InputError(f"{e.item}: its case id {e.id!r} cannot name a file in {out} (a path separator, '..' "
                             f"or a control character); give ids of letters, digits, '.', '_', '-'")
        if e.id in seen:
            raise InputError(f"{e.item}: has the case id {e.id!r} of another input ({seen[e.id]}); both would write "
                             f"{out / (e.id + '.json')} (give a manifest with an id column)")
        seen[e.id] = e.item

    # 1. what is left to do: decided once (rank 0), the same list on every rank
    pending = None
    if dist.is_main():
        pending = [e.index for e in entries if overwrite or not (
            (res := _read_json(out / f"{e.id}.json")) is not None and job.complete(res, e.id, out, e.mask is not None))]
    pending = dist.broadcast_object(pending)
    mine = [entries[i] for i in dist.shard(pending)]

    # 2. bad input: every rank reads its share; any problem stops every rank before anything is written
    if input_check:
        bad = dist.all_gather_object(check_inputs(job, mine))
        bad = min((b for b in bad if b is not None), default=None)
        if bad is not None:
            if dist.is_main():
                raise InputError(bad[1])
            raise SystemExit(2)  # rank 0 reports it: one line for the whole job

    if dist.is_main():
        out.mkdir(parents=True, exist_ok=True)
        _remove_temporaries(out)
    dist.barrier()

    # 3. this rank's volumes, each written as soon as it is done (JSON last: the completion mark)
    t0 = time.perf_counter()
    if hasattr(job, "predict_stream"):  # one loader over this rank's volumes, workers preparing ahead
        results = job.predict_stream(mine, out)
    else:
        results = (job.predict(e.item, e.id, mask=e.mask, out=out, label=e.label) for e in mine)
    for e, res in zip(mine, results):
        write_json(res, out / f"{e.id}.json")
        log(job.line(res))
        if warn is not None:
            warn(res)
    seconds = time.perf_counter() - t0
    dist.barrier()

    # 4. merge (rank 0): predictions.csv once, sorted by case id, from every input's JSON
    summary = {"n": len(entries), "skipped": len(entries) - len(pending), "predicted": len(mine),
               "rank": dist.rank(), "world": dist.world_size(), "seconds": round(seconds, 3)}
    if dist.is_main():
        rows = []
        for e in sorted(entries, key=lambda e: e.id):
            res = _read_json(out / f"{e.id}.json")
            if res is None or not job.complete(res, e.id, out, e.mask is not None):
                raise RuntimeError(f"{out / (e.id + '.json')}: missing or incomplete after every rank finished")
            rows.append(res)
        if len(rows) > 1:
            _write_table(job, rows, out)
        job.finish(rows, out)
    return summary
