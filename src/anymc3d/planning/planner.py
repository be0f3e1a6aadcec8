"""The training plan (``plan.json``): settings derived from the dataset fingerprint and the measured
timing table, chosen so the whole run fits the time budget.

Rules (each one chosen on validation splits and the synthetic suite, docs/results.md issue 15):

* **slice size**: never far beyond the native in-plane size: the native side rounded up to a
  multiple of 32, at least 64 (a stride-32 CNN needs 2 x 2 final maps) and at most the backbone's
  size. With a GPU the backbone's own size (the paper's recipe).
* **views**: axial + coronal + sagittal when the volume is close to isotropic (spacing ratio <= 3)
  and every axis has at least 16 voxels; else axial only.
* **candidates, best first**. CPU: LoRA on the last stage with the frozen trunk cached (computed
  once, then every epoch reads it) without augmentation (augmented slices cannot be cached), all
  slices, 15 epochs; then the same on a random subset of slices per volume and view; then fewer
  views, fewer epochs, smaller subsets. GPU: the paper's recipe first: full-depth LoRA, 3D
  augmentation, 30 epochs; then the CPU list. The first candidate whose estimate fits the budget
  is the plan.
* **estimate**: reading + preprocessing every volume, the frozen trunk once per volume (cached
  plans), every epoch's training steps on the (subset of) slices and validation on all of them, and
  test scoring, each from the measured per-volume / per-slice costs. Early stopping can only
  shorten the run.
* **validation and prediction** always use every slice.
* **selection** (:func:`selection`, ``Plan.select``): training compares the chosen candidate and the
  ones after it in the quality order while their estimates' sum fits the budget (at most
  :data:`MAX_SELECT`) and keeps the best on validation (:mod:`anymc3d.training.selection`).
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..errors import InputError
from ..evaluation.threshold import DEFAULT_POLICY
from .fingerprint import in_plane_size, slices_per_view

PLAN_VERSION = 1
#: the plan fields a user flag can override (``anymc3d train --epochs ...``)
FIELDS = ("size", "views", "lora_last_k", "augment", "slice_subset", "max_slices", "epochs", "batch_size", "patience",
          "flip_copies", "test_flips", "ensemble", "neighbours", "ema", "swa", "label_smoothing",
          "mixup", "view_dropout")
MIN_SIZE = 64
MIN_AXIS_FOR_VIEWS = 16
MAX_ANISOTROPY_FOR_VIEWS = 3.0
#: at least this many optimiser steps: small training sets get more epochs (measured on the synthetic
#: suite's validation split: 15 epochs = 180 steps left `elongated` at val AUC 0.86, a 60-epoch
#: schedule (720 steps) reached 1.0; docs/results.md issue 15)
MIN_STEPS = 720
MAX_EPOCHS = 100
OVERHEAD_S = 15.0  # building the model, writing the plugin, metrics and report
#: the measured quality order: each candidate's expected validation AUC, with the commands that measured it
PRIORS_FILE = Path(__file__).with_name("priors.json")


#: the training-dynamics candidates' settings: the EMA's per-step decay (a horizon of ~100 optimiser steps)
#: and the label smoothing
EMA_DECAY = 0.99
LABEL_SMOOTHING = 0.1
#: the regularisation candidates' settings: mixup's Beta(a, a) and the view-dropout probability
MIXUP_ALPHA = 0.4
VIEW_DROPOUT = 0.2


#: a candidate's settings in the plan (``Plan.select`` entries): the plan fields and the trunk cache
SETTINGS = (*FIELDS, "cache")
#: at most this many candidates are trained and compared on validation (:func:`selection`)
MAX_SELECT = 6


#: count fields where a flag's 0 ("all": full-depth LoRA, every slice) is None in a plan
ALL_IS_NONE = ("lora_last_k", "slice_subset", "max_slices")


def none_for_all(d: dict) -> dict:
    """``d`` with its count fields' 0 ("all" from ``--lora-last-k all`` / ``--slice-subset all``) as None."""
    return {**d, **{k: d.get(k) or None for k in ALL_IS_NONE}}


