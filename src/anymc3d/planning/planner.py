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
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

from ..errors import InputError
from .fingerprint import in_plane_size, slices_per_view

PLAN_VERSION = 1
#: the plan fields a user flag can override (``anymc3d train --epochs ...``)
FIELDS = ("size", "views", "lora_last_k", "augment", "slice_subset", "max_slices", "epochs", "batch_size", "patience")
MIN_SIZE = 64
MIN_AXIS_FOR_VIEWS = 16
MAX_ANISOTROPY_FOR_VIEWS = 3.0
#: at least this many optimiser steps: small training sets get more epochs (measured on the synthetic
#: suite's validation split: 15 epochs = 180 steps left `elongated` at val AUC 0.86, a 60-epoch
#: schedule (720 steps) reached 1.0; docs/results.md issue 15)
MIN_STEPS = 720
MAX_EPOCHS = 100
OVERHEAD_S = 15.0  # building the model, writing the plugin, metrics and report


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
    cache: str = "memory"            # trunk activations: memory | disk | none
    workers: int = 0
    device: str = "cpu"
    threads: int | None = None       # CPU threads to train with (measured: all, or 1 when the cores are busy)
    threshold: str = "platt"
    budget_s: float | None = None
    estimate_s: float = 0.0
    estimate: dict = field(default_factory=dict)
    candidate: int = 0
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
    """Plan candidates, best first (see the module docstring)."""
    few = ["axial"]
    base = dict(lora_last_k=1, augment=False, max_slices=None)
    cpu = [
        dict(base, views=views, slice_subset=None, epochs=15),
        dict(base, views=views, slice_subset=16, epochs=15),
        dict(base, views=views, slice_subset=8, epochs=10),
        dict(base, views=views, slice_subset=8, epochs=10, max_slices=32),   # deep volumes: resample the depth
        dict(base, views=few, slice_subset=None, epochs=15),
        dict(base, views=few, slice_subset=16, epochs=10),
        dict(base, views=few, slice_subset=8, epochs=5, max_slices=32),
        dict(base, views=few, slice_subset=8, epochs=5, max_slices=16),
    ]
    if device_type == "cuda":
        return [dict(views=views, lora_last_k=None, augment=True, slice_subset=None, epochs=30, max_slices=None),
                dict(views=views, lora_last_k=None, augment=True, slice_subset=16, epochs=30, max_slices=None)] + cpu
    return cpu


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
        parts["test"] = n_te * per_case * g["tail_fwd_s"] + min(COLD_TIMING_VOLUMES, n_te) * per_case * cold_fwd
    else:
        epoch = n_tr * per_case_train * g["full_step_s"] + n_va * per_case * g["full_fwd_s"]
        if c["augment"]:
            epoch += n_tr * t["aug_s_per_volume"]
        parts["test"] = n_te * per_case * g["full_fwd_s"]
    parts["epoch"] = epoch
    parts["training"] = epoch * c["epochs"]
    parts["overhead"] = OVERHEAD_S
    parts["total"] = sum(v for k, v in parts.items() if k != "epoch")
    parts["trunk_cache_gb"] = (n_all * per_case * t.get("trunk_bytes_per_slice", 0) / 2**30
                               if c["lora_last_k"] is not None else 0.0)
    return {k: round(v, 3) for k, v in parts.items()}


def describe(c: dict) -> str:
    lora = "LoRA on the last stage, cached trunk" if c["lora_last_k"] == 1 else (
        f"LoRA on the last {c['lora_last_k']} stages" if c["lora_last_k"] else "full-depth LoRA")
    subset = f"{c['slice_subset']} slices/view" if c["slice_subset"] else "all slices"
    if c.get("max_slices"):
        subset += f" of at most {c['max_slices']}"
    return (f"{'+'.join(c['views'])}, {lora}, {'augmented' if c['augment'] else 'no augmentation'}, "
            f"{subset}, {c['epochs']} epochs")


