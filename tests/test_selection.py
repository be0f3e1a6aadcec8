"""Recipe selection on validation (issue 32): the plan lists the candidates training compares
(``Plan.select``), a bigger budget's list extends a smaller one's, and ``anymc3d train`` keeps the
candidate with the best validation AUC (never the test split) and resumes a selection."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from test_plan import TIMINGS, fake_fp

from anymc3d.cli import main
from anymc3d.errors import InputError
from anymc3d.io import check_output_folder
from anymc3d.planning import make_plan, plan_table
from anymc3d.planning.planner import MAX_SELECT
from anymc3d.training.selection import train_selection

PRIORS = {"k1_all_flips_ens3": 0.96, "k1_all_flips": 0.95, "k1_all_tta": 0.93, "k1_all": 0.90, "k1_sub16": 0.88,
          "axial_k1_all": 0.85}


def _names(p) -> list[str]:
    return [e["name"] for e in p.select]


def test_selection_per_budget_is_deterministic_and_a_bigger_budget_extends_it():
    plans = {}
    for budget in (300, 600, 900, 1200, 1800, 2400, 3600, 7200, 28800):
        try:
            a = make_plan(fake_fp(), TIMINGS, budget, 224, priors=PRIORS)
        except InputError:
            continue
        assert a.to_dict() == make_plan(fake_fp(), dict(TIMINGS), budget, 224, priors=dict(PRIORS)).to_dict()
        assert a.select[0]["name"] == a.name and a.select[0]["settings"]["epochs"] == a.epochs
        assert a.select_estimate_s == pytest.approx(sum(e["estimate_s"] for e in a.select), abs=0.01)
        assert a.select_estimate_s <= budget and 1 <= len(a.select) <= MAX_SELECT
        # the members follow the quality order, each once
        order = [r["name"] for r in a.considered]
        idx = [order.index(n) for n in _names(a)]
        assert idx == sorted(idx) and len(set(_names(a))) == len(idx)
        plans[budget] = a
    budgets = sorted(plans)
    assert len(budgets) >= 5
    for small, big in zip(budgets, budgets[1:]):
        s, b = plans[small], plans[big]
        assert (b.prior or -1) >= (s.prior or -1)  # never a lower-prior first candidate
        if b.name == s.name:  # same first candidate: the bigger budget's selection extends the smaller one's
            assert _names(b)[:len(s.select)] == _names(s)
    assert len(plans[budgets[-1]].select) == MAX_SELECT and len(plans[budgets[0]].select) < MAX_SELECT
    # a selection is shown in the plan's table; one candidate only with max_select=1 (--no-select)
    table = plan_table(plans[budgets[-1]])
    assert "selection" in table and "+ " in table
    one = make_plan(fake_fp(), TIMINGS, 28800, 224, priors=PRIORS, max_select=1)
    assert _names(one) == [one.name] == [plans[budgets[-1]].name]


def test_flags_that_make_candidates_equal_leave_one_of_them():
    """With the levers turned off by flags the lever candidates are k1_all again: trained once."""
    off = {"flip_copies": 0, "test_flips": [], "ensemble": 1, "ema": 0.0, "label_smoothing": 0.0, "mixup": 0.0,
           "view_dropout": 0.0}
    p = make_plan(fake_fp(), TIMINGS, 28800, 224, priors=PRIORS, overrides=off)
    settings = [json.dumps(e["settings"], sort_keys=True) for e in p.select]
    assert len(settings) == len(set(settings)) and len(p.select) >= 2
    assert all(e["settings"]["flip_copies"] == 0 and e["settings"]["ensemble"] == 1 for e in p.select)


def _fake_run(val_aucs: dict, calls: list):
    """train_one stand-in: writes a finished run's files with the given validation AUC (test AUC = 1 - val)."""
    def train_one(member: dict, folder: Path, resume: bool) -> dict:
        calls.append((member["name"], resume))
        v = val_aucs[member["name"]]
        m = {"val": {"auc": v}, "test": {"auc": None if v is None else 1 - v}, "auc": None if v is None else 1 - v,
             "total_wall_s": 1.0, "name": member["name"]}
        (folder / "plugin.json").write_text(json.dumps({"name": member["name"]}))
        (folder / "plugin.safetensors").write_bytes(member["name"].encode())
        (folder / "checkpoint.pt").write_bytes(b"x")
        (folder / "metrics.json").write_text(json.dumps(m))
        return m
    return train_one