@dataclass
class Plan:
    size: int
    views: list[str]
    lora_last_k: int | None          # None: LoRA in every block (full depth)
    augment: bool
    slice_subset: int | None         # training slices per volume and view (None: all)
    epochs: int
    max_slices: int | None = None    # deeper views are resampled to this many slices (also at prediction)
    batch_size: int = 8
    patience: int = 5
    flip_copies: int = 0             # cached flipped copies of every training volume (training.trainer)
    test_flips: list[str] = field(default_factory=list)  # in-plane flips averaged at prediction (plugin spec)
    ensemble: int = 1                # members trained together on the one cached trunk (plugin spec)
    neighbours: bool = False         # 2.5D slices: the slice and its two neighbours as the channels (preprocess spec)
    ema: float = 0.0                 # per-step decay of the trainable weights' EMA (training.averaging; 0: off)
    swa: float = 0.0                 # SWA of the epoch-end weights from this fraction of the epochs on (training.averaging)
    label_smoothing: float = 0.0     # label smoothing of the classification loss (0: off)
    mixup: float = 0.0               # Beta(a, a) mixup of slice embeddings (plugins.mixup; 0: off)
    view_dropout: float = 0.0        # probability of hiding a training case's view from the fusion (0: off)
    cache: str = "memory"            # trunk activations: memory | disk | none
    workers: int = 0
    device: str = "cpu"
    threads: int | None = None       # CPU threads to train with (measured: all, or 1 when the cores are busy)
    threshold: str = DEFAULT_POLICY
    budget_s: float | None = None
    estimate_s: float = 0.0
    estimate: dict = field(default_factory=dict)
    candidate: int = 0
    name: str = ""                   # the chosen candidate's name (its key in priors.json)
    prior: float | None = None       # its prior (expected validation AUC), None where none was measured
    considered: list[dict] = field(default_factory=list)  # every candidate: name, estimate, prior, fits
    backbone: str = ""               # the backbone it trains (fixed by --backbone, or the race's winner)
    race: list[dict] = field(default_factory=list)  # the backbone race (planning.race), empty when none ran
    select: list[dict] = field(default_factory=list)  # the candidates trained and compared on validation (selection)
    select_estimate_s: float = 0.0   # their estimates' sum (the whole training run's estimate)
    overridden: list[str] = field(default_factory=list)
    reasons: dict = field(default_factory=dict)
    version: int = PLAN_VERSION

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Plan":
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})

    @property
    def cached(self) -> bool:
        return self.lora_last_k is not None and not self.augment


def parse_budget(text: str | float | int | None) -> float | None:
    """``30m``, ``1.5h``, ``90s`` or a number of seconds -> seconds (None: no budget)."""
    if text is None or text == "" or text == "none":
        return None
    if isinstance(text, (int, float)):
        return float(text)
    t = str(text).strip().lower()
    mult = {"s": 1, "m": 60, "h": 3600}
    try:
        if t[-1] in mult:
            v = float(t[:-1]) * mult[t[-1]]
        else:
            v = float(t)
    except (ValueError, IndexError):
        raise InputError(f"--budget: expected a duration like 30m, 1.5h or 900s, got {text!r}") from None
    if not v > 0:
        raise InputError(f"--budget: must be positive, got {text!r}")
    return v


def fmt_duration(s: float) -> str:
    s = max(0.0, float(s))
    if s < 90:
        return f"{s:.0f} s"
    if s < 5400:
        return f"{s / 60:.0f} min"
    return f"{s / 3600:.1f} h"


