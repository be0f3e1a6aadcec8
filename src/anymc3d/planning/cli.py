"""``anymc3d plan DATA --out DIR`` and the planning flags of ``anymc3d train``."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..cli_args import DEFAULT_BACKBONE
from ..errors import InputError
from ..evaluation.threshold import DEFAULT_POLICY
from . import DEFAULT_BUDGET
from .planner import FIELDS, Plan, member_plan, none_for_all, plan_table

#: ``anymc3d train --no-plan``: the fixed settings of earlier releases (full-depth LoRA, the backbone's
#: slice size, axial, every slice); the training fields (30 epochs, augmentation, ...) are
#: :class:`anymc3d.training.trainer.TrainConfig`'s own defaults (:func:`fixed_settings`)
FIXED_DEFAULTS = {"size": None, "views": ["axial"], "lora_last_k": None, "max_slices": None, "neighbours": False}


def fixed_settings() -> dict:
    """The ``--no-plan`` settings: :data:`FIXED_DEFAULTS` and every plan field (``FIELDS``) that
    ``TrainConfig`` holds, at its default there."""
    from ..training.trainer import TrainConfig

    cfg = TrainConfig()
    return {**FIXED_DEFAULTS, **{k: getattr(cfg, k) for k in FIELDS if k not in FIXED_DEFAULTS and hasattr(cfg, k)}}


def _count_or_all(flag: str, unit: str):
    """argparse type of ``FLAG N|all``: a positive count, or 0 for "all"."""
    def parse(text: str) -> int:
        if text == "all":
            return 0
        v = int(text)
        if v < 1:
            raise argparse.ArgumentTypeError(f"{flag}: a positive number of {unit}, or 'all'")
        return v
    return parse


_last_k = _count_or_all("--lora-last-k", "stages")
_subset = _count_or_all("--slice-subset", "slices")


def _flips(text: str) -> list[str]:
    """``--test-flips w,h,hw`` (or ``none``) -> the plugin spec's ``test_flips`` list."""
    from ..plugins.spec import TEST_FLIPS

    items = [] if text.strip().lower() in ("", "none") else [t.strip() for t in text.split(",")]
    bad = [t for t in items if t not in TEST_FLIPS]
    if bad or len(set(items)) != len(items):
        raise argparse.ArgumentTypeError(f"--test-flips: distinct items of {','.join(TEST_FLIPS)}, or none; got {text!r}")
    return items


def _number_in(flag: str, ok, what: str):
    """argparse type of ``FLAG X``: a number for which ``ok(x)`` holds, else ``FLAG: what; got X``."""
    def parse(text: str) -> float:
        v = float(text)
        if not ok(v):
            raise argparse.ArgumentTypeError(f"{flag}: {what}; got {text!r}")
        return v
    return parse


_ema = _number_in("--ema", lambda v: v == 0.0 or 0.0 < v < 1.0, "a decay in (0, 1) such as 0.99, or 0 (off)")
_swa = _number_in("--swa", lambda v: 0.0 <= v < 1.0, "a fraction of the epochs in [0, 1) such as 0.2, or 0 (off)")
_smoothing = _number_in("--label-smoothing", lambda v: 0.0 <= v < 0.5, "in [0, 0.5)")
_mixup = _number_in("--mixup", lambda v: 0.0 <= v <= 10.0, "a Beta parameter in (0, 10] such as 0.4, or 0 (off)")
_view_dropout = _number_in("--view-dropout", lambda v: 0.0 <= v < 1.0, "a probability in [0, 1)")
#: ``anymc3d train --weight-decay`` (an optimiser setting, not a plan field)
weight_decay_arg = _number_in("--weight-decay", lambda v: 0.0 <= v < 1.0, "AdamW's decay in [0, 1) such as 0.05")


