"""Training plans: dataset fingerprint + measured machine timings -> settings that fit a time budget.

``anymc3d plan DATA --out DIR`` writes ``fingerprint.json``, ``timings.json`` and ``plan.json``;
``anymc3d train DATA`` makes the same plan before it trains (``--no-plan`` for the fixed defaults).
"""
from __future__ import annotations

from pathlib import Path

from ..evaluation.threshold import DEFAULT_POLICY
from .fingerprint import fingerprint, write_fingerprint
from .planner import FIELDS, Plan, fmt_duration, make_plan, parse_budget, plan_table

__all__ = ["FIELDS", "Plan", "fingerprint", "fmt_duration", "make_plan", "parse_budget", "plan_for", "plan_table",
           "write_fingerprint"]

#: `anymc3d train` / `anymc3d plan` without --budget
DEFAULT_BUDGET = "30m"


def plan_for(task, backbone: str | None, budget: str | float | None = DEFAULT_BUDGET, device: str = "auto",
             weights: str | None = None, overrides: dict | None = None, out: str | Path | None = None,
             threshold: str = DEFAULT_POLICY, timings: dict | None = None, log=print, racers: list[str] | None = None,
             measure=None, score=None, quick=None, max_select: int | None = None) -> tuple[Plan, dict, dict]:
    """Fingerprint ``task``, time the candidates on ``device`` (unless ``timings`` is given) and plan.
    Writes fingerprint.json, timings.json and plan.json into ``out`` when given.

    ``backbone=None`` (no ``--backbone``): the backbone race (:mod:`anymc3d.planning.race`) among
    ``racers`` (default: the backbones with weights here) picks it, unless ``weights`` or ``timings``
    fix one backbone. ``measure(name, size) -> timings``, ``score(name, size, views) -> val AUC`` and
    ``quick(name, size) -> s per slice`` replace the machine timing, the race's probe and its quick look
    (tests inject them). ``max_select``: how many candidates training compares on validation
    (:func:`anymc3d.planning.planner.selection`; 1: ``--no-select``)."""
    from ..backbones import default_input_size
    from ..cli_args import DEFAULT_BACKBONE
    from ..io import write_json
    from .machine import machine_info
    from .race import backbones_here

    budget_s = parse_budget(budget)
    fp = fingerprint(task)
    chosen = backbone or DEFAULT_BACKBONE
    names = [] if backbone or weights is not None or timings is not None else (
        backbones_here() if racers is None else list(racers))
    if measure is None:
        info = machine_info(device)

        def measure(name: str, size: int) -> dict:
            from .machine import measure_timings

            log(f"planning: timing training steps of {name} at {size} px on {info['device']} "
                f"({info['threads']} threads) ...")
            return measure_timings(task, name, size, device=device, weights=weights)
    if chosen in names and len(names) > 1:
        if quick is None:
            from .race import quick_trunk_s as quick
        plan, timings = _race(task, fp, names, chosen, budget_s, device, overrides, threshold, measure, score, quick,
                              log, max_select)
    else:
        if timings is None:
            timings = measure(chosen, _size(fp, chosen, overrides, machine_info(device)["device_type"]))
        plan = make_plan(fp, timings, budget_s, default_input_size(chosen), overrides=overrides, threshold=threshold,
                         max_select=max_select)
        plan.backbone = chosen
    if out is not None:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        write_fingerprint(fp, out / "fingerprint.json")
        write_json(timings, out / "timings.json")
        write_json(plan.to_dict(), out / "plan.json")
    return plan, fp, timings


def _size(fp: dict, backbone: str, overrides: dict | None, device_type: str) -> int:
    """The slice size the plan will choose for ``backbone`` (what its timing is measured at)."""
    from ..backbones import default_input_size
    from .planner import choose_size

    return (overrides or {}).get("size") or choose_size(fp, default_input_size(backbone), device_type)[0]


def _race(task, fp, names, default, budget_s, device, overrides, threshold, measure, score, quick,
          log, max_select: int | None = None) -> tuple[Plan, dict]:
    """Time every racer (a challenger that even a quick look rules out is not timed in full), plan
    each within the budget less the race's reserve, race the eligible ones
    (:func:`anymc3d.planning.race.run_race`) and return the winner's plan and timings."""
    from ..backbones import default_input_size
    from ..errors import InputError
    from .machine import machine_info
    from .planner import split_sizes
    from .race import (RACE_SHARE, Racer, lower_bound_timings, probe_score, race_cost, race_reserve, run_race,
                       timing_cost)

    dtype = machine_info(device)["device_type"]
    reserve = None if budget_s is None else RACE_SHARE * budget_s
    rest = None if budget_s is None else budget_s - reserve

    def plan_within(t: dict, name: str):
        try:
            return make_plan(fp, t, rest, default_input_size(name), overrides=overrides, threshold=threshold,
                             max_select=max_select)
        except InputError:
            return None

    racers, tables, ref, ref_quick = [], {}, None, None
    for name in [default] + [n for n in names if n != default]:  # the default first: the others are held to it
        size = _size(fp, name, overrides, dtype)
        if name != default and ref.plan is not None:
            reserve = race_reserve(reserve, ref.plan)
            q = quick(name, size)
            lb_t = lower_bound_timings(tables[default], q, size)
            lb = plan_within(lb_t, name)
            if lb is None or lb.candidate > ref.plan.candidate:
                best = "no plan" if lb is None else lb.name
                racers.append(Racer(name, None, 0.0, f"not raced: a quick look at its frozen pass shows it affords at "
                                                     f"best {best} within the budget less the race's share (the default "
                                                     f"backbone's there: {ref.plan.name}); not timed further"))
                continue
            if ref_quick is None:
                ref_quick = quick(default, ref.plan.size)
            look = timing_cost(tables[default], ref_quick, q) + race_cost(*split_sizes(fp)[:2], lb_t, lb.views, lb.size)
            if reserve is not None and look + ref.cost_s > reserve:
                racers.append(Racer(name, None, 0.0, f"not raced: a quick look shows that timing it and its probe "
                                                     f"(about {look:.0f} s) would not fit the race's share "
                                                     f"({reserve:.0f} s); not timed further"))
                continue
        t = tables[name] = measure(name, size)
        p = plan_within(t, name)
        racers.append(Racer(name, p, race_cost(*split_sizes(fp)[:2], t, p.views, p.size) if p is not None else 0.0))
        if name == default:
            ref = racers[-1]
    winner = default
    if ref.plan is not None:
        winner = run_race(racers, default, race_reserve(reserve, ref.plan), score or probe_score(task, device=device),
                          log=log)
    raced = any(r.status == "raced" for r in racers)
    if raced:
        plan = next(r.plan for r in racers if r.backbone == winner)
        plan.budget_s = budget_s  # planned within the budget less the race's reserve; the run has the whole budget
    else:  # nothing raced: the default backbone's plan within the whole budget, as without a race
        for r in racers:
            r.status = r.status or "not raced: the default backbone's plan does not fit the budget less the race's share"
        plan = make_plan(fp, tables[default], budget_s, default_input_size(default), overrides=overrides,
                         threshold=threshold, max_select=max_select)
        ref.plan = plan  # its row shows the plan it trains, not the one within the race's remainder
    plan.backbone = winner
    plan.race = [r.row() for r in racers]
    return plan, tables[winner]
