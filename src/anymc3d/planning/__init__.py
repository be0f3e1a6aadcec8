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


def plan_for(task, backbone: str, budget: str | float | None = DEFAULT_BUDGET, device: str = "auto",
             weights: str | None = None, overrides: dict | None = None, out: str | Path | None = None,
             threshold: str = DEFAULT_POLICY, timings: dict | None = None, log=print) -> tuple[Plan, dict, dict]:
    """Fingerprint ``task``, time the candidates on ``device`` (unless ``timings`` is given) and plan.
    Writes fingerprint.json, timings.json and plan.json into ``out`` when given."""
    from ..backbones import default_input_size
    from ..io import write_json
    from .machine import machine_info, measure_timings
    from .planner import choose_size

    budget_s = parse_budget(budget)
    fp = fingerprint(task)
    bsize = default_input_size(backbone)
    if timings is None:
        info = machine_info(device)
        size = (overrides or {}).get("size") or choose_size(fp, bsize, info["device_type"])[0]
        log(f"planning: timing training steps of {backbone} at {size} px on {info['device']} "
            f"({info['threads']} threads) ...")
        timings = measure_timings(task, backbone, size, device=device, weights=weights)
    plan = make_plan(fp, timings, budget_s, bsize, overrides=overrides, threshold=threshold)
    if out is not None:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        write_fingerprint(fp, out / "fingerprint.json")
        write_json(timings, out / "timings.json")
        write_json(plan.to_dict(), out / "plan.json")
    return plan, fp, timings
