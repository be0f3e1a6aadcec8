"""The backbone race: when more than one backbone has its weights on this machine and the user did
not fix one (``--backbone``, ``--weights``), the plan times each, and a cheap frozen probe of each
on a subset of the training split, scored on the validation split, picks the backbone.

Rules (docs/plan.md, "Backbone race"):

* **who races**: every registered backbone whose weights are here (``anymc3d backbones``). A racer
  must afford a recipe at least as good as the default backbone's: its plan, made within the budget
  less the race's reserve, is the same candidate or one expected to be better. A backbone whose
  plan would fall back to a cheaper recipe is listed and left out: the race picks a feature, never
  at the cost of a worse recipe.
* **the probe**: :data:`RACE_TRAIN_CASES` training cases (stratified) and up to
  :data:`RACE_VAL_CASES` validation cases, the plan's views and slice size, each view resampled to
  :data:`RACE_SLICES` slices; slice embeddings mean-pooled per view, a logistic probe (C chosen on
  validation AUROC, :func:`anymc3d.baselines.linear_probe.fit_logistic_probe`). Its score is the
  validation AUROC. The test split is never read.
* **a quick look first**: before a challenger is timed in full (minutes for a slow backbone on a
  CPU), its frozen trunk runs once on a few slices (:func:`quick_trunk_s`); a lower bound of its
  costs (that pass :data:`ENGINE_SPEEDUP` times faster, every other cost the default backbone's or
  nothing) is planned first. If even that plan is a worse candidate than the default backbone's,
  the full plan would be too (estimates only grow with the costs), so it is not timed further.
* **its cost**: at most :data:`RACE_SHARE` of the budget, and at most that share of the default
  backbone's own training run (:func:`race_reserve`: on a small data set that trains in a minute the
  race gets seconds, not minutes), estimated from each racer's measured timings; the plans are made
  within the rest. The default backbone races first; the others by cost while the reserve lasts. A
  challenger is timed in full only when the quick look's estimate of that timing plus its probe
  (:func:`timing_cost`, :func:`race_cost` on the lower-bound table) fits the reserve beside the
  default's probe.
* **the pick**: the highest validation AUROC; a challenger must beat the default backbone by
  :data:`RACE_MARGIN` (on small validation splits AUROC is coarse, and the default is the cheaper,
  better-known one).
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

from ..errors import InputError

#: training cases of each racer's probe (a stratified subset; all when fewer)
RACE_TRAIN_CASES = 96
#: validation cases it is scored on (a stratified subset; all when fewer)
RACE_VAL_CASES = 64
#: slices per view (each view resampled to this many, as ``--max-slices`` does)
RACE_SLICES = 8
#: the share of the budget reserved for the race
RACE_SHARE = 0.2
#: a challenger must beat the default backbone's validation AUROC by this much
RACE_MARGIN = 0.01

#: the quick look's margin: the inference engines ran the frozen pass up to ~3x faster than torch here
#: (EfficientNet-Lite0 at 64^2: openvino 1208 against torch 412 slices/s; TinyViT 29 against 19)
ENGINE_SPEEDUP = 4.0
#: slices of the quick look's pass
QUICK_SLICES = 16

#: (backbone, size, views) -> validation AUROC of its probe
Score = Callable[[str, int, list], float]


@dataclass
class Racer:
    backbone: str
    plan: object | None          # its Plan within the budget less the reserve (None: no plan fits)
    cost_s: float                # the probe's estimated seconds
    status: str = ""             # raced | not raced: why
    val_auc: float | None = None
    seconds: float | None = None  # the probe's measured seconds

    def row(self) -> dict:
        p = self.plan
        return {"backbone": self.backbone, "status": self.status, "val_auc": self.val_auc,
                "seconds": None if self.seconds is None else round(self.seconds, 1), "cost_s": round(self.cost_s, 1),
                "candidate": None if p is None else p.name, "estimate_s": None if p is None else p.estimate_s}


def backbones_here() -> list[str]:
    """Registered backbones whose weights are on this machine (``anymc3d backbones``: yes)."""
    from ..backbones import list_backbones, weights_status

    return [n for n in list_backbones() if weights_status(n)[0] is True]


def quick_trunk_s(name: str, size: int, weights: str | None = None) -> float:
    """Seconds per slice of ``name``'s frozen trunk (LoRA on the last stage) in torch at ``size``:
    the best of two passes over :data:`QUICK_SLICES` slices, after one warm-up."""
    import torch

    from ..backbones import create_backbone
    from .machine import timed

    bb = create_backbone(name, weights=weights, input_size=size).eval()
    x = torch.rand(QUICK_SLICES, 1, size, size)
    with torch.no_grad():
        return timed(lambda: bb.forward_trunk(x, 1), torch.device("cpu"), 2) / QUICK_SLICES


def lower_bound_timings(default_timings: dict, trunk_s: float, size: int) -> dict:
    """A timing table no cheaper than any real one of a backbone whose torch trunk takes ``trunk_s``
    per slice: its trunk :data:`ENGINE_SPEEDUP` times faster, full-depth passes as cheap as that
    trunk, its tail free; reading and augmentation (the same for every backbone) as measured."""
    lb = trunk_s / ENGINE_SPEEDUP
    return {**default_timings, "size": int(size), "trunk_fwd_s": lb, "full_step_s": lb, "full_fwd_s": lb,
            "tail_step_s": 0.0, "tail_fwd_s": 0.0}


def race_reserve(reserve_s: float | None, ref_plan) -> float | None:
    """The race's share of the run: :data:`RACE_SHARE` of the budget, and no more than that share of
    the default backbone's own training run (its selected candidates' estimate), so a run that trains
    in a minute does not race for six."""
    run_s = float(getattr(ref_plan, "select_estimate_s", 0.0) or getattr(ref_plan, "estimate_s", 0.0) or 0.0)
    if run_s <= 0:
        return reserve_s
    share = RACE_SHARE * run_s
    return share if reserve_s is None else min(reserve_s, share)


def timing_cost(default_timings: dict, default_quick_s: float, quick_s: float) -> float:
    """Estimated seconds of timing a challenger in full: the default backbone's measured timing
    (``measure_s``) scaled by the ratio of the two quick looks' frozen passes (0 when unknown)."""
    measured = float(default_timings.get("measure_s", 0.0) or 0.0)
    if measured <= 0 or not default_quick_s > 0:
        return 0.0
    return measured * max(1.0, quick_s / default_quick_s)