def _threshold(text: str):
    from ..evaluation.threshold import parse_policy

    try:
        return parse_policy(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def add_plan_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("training plan (docs/plan.md)")
    g.add_argument("--budget", default=DEFAULT_BUDGET,
                   help=f"wall-time budget of the whole run, e.g. 30m, 2h (default {DEFAULT_BUDGET}); the plan fits it")
    if any("--out" in a.option_strings for a in p._actions):
        g.add_argument("--no-plan", action="store_true",
                       help="skip planning: full-depth LoRA, augmentation, the backbone's slice size, axial, 30 epochs")
    g.add_argument("--timings", type=Path, metavar="FILE",
                   help="plan from this timings.json (of an earlier `anymc3d plan` on this machine) instead of timing now")
    g.add_argument("--no-select", action="store_true",
                   help="train the plan's first candidate only, instead of the candidates that fit the budget "
                        "compared on validation")
    g.add_argument("--threshold", type=_threshold, default=DEFAULT_POLICY,
                   help="binary decision threshold on validation: platt (default), youden, or a number")


def add_plan_override_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("plan overrides (each replaces its plan field)")
    g.add_argument("--epochs", type=int)
    g.add_argument("--batch-size", type=int)
    g.add_argument("--patience", type=int, help="early-stopping patience in epochs")
    g.add_argument("--lora-last-k", type=_last_k, metavar="K|all",
                   help="LoRA only on the last K blocks/stages (shared trunk, cacheable), or all of them")
    g.add_argument("--augment", action=argparse.BooleanOptionalAction, default=None,
                   help="3D augmentation of training volumes (--no-augment: off)")
    g.add_argument("--slice-subset", type=_subset, metavar="N|all",
                   help="train on N random slices per volume and view (validation and prediction use all)")
    g.add_argument("--max-slices", type=int, metavar="N",
                   help="resample a view with more slices to N slices (training and prediction)")
    g.add_argument("--flip-copies", type=int, metavar="N", choices=range(0, 8),
                   help="N flipped copies of every training volume, their frozen trunk cached like the originals' (0-7)")
    g.add_argument("--ensemble", type=int, metavar="K", choices=range(1, 17),
                   help="K plugin members trained together on the one cached trunk; predictions average them (1-16)")
    g.add_argument("--test-flips", type=_flips, metavar="w,h,hw|none",
                   help="in-plane slice flips averaged at prediction, stored in the plugin (none: off)")
    g.add_argument("--ema", type=_ema, metavar="DECAY",
                   help="validate and save an exponential moving average of the plugin's weights, DECAY per "
                        "optimiser step (e.g. 0.99; 0: off)")
    g.add_argument("--swa", type=_swa, metavar="FRACTION",
                   help="validate and save the mean of the plugin's weights at the end of every epoch from epoch "
                        "ceil(FRACTION x epochs) on: stochastic weight averaging (e.g. 0.2; 0: off; not with --ema)")
    g.add_argument("--label-smoothing", type=_smoothing, metavar="EPS",
                   help="label smoothing of the classification loss (0: off)")
    g.add_argument("--mixup", type=_mixup, metavar="ALPHA",
                   help="mixup of slice embeddings between a batch's cases, lam ~ Beta(ALPHA, ALPHA) (e.g. 0.4; 0: off)")
    g.add_argument("--view-dropout", type=_view_dropout, metavar="P",
                   help="hide each view of a training case from the view fusion with probability P (0: off)")
    g.add_argument("--neighbours", action=argparse.BooleanOptionalAction, default=None,
                   help="2.5D slices: each slice with its two neighbours as the backbone's three channels, "
                        "instead of one grey slice repeated (one-channel volumes; stored in the plugin)")


TIMING_KEYS = ("device", "prep_s_per_volume", "aug_s_per_volume", "trunk_fwd_s", "tail_step_s", "tail_fwd_s",
               "full_step_s", "full_fwd_s")


def read_timings(path: Path | None) -> dict | None:
    """A timings.json given with --timings (checked: JSON object with every measured key)."""
    if path is None:
        return None
    try:
        t = json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise InputError(f"{path}: cannot read ({exc.strerror or exc})") from None
    except ValueError as exc:
        raise InputError(f"{path}: not valid JSON ({exc})") from None
    missing = [k for k in TIMING_KEYS if not isinstance(t, dict) or k not in t]
    if missing:
        raise InputError(f"{path}: not a timings.json of `anymc3d plan` (missing {', '.join(missing)})")
    bad = [k for k in TIMING_KEYS[1:] if not isinstance(t[k], (int, float)) or not t[k] >= 0]
    if bad:
        raise InputError(f"{path}: {', '.join(bad)} must be non-negative numbers of seconds")
    return t


def overrides_from(a: argparse.Namespace) -> dict:
    """The plan fields the user set with a flag (``--lora-last-k all`` / ``--slice-subset all``: 0)."""
    return {k: getattr(a, k, None) for k in FIELDS if getattr(a, k, None) is not None}


def _apply(plan_or_fixed: dict, overrides: dict) -> dict:
    return none_for_all({**plan_or_fixed, **overrides})


def plan_on_rank0(make) -> Plan:
    """The plan every rank trains with: ``make()`` (plan now, timing this machine, or read a saved
    plan) runs on rank 0 only and, under torchrun, its plan is sent to the others; then the plan's
    CPU thread count is applied. ``train`` and the bench's ``plan`` cell both get their plan here."""
    from ..runtime import distributed as dist

    plan = make() if dist.is_main() else None
    if dist.is_initialized() and dist.world_size() > 1:
        plan = Plan.from_dict(dist.broadcast_object(plan.to_dict() if plan is not None else None))
    if plan.threads and plan.device == "cpu":
        import torch

        torch.set_num_threads(int(plan.threads))  # what the plan measured fastest on this machine now
    return plan


def settings_for_training(a: argparse.Namespace, task, log: bool = True) -> dict:
    """The settings ``anymc3d train`` runs with: the plan (made now, or OUT/plan.json on --resume)
    with the user's flags applied; under ``--no-plan`` the fixed defaults with the flags applied.
    Under torchrun rank 0 plans (and writes the plan files) and every rank trains with its plan."""
    overrides = overrides_from(a)
    if getattr(a, "no_plan", False):
        st = _apply(fixed_settings(), overrides)
        st["workers"] = a.workers
        st["backbone"] = getattr(a, "backbone", None) or DEFAULT_BACKBONE
        return st
    quiet = a.quiet or not log

    def make() -> Plan:
        saved = Path(a.out) / "plan.json"
        if a.resume and saved.is_file():
            plan = Plan.from_dict(json.loads(saved.read_text()))
            if not quiet:
                print(plan_table(plan) + "\n  (from " + str(saved) + ")")
            return plan
        from . import plan_for

        plan, _, _ = plan_for(task, a.backbone, a.budget, device=a.device, weights=a.weights,
                              overrides=overrides, out=a.out,
                              threshold=a.threshold if isinstance(a.threshold, str) else "fixed",
                              timings=read_timings(a.timings), log=(lambda *_: None) if quiet else print,
                              max_select=1 if getattr(a, "no_select", False) else None)
        if not quiet:
            print(plan_table(plan))
        return plan

    plan = plan_on_rank0(make)
    st = _apply({k: getattr(plan, k) for k in FIELDS}, {})
    st["workers"] = a.workers or plan.workers
    st["backbone"] = getattr(a, "backbone", None) or plan.backbone or DEFAULT_BACKBONE  # the race's winner when none was given
    st["plan"] = plan.to_dict()
    if plan.cache == "disk" and not getattr(a, "cache", None):
        st["cache_dir"] = str(Path(a.out) / "trunk_cache")
    return st


def member_settings(st: dict, member: dict, folder: Path, user_cache: Path | None = None) -> dict:
    """The settings of ``st`` (:func:`settings_for_training`'s) for one candidate of the plan's
    selection (a ``Plan.select`` entry), training into ``folder``; with ``--cache DIR`` its trunk
    cache is ``DIR/<candidate>``."""
    fields = member["settings"]
    out = {**st, **_apply({k: fields[k] for k in FIELDS}, {}), "plan": member_plan(st["plan"], member)}
    out.pop("cache_dir", None)
    if user_cache:
        out["cache_dir"] = str(Path(user_cache) / member["name"])
    elif fields.get("cache") == "disk":
        out["cache_dir"] = str(Path(folder) / "trunk_cache")
    return out


def register(sub) -> dict:
    from ..cli_args import add_backbone_args, add_data_args, add_slice_args

    p = sub.add_parser("plan", help="fingerprint the data, time this machine, and write the training plan",
                       description="Write fingerprint.json, timings.json and plan.json into --out and print the "
                       "plan; `anymc3d train` makes the same plan by default.")
    p.add_argument("data")
    add_backbone_args(p, race=True)
    add_slice_args(p, None)
    p.add_argument("--out", required=True, type=Path)
    add_plan_args(p)
    add_plan_override_args(p)
    add_data_args(p)
    return {"plan": cmd_plan}


def cmd_plan(a: argparse.Namespace) -> int:
    from ..cli_args import data_kwargs
    from ..data import load_data
    from . import plan_for

    task = load_data(a.data, **data_kwargs(a))
    plan, fp, t = plan_for(task, a.backbone, a.budget, device=a.device, weights=a.weights,
                           overrides=overrides_from(a), out=a.out, timings=read_timings(a.timings),
                           threshold=a.threshold if isinstance(a.threshold, str) else "fixed",
                           max_select=1 if a.no_select else None)
    print(plan_table(plan))
    print(f"measured on {t['device']} ({t['threads']} threads) in {t.get('measure_s', 0):.0f} s; "
          f"wrote {a.out / 'fingerprint.json'}, {a.out / 'timings.json'}, {a.out / 'plan.json'}")
    return 0


__all__ = ["FIXED_DEFAULTS", "InputError", "add_plan_args", "fixed_settings", "add_plan_override_args", "cmd_plan",
           "member_settings", "overrides_from", "register", "settings_for_training"]