def choose_size(fp: dict, backbone_size: int, device_type: str) -> tuple[int, str]:
    if device_type == "cuda":
        return int(backbone_size), "GPU: the backbone's own slice size (the paper's recipe)"
    native = in_plane_size(fp)
    size = int(min(backbone_size, max(MIN_SIZE, 32 * math.ceil(native / 32))))
    return size, (f"native in-plane {native:.0f} px -> {size} (multiple of 32, >= {MIN_SIZE}, "
                  f"<= the backbone's {backbone_size}): no upsampling far beyond the data")


def choose_views(fp: dict) -> tuple[list[str], str]:
    inp = next(iter(fp["inputs"].values()))
    small = min(inp["shape"][a]["median"] for a in "xyz")
    aniso = inp["anisotropy"]
    if small >= MIN_AXIS_FOR_VIEWS and aniso <= MAX_ANISOTROPY_FOR_VIEWS:
        return ["axial", "coronal", "sagittal"], (f"near-isotropic (spacing ratio {aniso:.1f} <= {MAX_ANISOTROPY_FOR_VIEWS:g}), "
                                                  f"smallest axis {small:.0f} >= {MIN_AXIS_FOR_VIEWS}: three views")
    return ["axial"], (f"spacing ratio {aniso:.1f} or smallest axis {small:.0f} voxels: axial only "
                       f"(three views need ratio <= {MAX_ANISOTROPY_FOR_VIEWS:g} and >= {MIN_AXIS_FOR_VIEWS} voxels)")


def candidates(views: list[str], device_type: str) -> list[dict]:
    """Plan candidates in the cost order of the list (see the module docstring); each has a ``name``
    that keys its prior in ``priors.json``."""
    few = ["axial"]
    base = dict(lora_last_k=1, augment=False, max_slices=None, flip_copies=0, test_flips=[], ensemble=1, ema=0.0,
                label_smoothing=0.0, mixup=0.0, view_dropout=0.0)
    flips = dict(base, flip_copies=3, test_flips=["w", "h", "hw"])
    cpu = [
        dict(flips, name="k1_all_flips_ens3", views=views, slice_subset=None, epochs=15, ensemble=3),
        dict(flips, name="k1_all_flips", views=views, slice_subset=None, epochs=15),
        dict(base, name="k1_all_tta", views=views, slice_subset=None, epochs=15, test_flips=["w", "h", "hw"]),
        dict(base, name="k1_all_ema", views=views, slice_subset=None, epochs=15, ema=EMA_DECAY),
        dict(base, name="k1_all_ls", views=views, slice_subset=None, epochs=15, label_smoothing=LABEL_SMOOTHING),
        dict(flips, name="k1_all_flips_mix", views=views, slice_subset=None, epochs=15, mixup=MIXUP_ALPHA),
        dict(base, name="k1_all_mix", views=views, slice_subset=None, epochs=15, mixup=MIXUP_ALPHA),
        dict(base, name="k1_all_vd", views=views, slice_subset=None, epochs=15, view_dropout=VIEW_DROPOUT),
        dict(base, name="k1_all", views=views, slice_subset=None, epochs=15),
        dict(base, name="k1_sub16", views=views, slice_subset=16, epochs=15),
        dict(base, name="k1_sub8", views=views, slice_subset=8, epochs=10),
        dict(base, name="k1_sub8_depth32", views=views, slice_subset=8, epochs=10, max_slices=32),   # deep volumes
        dict(base, name="axial_k1_all", views=few, slice_subset=None, epochs=15),
        dict(base, name="axial_k1_sub16", views=few, slice_subset=16, epochs=10),
        dict(base, name="axial_k1_sub8_depth32", views=few, slice_subset=8, epochs=5, max_slices=32),
        dict(base, name="axial_k1_sub8_depth16", views=few, slice_subset=8, epochs=5, max_slices=16),
    ]
    if device_type == "cuda":
        gpu = dict(base, views=views, lora_last_k=None, augment=True, epochs=30)
        return [dict(gpu, name="gpu_full_aug", slice_subset=None), dict(gpu, name="gpu_full_aug_sub16", slice_subset=16)] + cpu
    return cpu