def race_cost(n_train: int, n_val: int, timings: dict, views: list[str], size: int) -> float:
    """Estimated seconds of one racer's probe from its timing table (``n_train`` / ``n_val``: the
    split sizes): reading the cases and the frozen backbone on RACE_SLICES slices per view."""
    n = min(n_train, RACE_TRAIN_CASES) + min(n_val, RACE_VAL_CASES)
    scale = 1.0 if timings.get("size", size) == size else (size / timings["size"]) ** 2
    per_slice = (timings["trunk_fwd_s"] + timings["tail_fwd_s"]) * scale
    return n * (timings["prep_s_per_volume"] + len(views) * RACE_SLICES * per_slice)


def _stratified(cases: list, n: int, task_type: str, seed: int) -> list:
    from ..training.run import subsample

    if len(cases) <= n:
        return cases
    try:
        return subsample(cases, n / len(cases), task_type, seed)
    except ValueError:  # a class too small to stratify: a plain seeded sample
        import random

        return random.Random(seed).sample(cases, n)


def probe_score(task, seed: int = 0, device: str = "auto") -> Score:
    """The race's score: a frozen logistic probe on a training subset, its validation AUROC."""
    def score(backbone: str, size: int, views: list) -> float:
        from ..backbones import create_backbone
        from ..baselines.linear_probe import fit_logistic_probe, mean_pooled_features
        from ..preprocess import PreprocessOptions
        from ..training.run import assign_splits

        splits = assign_splits(task, seed)
        if not splits["train"] or not splits["val"]:
            raise InputError("the backbone race needs a training and a validation split")
        cases = {"train": _stratified(splits["train"], RACE_TRAIN_CASES, task.task_type, seed),
                 "val": _stratified(splits["val"], RACE_VAL_CASES, task.task_type, seed)}
        bb = create_backbone(backbone, input_size=size)
        pre = PreprocessOptions(views=list(views), size=size, max_slices=RACE_SLICES)
        specs = {inp: pre.spec_for(task, bb.input_size) for inp in task.inputs}
        feats = {k: mean_pooled_features(bb, v, specs, views, progress=False, device=device) for k, v in cases.items()}
        y = {k: task.labels(v) for k, v in cases.items()}
        _, _, auc = fit_logistic_probe(feats, y, task.task_type, task.label_names)
        return float(auc)
    return score