def _members(*names):
    return [{"name": n, "prior": None, "estimate_s": 10.0, "settings": {}} for n in names]


def test_selection_keeps_the_best_validation_auc_and_resumes(tmp_path):
    calls = []
    run = _fake_run({"a": 0.80, "b": 0.90, "c": 0.90, "d": None}, calls)
    m = train_selection(_members("a", "b", "c", "d"), tmp_path, run, log=lambda *_: None)
    # b wins: the best validation AUC, tied with c (the earlier keeps it), whatever the test AUC says
    assert m["name"] == "b" and m["selection"]["winner"] == "b"
    assert json.loads((tmp_path / "plugin.json").read_text()) == {"name": "b"}
    assert (tmp_path / "plugin.safetensors").read_bytes() == b"b"
    assert json.loads((tmp_path / "metrics.json").read_text())["selection"]["winner"] == "b"
    assert not (tmp_path / "checkpoint.pt").exists() and not list(tmp_path.glob(".*selecting"))
    sel = json.loads((tmp_path / "selection.json").read_text())
    assert [r["val_auc"] for r in sel["candidates"]] == [0.80, 0.90, 0.90, None]
    assert [r["chosen"] for r in sel["candidates"]] == [False, True, False, False]
    assert calls == [("a", False), ("b", False), ("c", False), ("d", False)]
    # resume: finished candidates are read back, an unfinished one continues from its checkpoint
    (tmp_path / "candidates" / "c" / "metrics.json").unlink()
    calls.clear()
    again = train_selection(_members("a", "b", "c", "d"), tmp_path, run, resume=True, log=lambda *_: None)
    assert calls == [("c", True)] and again["selection"]["winner"] == "b"
    # the output-folder rule lets --resume continue a selection (its checkpoints are the candidates')
    (tmp_path / "plugin.json").unlink()
    (tmp_path / "plugin.safetensors").unlink()
    assert check_output_folder(tmp_path, resume=True) == tmp_path
    with pytest.raises(InputError, match="checkpoint of an unfinished run"):
        check_output_folder(tmp_path)
    # one member: trained straight into the folder, no selection files
    one = tmp_path / "one"
    one.mkdir()
    assert "selection" not in train_selection(_members("a"), one, run)
    assert (one / "plugin.json").is_file() and not (one / "candidates").exists()


def test_train_verb_selects_on_validation_and_the_plugin_is_the_winner(binary_manifest, positive_volume, tmp_path,
                                                                      capsys):
    tfile = tmp_path / "timings.json"
    tfile.write_text(json.dumps({**TIMINGS, "size": 32}))
    out = tmp_path / "plugin"
    args = ["train", str(binary_manifest), "--out", str(out), "--timings", str(tfile), "--size", "32", "--epochs", "2",
            "--batch-size", "4", "--quiet"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    plan = json.loads((out / "plan.json").read_text())
    names = [e["name"] for e in plan["select"]]
    assert len(names) >= 2 and "selection on validation" in printed and "kept " in printed
    sel = json.loads((out / "selection.json").read_text())
    assert [r["name"] for r in sel["candidates"]] == names
    vals = [r["val_auc"] for r in sel["candidates"]]
    win = sel["winner"]
    assert vals[names.index(win)] == max(vals) and names.index(win) == vals.index(max(vals))
    for name in names:  # each candidate trained with its own settings
        spec = json.loads((out / "candidates" / name / "plugin.json").read_text())
        member = plan["select"][names.index(name)]
        assert spec["training"]["plan"]["name"] == name
        assert spec["ensemble"] == member["settings"]["ensemble"]
        assert spec["test_flips"] == member["settings"]["test_flips"]
        m = json.loads((out / "candidates" / name / "metrics.json").read_text())
        assert m["val"]["auc"] == vals[names.index(name)]
    # OUT holds the winner: its plugin answers predict, its metrics carry the selection
    assert (out / "plugin.safetensors").read_bytes() == (out / "candidates" / win / "plugin.safetensors").read_bytes()
    m = json.loads((out / "metrics.json").read_text())
    assert m["plan"]["name"] == win and m["selection"]["winner"] == win
    assert main(["predict", str(out), str(positive_volume), "--out", str(tmp_path / "pred")]) == 0
    # --resume of a finished selection trains nothing again
    (out / "plugin.json").unlink()
    assert main(args[:-1] + ["--resume"]) == 0
    again = capsys.readouterr().out
    assert again.count("finished earlier") == len(names) and (out / "plugin.json").is_file()