def load_priors(path: str | Path | None = None) -> dict[str, float]:
    """Candidate name -> prior (the expected validation AUC, ``priors.json`` next to this module, or ``path``);
    candidates without a measured prior are absent."""
    p = Path(path) if path is not None else PRIORS_FILE
    data = json.loads(p.read_text(encoding="utf-8"))
    return {k: float(v["prior"]) for k, v in data["candidates"].items() if v.get("prior") is not None}


def quality_order(cands: list[dict], priors: dict[str, float], device_type: str) -> list[int]:
    """Indices of ``cands``, best expected first: on a CPU, candidates with a measured prior by prior
    (highest first; ties keep the list order), then the unmeasured ones in the list's cost order. On a
    GPU the list order (the paper's recipe first): the priors were measured on CPU recipes."""
    idx = list(range(len(cands)))
    if device_type == "cuda":
        return idx
    known = sorted((i for i in idx if cands[i]["name"] in priors), key=lambda i: (-priors[cands[i]["name"]], i))
    return known + [i for i in idx if cands[i]["name"] not in priors]


def split_sizes(fp: dict) -> tuple[int, int, int]:
    """(train, val, test) cases; without a split column as assign_splits carves them (15 % test,
    15 % of the rest val)."""
    splits = fp["splits"]
    n_va, n_te = splits.get("val", 0), splits.get("test", 0)
    if not splits.get("train") and splits.get("unassigned"):
        n = splits["unassigned"]
        n_te = n_te or int(round(0.15 * n))
        n_va = n_va or int(round(0.15 * (n - n_te)))
        return n - n_te - n_va, n_va, n_te
    return splits.get("train", 0), n_va, n_te


def epochs_for(fp: dict, epochs: int, batch_size: int) -> int:
    """``epochs``, raised so the run makes at least MIN_STEPS optimiser steps (at most MAX_EPOCHS)."""
    steps = max(1, math.ceil(split_sizes(fp)[0] / batch_size))
    return int(max(epochs, min(MAX_EPOCHS, math.ceil(MIN_STEPS / steps))))