def run_race(racers: list[Racer], default: str, reserve_s: float | None, score: Score, log=print) -> str:
    """Race the eligible ``racers`` (the default first, then by cost while ``reserve_s`` lasts) and
    return the winner's name (``default`` when fewer than two race); every racer's ``status`` says what
    happened to it. The default backbone's plan must exist (else there is nothing to race against)."""
    ref = next(r for r in racers if r.backbone == default)
    ref_rank = ref.plan.candidate
    for r in racers:
        if r.status:  # already ruled out (the quick look)
            continue
        if r.plan is None:
            r.status = "not raced: no plan fits the budget"
        elif r.plan.candidate > ref_rank:
            r.status = (f"not raced: within the budget less the race's share it affords only {r.plan.name} "
                        f"(the default backbone's there: {ref.plan.name})")
    eligible = sorted((r for r in racers if not r.status), key=lambda r: (r.backbone != default, r.cost_s, r.backbone))
    left = reserve_s
    entered = []
    for r in eligible:
        if left is not None and r.cost_s > left:
            r.status = f"not raced: its probe (about {r.cost_s:.0f} s) does not fit the race's share of the budget"
            continue
        entered.append(r)
        left = None if left is None else left - r.cost_s
    if len(entered) < 2:
        for r in entered:
            r.status = "not raced: no other backbone to race"
        return default
    for r in entered:
        t0 = time.perf_counter()
        r.val_auc = float(score(r.backbone, r.plan.size, list(r.plan.views)))  # the views and size it would train at
        r.seconds = time.perf_counter() - t0
        r.status = "raced"
        log(f"backbone race: {r.backbone} frozen probe validation AUC {r.val_auc:.4f} ({r.seconds:.0f} s)")
    base = next((r for r in entered if r.backbone == default), entered[0])
    best = max(entered, key=lambda r: (r.val_auc, r is base))
    return best.backbone if best is base or best.val_auc >= base.val_auc + RACE_MARGIN else base.backbone


def race_table(rows: list[dict], chosen: str) -> str:
    """The race as printed under the plan: each backbone's probe score, cost and plan."""
    w = max(len(r["backbone"]) for r in rows)
    lines = [f"  backbone race (frozen probe on <= {RACE_TRAIN_CASES} training cases, scored on <= {RACE_VAL_CASES} "
             f"validation cases; a challenger needs +{RACE_MARGIN:g} AUC):",
             f"    {'':2s}{'backbone':{w}s}  {'val AUC':>7s}  {'probe':>6s}  plan"]
    for r in rows:
        auc = f"{r['val_auc']:.4f}" if r.get("val_auc") is not None else "–"
        sec = f"{r['seconds']:.0f} s" if r.get("seconds") is not None else "–"
        plan = r.get("candidate") or "none fits"
        note = "" if r["status"] == "raced" else f"  ({r['status']})"
        lines.append(f"    {'->' if r['backbone'] == chosen else '':2s}{r['backbone']:{w}s}  {auc:>7s}  {sec:>6s}  "
                     f"{plan}{note}")
    return "\n".join(lines)