def make_plan(fp: dict, timings: dict, budget_s: float | None, backbone_size: int,
              overrides: dict | None = None, threshold: str = "platt") -> Plan:
    """The plan for fingerprint ``fp`` on the machine of ``timings`` within ``budget_s`` seconds.

    ``overrides``: plan fields given explicitly (flags); they replace the field in every candidate
    and are listed in ``Plan.overridden``. Raises :class:`InputError` when not even the cheapest
    candidate fits the budget, with the time that candidate needs."""
    overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
    unknown = sorted(set(overrides) - set(FIELDS))
    if unknown:
        raise ValueError(f"unknown plan fields: {unknown}")
    dtype = timings.get("device_type", "cpu")
    size, size_why = choose_size(fp, backbone_size, dtype)
    views, views_why = choose_views(fp)
    size = int(overrides.get("size", size))
    best = None
    cands = candidates(views, dtype)
    for i, c in enumerate(cands):
        c = {**c, "epochs": epochs_for(fp, c["epochs"], int(overrides.get("batch_size", 8)))}
        c = {**c, **{k: v for k, v in overrides.items() if k in c}}
        c["lora_last_k"] = c["lora_last_k"] or None   # 0 = "all" (full depth) from the flag
        c["slice_subset"] = c["slice_subset"] or None
        c["max_slices"] = c.get("max_slices") or None
        est = estimate(c, fp, timings, size)
        if best is None or est["total"] < best[2]["total"]:
            best = (i, c, est)
        if budget_s is None or est["total"] <= budget_s:
            chosen = (i, c, est)
            break
    else:
        i, c, est = best
        raise InputError(f"budget {fmt_duration(budget_s)} is too short: the cheapest plan ({describe(c)}) needs "
                         f"about {fmt_duration(est['total'])} on this machine ({timings.get('device', 'cpu')}); "
                         f"give --budget {math.ceil(est['total'] / 60)}m or more")
    i, c, est = chosen
    bs = int(overrides.get("batch_size", 8))
    patience = int(overrides.get("patience", max(3, c["epochs"] // 3)))
    cache = "none"
    if c["lora_last_k"] is not None:
        avail = timings.get("available_gb") or timings.get("memory_gb") or 0
        cache = "memory" if est["trunk_cache_gb"] <= 0.5 * avail or not avail else "disk"
    reasons = {"size": size_why if "size" not in overrides else "set by the user", "views": views_why,
               "candidate": f"#{i + 1} of {len(cands)}: {describe(c)}" + (
                   "" if i == 0 else " (the better ones do not fit the budget)")}
    workers = 0 if dtype == "cpu" else min(8, max(0, int(timings.get("cpu_count", 1)) - 1))
    return Plan(size=size, views=list(c["views"]), lora_last_k=c["lora_last_k"], augment=bool(c["augment"]),
                slice_subset=c["slice_subset"], max_slices=c["max_slices"], epochs=int(c["epochs"]), batch_size=bs, patience=patience,
                cache=cache, workers=workers, device=timings.get("device", "cpu"), threshold=threshold,
                threads=timings.get("threads_chosen"),
                budget_s=budget_s, estimate_s=est["total"], estimate=est, candidate=i + 1,
                overridden=sorted(overrides), reasons=reasons)


def plan_table(plan: Plan) -> str:
    """The plan as a short table, with the estimated time and the overridden fields marked."""
    mark = {k: " (flag)" for k in plan.overridden}
    lora = "all blocks (full depth)" if plan.lora_last_k is None else f"last {plan.lora_last_k} stage(s)"
    dev = plan.device + (f", {plan.threads} thread(s)" if plan.threads and plan.device == "cpu" else "")
    rows = [("device", dev), ("slice size", f"{plan.size}"), ("views", ",".join(plan.views)),
            ("LoRA", lora), ("trunk cache", plan.cache), ("augmentation", "on" if plan.augment else "off"),
            ("training slices", f"{plan.slice_subset} per volume and view" if plan.slice_subset else "all"),
            ("slices per view", f"at most {plan.max_slices} (resampled)" if plan.max_slices else "all"),
            ("epochs", str(plan.epochs)), ("batch size", str(plan.batch_size)),
            ("early-stopping patience", str(plan.patience)), ("threshold", plan.threshold)]
    keys = {"slice size": "size", "views": "views", "LoRA": "lora_last_k", "augmentation": "augment",
            "training slices": "slice_subset", "slices per view": "max_slices", "epochs": "epochs", "batch size": "batch_size",
            "early-stopping patience": "patience"}
    w = max(len(r[0]) for r in rows)
    lines = ["training plan" + (f" (candidate {plan.candidate})" if plan.candidate else "")]
    lines += [f"  {k:{w}s}  {v}{mark.get(keys.get(k, ''), '')}" for k, v in rows]
    e = plan.estimate
    lines.append(f"  {'estimated time':{w}s}  {fmt_duration(plan.estimate_s)}"
                 + (f" of a {fmt_duration(plan.budget_s)} budget" if plan.budget_s else "")
                 + (f" (preprocess {fmt_duration(e.get('preprocess', 0))}, frozen trunk {fmt_duration(e.get('trunk_once', 0))}, "
                    f"{fmt_duration(e.get('epoch', 0))} per epoch)" if e else ""))
    if plan.overridden:
        lines.append(f"  overridden by flags: {', '.join(plan.overridden)}")
    return "\n".join(lines)