def estimate(c: dict, fp: dict, t: dict, size: int) -> dict:
    """Seconds of each part of a run with candidate ``c`` (per-slice costs from the timing table ``t``)."""
    from ..training.run import COLD_TIMING_VOLUMES  # what score_splits times cold (lazy: keeps CLI start-up light)

    n_tr, n_va, n_te = split_sizes(fp)
    spv = slices_per_view(fp, max_slices=c.get("max_slices"))
    per_case = sum(spv[v] for v in c["views"])
    per_case_train = sum(min(spv[v], c["slice_subset"] or spv[v]) for v in c["views"])
    n_all = n_tr + n_va + n_te
    scale = 1.0 if t.get("size", size) == size else (size / t["size"]) ** 2  # timed at another size
    g = {k: t[k] * scale for k in ("trunk_fwd_s", "tail_step_s", "tail_fwd_s", "full_step_s", "full_fwd_s")}
    k_members = int(c.get("ensemble") or 1)  # every member runs its own tail (the trunk once for all)
    g["tail_step_s"] *= k_members
    g["tail_fwd_s"] *= k_members
    if c["lora_last_k"] is None:  # full depth: each member runs the whole backbone
        g["full_step_s"] *= k_members
        g["full_fwd_s"] *= k_members
    parts = {"preprocess": n_all * t["prep_s_per_volume"]}
    if c["lora_last_k"] is not None:
        cold_fwd = g["trunk_fwd_s"] + g["tail_fwd_s"]
        if c["augment"]:  # augmented training slices run the trunk every epoch; val / test are cached
            parts["trunk_once"] = (n_va + n_te) * per_case * g["trunk_fwd_s"]
            epoch = n_tr * (per_case_train * (g["trunk_fwd_s"] + g["tail_step_s"]) + t["aug_s_per_volume"])
        else:
            parts["trunk_once"] = n_all * per_case * g["trunk_fwd_s"]
            epoch = n_tr * per_case_train * g["tail_step_s"]
        epoch += n_va * per_case * g["tail_fwd_s"]
        # after training, validation and test are scored through the whole backbone (training.run.train_plugin),
        # plus the cold timing of a few test volumes
        parts["test"] = (n_va + n_te) * per_case * cold_fwd + min(COLD_TIMING_VOLUMES, n_te) * per_case * cold_fwd
    else:
        epoch = n_tr * per_case_train * g["full_step_s"] + n_va * per_case * g["full_fwd_s"]
        if c["augment"]:
            epoch += n_tr * t["aug_s_per_volume"]
        parts["test"] = n_te * per_case * g["full_fwd_s"]
    copies, n_flips = int(c.get("flip_copies") or 0), len(c.get("test_flips") or ())
    cached = c["lora_last_k"] is not None and not c["augment"]
    if copies and cached:  # the flipped copies' trunk, once, like the originals'
        parts["trunk_copies"] = copies * n_tr * per_case * g["trunk_fwd_s"]
    if n_flips:  # each flip: every validation pass again (its trunk once), and val + test scored again, cold
        if c["lora_last_k"] is not None:
            epoch += n_flips * n_va * per_case * g["tail_fwd_s"]
            parts["flip_trunk_once"] = n_flips * n_va * per_case * g["trunk_fwd_s"]
            parts["test_flips"] = n_flips * (n_va + n_te) * per_case * (g["trunk_fwd_s"] + g["tail_fwd_s"])
        else:
            epoch += n_flips * n_va * per_case * g["full_fwd_s"]
            parts["test_flips"] = n_flips * (n_va + n_te) * per_case * g["full_fwd_s"]
    parts["epoch"] = epoch
    parts["training"] = epoch * c["epochs"]
    parts["overhead"] = OVERHEAD_S
    parts["total"] = sum(v for k, v in parts.items() if k != "epoch")
    cached_slices = (n_all + copies * n_tr * cached + n_flips * n_va) * per_case
    parts["trunk_cache_gb"] = (cached_slices * t.get("trunk_bytes_per_slice", 0) / 2**30
                               if c["lora_last_k"] is not None else 0.0)
    return {k: round(v, 3) for k, v in parts.items()}


def describe(c: dict) -> str:
    lora = "LoRA on the last stage, cached trunk" if c["lora_last_k"] == 1 else (
        f"LoRA on the last {c['lora_last_k']} stages" if c["lora_last_k"] else "full-depth LoRA")
    subset = f"{c['slice_subset']} slices/view" if c["slice_subset"] else "all slices"
    if c.get("max_slices"):
        subset += f" of at most {c['max_slices']}"
    extra = ""
    if c.get("flip_copies"):
        extra += f", {c['flip_copies']} cached flipped copies"
    if c.get("test_flips"):
        extra += f", test-time flips {'/'.join(c['test_flips'])}"
    if (c.get("ensemble") or 1) > 1:
        extra += f", {c['ensemble']}-member ensemble"
    if c.get("ema"):
        extra += f", weight EMA {c['ema']:g}"
    if c.get("swa"):
        extra += f", SWA from {c['swa']:g} of the epochs"
    if c.get("label_smoothing"):
        extra += f", label smoothing {c['label_smoothing']:g}"
    if c.get("mixup"):
        extra += f", embedding mixup {c['mixup']:g}"
    if c.get("view_dropout"):
        extra += f", view dropout {c['view_dropout']:g}"
    return (f"{'+'.join(c['views'])}, {lora}, {'augmented' if c['augment'] else 'no augmentation'}{extra}, "
            f"{subset}, {c['epochs']} epochs")


def make_plan(fp: dict, timings: dict, budget_s: float | None, backbone_size: int,
              overrides: dict | None = None, threshold: str = DEFAULT_POLICY, priors: dict[str, float] | None = None,
              priors_file: str | Path | None = None, max_select: int | None = None) -> Plan:
    """The plan for fingerprint ``fp`` on the machine of ``timings`` within ``budget_s`` seconds.

    ``overrides``: plan fields given explicitly (flags); they replace the field in every candidate
    and are listed in ``Plan.overridden``. ``max_select``: how many candidates training may compare on
    validation (``Plan.select``, :func:`selection`; default :data:`MAX_SELECT`, 1: the first that fits
    alone). Raises :class:`InputError` when not even the cheapest
    candidate fits the budget, with the time that candidate needs."""
    overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
    max_select = MAX_SELECT if max_select is None else int(max_select)
    unknown = sorted(set(overrides) - set(FIELDS))
    if unknown:
        raise ValueError(f"unknown plan fields: {unknown}")
    dtype = timings.get("device_type", "cpu")
    size, size_why = choose_size(fp, backbone_size, dtype)
    views, views_why = choose_views(fp)
    size = int(overrides.get("size", size))
    cands = candidates(views, dtype)
    priors = load_priors(priors_file) if priors is None else priors
    considered, rows = [], []
    for i, c in enumerate(cands):
        c = {**c, "epochs": epochs_for(fp, c["epochs"], int(overrides.get("batch_size", 8)))}
        c = {**c, **{k: v for k, v in overrides.items() if k in c}}
        c = none_for_all(c)
        est = estimate(c, fp, timings, size)
        considered.append((i, c, est))
        rows.append({"name": c["name"], "estimate_s": est["total"], "prior": priors.get(c["name"]),
                     "fits": budget_s is None or est["total"] <= budget_s})
    order = quality_order(cands, priors, dtype)
    fitting = [considered[i] for i in order if rows[i]["fits"]]
    if not fitting:
        i, c, est = min(considered, key=lambda x: x[2]["total"])
        raise InputError(f"budget {fmt_duration(budget_s)} is too short: the cheapest plan ({describe(c)}) needs "
                         f"about {fmt_duration(est['total'])} on this machine ({timings.get('device', 'cpu')}); "
                         f"give --budget {math.ceil(est['total'] / 60)}m or more")
    chosen = fitting[0]
    for rank, j in enumerate(order):  # candidate numbers: the rank in the quality order (1 = best expected)
        rows[j].update(candidate=rank + 1, chosen=j == chosen[0])
    i, c, est = chosen
    rank = order.index(i) + 1
    bs = int(overrides.get("batch_size", 8))
    select = selection([considered[j] for j in order], budget_s,
                       lambda c, est: _settings(c, est, overrides, timings, size, bs), max_select)
    for e in select:
        e["prior"] = priors.get(e["name"])
        e["candidate"] = next(r["candidate"] for r in rows if r["name"] == e["name"])
    for j in order:
        rows[j]["selected"] = any(e["name"] == rows[j]["name"] for e in select)
    rows = [rows[j] for j in order]
    reasons = {"size": size_why if "size" not in overrides else "set by the user", "views": views_why,
               "candidate": f"#{rank} of {len(cands)} ({c['name']}): {describe(c)}" + (
                   "" if rank == 1 else " (the ones expected to be better do not fit the budget)")}
    if len(select) > 1:
        reasons["selection"] = (f"{len(select)} candidates trained and the best on validation kept: "
                                f"{', '.join(e['name'] for e in select)} (the next ones in the quality order while "
                                f"their estimates sum within the budget, at most {max_select})")
    workers = 0 if dtype == "cpu" else min(8, max(0, int(timings.get("cpu_count", 1)) - 1))
    return Plan(**select[0]["settings"], workers=workers, device=timings.get("device", "cpu"), threshold=threshold,
                threads=timings.get("threads_chosen"),
                budget_s=budget_s, estimate_s=est["total"], estimate=est, candidate=rank, name=c["name"],
                prior=priors.get(c["name"]), considered=rows, select=select,
                select_estimate_s=round(sum(e["estimate_s"] for e in select), 3),
                overridden=sorted(overrides), reasons=reasons)


def _settings(c: dict, est: dict, overrides: dict, timings: dict, size: int, bs: int) -> dict:
    """The plan fields (``FIELDS`` and the trunk cache) of candidate ``c`` with estimate ``est``."""
    cache = "none"
    if c["lora_last_k"] is not None:
        avail = timings.get("available_gb") or timings.get("memory_gb") or 0
        cache = "memory" if est["trunk_cache_gb"] <= 0.5 * avail or not avail else "disk"
    return dict(size=size, views=list(c["views"]), lora_last_k=c["lora_last_k"], augment=bool(c["augment"]),
                slice_subset=c["slice_subset"], max_slices=c["max_slices"], epochs=int(c["epochs"]), batch_size=bs,
                patience=int(overrides.get("patience", max(3, c["epochs"] // 3))),
                flip_copies=int(c.get("flip_copies") or 0), test_flips=list(c.get("test_flips") or []),
                ensemble=int(c.get("ensemble") or 1), ema=float(c.get("ema") or 0.0), swa=float(c.get("swa") or 0.0),
                label_smoothing=float(c.get("label_smoothing") or 0.0), mixup=float(c.get("mixup") or 0.0),
                view_dropout=float(c.get("view_dropout") or 0.0),
                neighbours=bool(overrides.get("neighbours", c.get("neighbours", False))), cache=cache)


def member_plan(plan: dict, member: dict) -> dict:
    """The plan (a ``Plan.to_dict()``) as one candidate of its selection trains it: that candidate's
    settings, name, rank, prior and estimate; the rest (budget, candidates considered, race) as planned."""
    return {**plan, **member["settings"], "name": member["name"], "candidate": member.get("candidate", plan["candidate"]),
            "prior": member.get("prior"), "estimate_s": member["estimate_s"],
            "estimate": member.get("estimate", plan["estimate"])}


def selection(ordered: list[tuple], budget_s: float | None, settings, max_select: int = MAX_SELECT) -> list[dict]:
    """The candidates ``anymc3d train`` trains and compares on validation (training.selection): the
    first of ``ordered`` (``(index, candidate, estimate)`` in the quality order) whose estimate fits the
    budget, then the ones after it while the estimates' sum stays within the budget: the first that
    would overflow it ends the list (so a larger budget's list extends a smaller one's with the same
    first candidate, and its best validation AUC is never lower), at most ``max_select``. A candidate
    whose settings equal an earlier one's (flags can make them equal) is left out."""
    out, total = [], 0.0
    for _, c, est in ordered:
        if len(out) >= max(1, max_select):
            break
        if not out and budget_s is not None and est["total"] > budget_s:
            continue  # before the first candidate that fits on its own
        st = settings(c, est)
        if any(e["settings"] == st for e in out):
            continue
        if budget_s is not None and total + est["total"] > budget_s:
            break
        out.append({"name": c["name"], "estimate_s": est["total"], "estimate": est, "settings": st})
        total += est["total"]
    return out


def plan_table(plan: Plan) -> str:
    """The plan as a short table, with the estimated time and the overridden fields marked."""
    mark = {k: " (flag)" for k in plan.overridden}
    lora = "all blocks (full depth)" if plan.lora_last_k is None else f"last {plan.lora_last_k} stage(s)"
    dev = plan.device + (f", {plan.threads} thread(s)" if plan.threads and plan.device == "cpu" else "")
    rows = [("device", dev)] + ([("backbone", plan.backbone + (" (backbone race)" if any(
        r.get("status") == "raced" for r in plan.race) else ""))] if plan.backbone else []) + [("slice size", f"{plan.size}"), ("views", ",".join(plan.views)),
            ("LoRA", lora), ("trunk cache", plan.cache), ("augmentation", "on" if plan.augment else "off"),
            ("training slices", f"{plan.slice_subset} per volume and view" if plan.slice_subset else "all"),
            ("slices per view", f"at most {plan.max_slices} (resampled)" if plan.max_slices else "all"),
            ("flipped copies", f"{plan.flip_copies} per training volume (cached)" if plan.flip_copies else "none"),
            ("test-time flips", "/".join(plan.test_flips) if plan.test_flips else "none"),
            ("ensemble", f"{plan.ensemble} members on one trunk" if plan.ensemble > 1 else "one plugin"),
            ("weight EMA", f"decay {plan.ema:g} per step" if plan.ema else "off"),
            ("weight SWA", f"epoch-end weights from {plan.swa:g} of the epochs on" if plan.swa else "off"),
            ("label smoothing", f"{plan.label_smoothing:g}" if plan.label_smoothing else "off"),
            ("embedding mixup", f"Beta({plan.mixup:g}, {plan.mixup:g})" if plan.mixup else "off"),
            ("view dropout", f"{plan.view_dropout:g} per view" if plan.view_dropout else "off"),
            ("epochs", str(plan.epochs)), ("batch size", str(plan.batch_size)),
            ("early-stopping patience", str(plan.patience)), ("threshold", plan.threshold)]
    keys = {"slice size": "size", "views": "views", "LoRA": "lora_last_k", "augmentation": "augment",
            "training slices": "slice_subset", "slices per view": "max_slices", "epochs": "epochs", "batch size": "batch_size",
            "flipped copies": "flip_copies", "test-time flips": "test_flips", "ensemble": "ensemble",
            "weight EMA": "ema", "weight SWA": "swa", "label smoothing": "label_smoothing", "embedding mixup": "mixup",
            "view dropout": "view_dropout",
            "early-stopping patience": "patience"}
    w = max(len(r[0]) for r in rows)
    lines = ["training plan" + (f" (candidate {plan.candidate})" if plan.candidate else "")]
    lines += [f"  {k:{w}s}  {v}{mark.get(keys.get(k, ''), '')}" for k, v in rows]
    e = plan.estimate
    lines.append(f"  {'estimated time':{w}s}  {fmt_duration(plan.estimate_s)}"
                 + (f" of a {fmt_duration(plan.budget_s)} budget" if plan.budget_s else "")
                 + (f" (preprocess {fmt_duration(e.get('preprocess', 0))}, frozen trunk {fmt_duration(e.get('trunk_once', 0))}, "
                    f"{fmt_duration(e.get('epoch', 0))} per epoch)" if e else ""))
    if len(plan.select) > 1:
        lines.append(f"  {'selection':{w}s}  trains {', '.join(e['name'] for e in plan.select)} and keeps the best on "
                     f"validation (about {fmt_duration(plan.select_estimate_s)} in all)")
    if plan.overridden:
        lines.append(f"  overridden by flags: {', '.join(plan.overridden)}")
    if plan.considered:
        lines.append(candidate_table(plan))
    if plan.race:
        from .race import race_table

        lines.append(race_table(plan.race, plan.backbone))
    return "\n".join(lines)


def candidate_table(plan: Plan) -> str:
    """Every candidate the plan considered, best expected first: its prior (expected validation AUC,
    priors.json), its estimated time here, and whether it fits the budget; the chosen one marked."""
    w = max(len(r["name"]) for r in plan.considered)
    lines = [f"  candidates, best expected first (prior = validation AUC measured in planning/priors.json; "
             f"-> the plan, + also trained and compared on validation):",
             f"    {'':2s}{'name':{w}s}  {'prior':>6s}  {'estimate':>9s}  fits"]
    for r in plan.considered:
        prior = f"{r['prior']:.3f}" if r.get("prior") is not None else "–"
        mark = "->" if r.get("chosen") else "+" if r.get("selected") else ""
        lines.append(f"    {mark:2s}{r['name']:{w}s}  {prior:>6s}  {fmt_duration(r['estimate_s']):>9s}  "
                     f"{'yes' if r['fits'] else 'no'}")
    return "\n".join(lines)
