"""Training plans (issue 15): fingerprint, injected timings -> deterministic plan, flag overrides,
impossible budgets, the plan in plugin.json and at prediction, the ETA, slice subsets, padding,
threshold policies and the printed threshold."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from anymc3d.cli import main
from anymc3d.data import load_data
from anymc3d.errors import InputError
from anymc3d.evaluation.threshold import choose_threshold, parse_policy, platt_threshold, youden_threshold
from anymc3d.planning import fingerprint, make_plan, parse_budget, plan_table
from anymc3d.planning.fingerprint import intensity_kind

#: a timing table as `anymc3d plan` writes it (seconds per volume / per slice), injected
TIMINGS = {"device": "cpu", "device_type": "cpu", "threads": 2, "cpu_count": 2, "memory_gb": 16.0,
           "available_gb": 8.0, "size": 64, "prep_s_per_volume": 0.01, "aug_s_per_volume": 0.05,
           "trunk_fwd_s": 0.004, "trunk_bytes_per_slice": 3072, "tail_step_s": 0.0005, "tail_fwd_s": 0.0005,
           "full_step_s": 0.03, "full_fwd_s": 0.008}


#: injected priors that make the quality order today's cost order (the flip candidates unmeasured)
COST_ORDER_PRIORS = {n: 0.9 - 0.01 * i for i, n in enumerate(
    ["k1_all", "k1_sub16", "k1_sub8", "k1_sub8_depth32", "axial_k1_all", "axial_k1_sub16", "axial_k1_sub8_depth32",
     "axial_k1_sub8_depth16"])}


def fake_fp(shape=(28, 28, 28), spacing=(1.0, 1.0, 1.0), n=(1188, 98, 298)) -> dict:
    """A fingerprint like AdrenalMNIST3D's (no data needed)."""
    st = lambda v: {"min": v, "median": v, "max": v}  # noqa: E731
    return {"task_type": "binary", "splits": {"train": n[0], "val": n[1], "test": n[2]},
            "inputs": {"image": {"shape": {a: st(s) for a, s in zip("xyz", shape)},
                                 "spacing_mm": {a: st(s) for a, s in zip("xyz", spacing)},
                                 "anisotropy": max(spacing) / min(spacing), "intensity": "uint8"}}}


def test_plan_is_deterministic_for_a_timing_table():
    a = make_plan(fake_fp(), TIMINGS, 1800, 224)
    b = make_plan(fake_fp(), dict(TIMINGS), 1800, 224)
    assert a.to_dict() == b.to_dict()
    assert a.size == 64 and a.views == ["axial", "coronal", "sagittal"] and a.lora_last_k == 1
    assert not a.augment and a.slice_subset is None and a.candidate == 1 and a.estimate_s <= 1800
    # the estimate is the sum of its parts, from the table's per-slice costs
    e = a.estimate
    assert e["total"] == pytest.approx(e["preprocess"] + e["trunk_once"] + e["training"] + e["test"] + e["overhead"], rel=1e-3)
    assert e["trunk_once"] == pytest.approx((1188 + 98 + 298) * 84 * 0.004, rel=1e-3)
    assert e["training"] == pytest.approx(15 * (1188 * 84 * 0.0005 + 98 * 84 * 0.0005), rel=1e-3)


def test_plan_rules_size_views_budget_and_gpu():
    assert make_plan(fake_fp((64, 64, 64)), TIMINGS, None, 224).size == 64
    assert make_plan(fake_fp((200, 200, 40)), TIMINGS, None, 224).size == 224
    aniso = make_plan(fake_fp((128, 128, 30), spacing=(0.8, 0.8, 5.0)), TIMINGS, None, 224)
    assert aniso.views == ["axial"] and aniso.size == 128
    # a tighter budget walks down the quality order to cheaper candidates (priors injected: the cost order)
    chosen = []
    for budget in (3000, 1300, 1000, 600, 400, 300, 200):
        p = make_plan(fake_fp(), TIMINGS, budget, 224, priors=COST_ORDER_PRIORS)
        assert p.estimate_s <= budget
        chosen.append(p.name)
    # k1_sub8_depth32 costs what k1_sub8 does on 28-slice volumes
    assert chosen == ["k1_all", "k1_sub16", "k1_sub8", "axial_k1_all", "axial_k1_sub16", "axial_k1_sub8_depth32",
                      "axial_k1_sub8_depth16"]
    assert p.views == ["axial"] and p.slice_subset == 8 and p.epochs == 5 and p.max_slices == 16
    deep = make_plan(fake_fp((64, 64, 64)), TIMINGS, 1100, 224, priors=COST_ORDER_PRIORS)
    assert deep.max_slices == 32 and deep.views == ["axial", "coronal", "sagittal"]  # resampled depth before fewer views
    gpu_t = {**TIMINGS, "device": "cuda:0", "device_type": "cuda", "size": 224, "full_step_s": 0.0008,
             "full_fwd_s": 0.0002, "aug_s_per_volume": 0.02}
    gpu = make_plan(fake_fp(), gpu_t, 7200, 224)
    assert gpu.size == 224 and gpu.lora_last_k is None and gpu.augment and gpu.slice_subset is None  # the paper's recipe


def test_bigger_budget_never_buys_a_lower_prior_and_the_table_shows_the_candidates():
    """Injected timings and priors: one plan per budget, and the prior chosen never falls as the budget grows."""
    priors = {"k1_all_flips_ens3": 0.96, "k1_all_flips": 0.95, "k1_all_tta": 0.93, "k1_all": 0.90, "k1_sub16": 0.88, "axial_k1_all": 0.85}
    last = -1.0
    names = []
    for budget in (200, 260, 400, 600, 900, 1200, 1800, 3600, 7200, 28800):
        try:
            a = make_plan(fake_fp(), TIMINGS, budget, 224, priors=priors)
        except InputError:
            continue
        b = make_plan(fake_fp(), dict(TIMINGS), budget, 224, priors=dict(priors))
        assert a.to_dict() == b.to_dict()  # deterministic
        assert a.estimate_s <= budget
        prior = a.prior if a.prior is not None else -0.5  # unmeasured ones rank below every measured one
        assert prior >= last
        last = prior
        names.append(a.name)
    assert names[-1] == "k1_all_flips_ens3" and "k1_all" in names and "k1_all_flips" in names
    big = make_plan(fake_fp(), TIMINGS, 28800, 224, priors=priors)
    assert big.flip_copies == 3 and big.test_flips == ["w", "h", "hw"] and big.ensemble == 3 and big.candidate == 1
    # the flips cost: the copies' trunk once, and every val/test pass again per flip
    e = big.estimate
    assert e["trunk_copies"] == pytest.approx(3 * 1188 * 84 * 0.004, rel=1e-3) and e["test_flips"] > 0
    table = plan_table(big)
    assert "candidates, best expected first" in table
    for n in priors:
        assert n in table
    assert "->k1_all_flips_ens3" in table.replace(" ", "")
    # the shipped priors.json: every prior names a real candidate and has the command that measured it
    import anymc3d.planning.planner as planner

    shipped = json.loads(planner.PRIORS_FILE.read_text())
    names = {c["name"] for c in planner.candidates(["axial", "coronal", "sagittal"], "cpu")}
    repo = Path(__file__).resolve().parents[1]
    for name, entry in shipped["candidates"].items():
        assert name in names and entry["prior"] is not None
        # the command that measured it: `anymc3d ...`, or a script that is in benchmarks/
        words = [w for w in entry["command"].split() if "=" not in w.split("/")[0]]
        assert words[0] == "anymc3d" or (words[0] == "python" and words[1].startswith("benchmarks/")
                                         and (repo / words[1]).is_file()), entry["command"]
        # the prior is what the file says it is: the mean of the validation AUCs stored beside it
        aucs = list(entry["val_auc"].values())
        assert entry["prior"] == pytest.approx(sum(aucs) / len(aucs), abs=1e-4)
    assert set(planner.load_priors()) <= names


def test_flags_override_plan_fields_and_are_listed():
    p = make_plan(fake_fp(), TIMINGS, 1800, 224, overrides={"epochs": 3, "augment": True, "slice_subset": 0})
    assert p.epochs == 3 and p.augment and p.slice_subset is None
    assert p.overridden == ["augment", "epochs", "slice_subset"]
    table = plan_table(p)
    assert "epochs                   3 (flag)" in table and "overridden by flags: augment, epochs, slice_subset" in table
    full = make_plan(fake_fp(), TIMINGS, None, 224, overrides={"lora_last_k": 0})
    assert full.lora_last_k is None and full.cache == "none"


def test_impossible_budget_says_what_the_cheapest_plan_needs():
    with pytest.raises(InputError, match=r"budget 10 s is too short: the cheapest plan \(axial, .*\) needs about \d+ (s|min)"):
        make_plan(fake_fp(), TIMINGS, 10, 224)
    assert parse_budget("30m") == 1800 and parse_budget("1.5h") == 5400 and parse_budget("90s") == 90
    with pytest.raises(InputError, match="--budget"):
        parse_budget("soon")


def test_fingerprint_of_a_manifest(binary_manifest):
    fp = fingerprint(load_data(binary_manifest))
    assert fp["task_type"] == "binary" and fp["splits"] == {"test": 4, "train": 8, "val": 4}
    assert fp["label_balance"] == {"0": 4, "1": 4} or sum(fp["label_balance"].values()) == 8
    inp = fp["inputs"]["image"]
    assert inp["shape"]["x"]["median"] == 12 and inp["shape"]["z"]["median"] == 10
    assert inp["spacing_mm"]["z"]["median"] == pytest.approx(2.0) and inp["anisotropy"] == pytest.approx(4 / 3)
    assert inp["intensity"] == "mri" and fp["masks"] == 0
    assert intensity_kind(np.array([-1024.0, 0, 40, 1500]), "int16") == "ct"
    assert intensity_kind(np.array([0.0, 1.0, 1.0]), "float32") == "binary"
    assert intensity_kind(np.arange(256.0), "uint8") == "uint8"


def test_plan_verb_cli_impossible_budget_and_bad_timings(binary_manifest, tmp_path, capsys):
    tfile = tmp_path / "timings.json"
    tfile.write_text(json.dumps(TIMINGS))
    out = tmp_path / "plan"
    assert main(["plan", str(binary_manifest), "--out", str(out), "--timings", str(tfile), "--epochs", "4"]) == 0
    printed = capsys.readouterr().out
    assert "training plan" in printed and "(flag)" in printed and "overridden by flags: epochs" in printed
    plan = json.loads((out / "plan.json").read_text())
    assert plan["epochs"] == 4 and plan["views"] == ["axial"]  # 10 voxels along z: too thin for three views
    assert json.loads((out / "fingerprint.json").read_text())["inputs"]["image"]["n_volumes"] == 16
    assert main(["plan", str(binary_manifest), "--out", str(out), "--timings", str(tfile), "--budget", "1s"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("anymc3d: error: budget 1 s is too short") and "--budget" in err[0]
    bad = tmp_path / "bad.json"
    bad.write_text('{"device": "cpu"}')
    assert main(["plan", str(binary_manifest), "--out", str(out), "--timings", str(bad)]) == 2
    assert "not a timings.json" in capsys.readouterr().err


def test_plan_is_stored_in_plugin_and_reapplied_at_prediction(binary_manifest, positive_volume, tmp_path, capsys):
    tfile = tmp_path / "timings.json"
    tfile.write_text(json.dumps({**TIMINGS, "size": 32}))
    out = tmp_path / "plugin"
    assert main(["train", str(binary_manifest), "--out", str(out), "--timings", str(tfile), "--size", "32",
                 "--epochs", "2", "--slice-subset", "4", "--batch-size", "4", "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "threshold" in printed and "plan estimate" in printed
    spec = json.loads((out / "plugin.json").read_text())
    plan = spec["training"]["plan"]
    saved = json.loads((out / "plan.json").read_text())
    if len(saved["select"]) > 1:  # the plan's selection kept its best candidate on validation (test_selection.py)
        from anymc3d.planning.planner import member_plan

        won = json.loads((out / "selection.json").read_text())["winner"]
        saved = member_plan(saved, next(e for e in saved["select"] if e["name"] == won))
    assert plan == saved
    assert plan["overridden"] == ["batch_size", "epochs", "size", "slice_subset"] and plan["slice_subset"] == 4
    assert spec["training"]["config"]["slice_subset"] == 4 and spec["lora"]["last_k"] == plan["lora_last_k"] == 1
    assert spec["preprocess"]["image"]["size"] == 32 and spec["preprocess"]["image"]["views"] == plan["views"]
    m = json.loads((out / "metrics.json").read_text())
    assert m["plan"] == plan and m["epochs_run"] == 2
    # prediction re-applies the plan's preprocessing (size, views) and the stored threshold, on every slice
    from anymc3d.predict import load

    pred = load(out)
    assert {k: (v.size, v.views) for k, v in pred.specs.items()} == {"image": (32, plan["views"])}
    res = pred.predict(positive_volume)
    assert len(res["slice_weights"]["image:axial"]) == 10  # all slices, not the training subset
    assert res["raw_threshold"] == spec["threshold"]  # res["threshold"]: on the calibrated scale when calibrated
    assert main(["predict", str(out), str(positive_volume), "--out", str(tmp_path / "pred")]) == 0
    line = next(ln for ln in capsys.readouterr().out.splitlines() if not ln.startswith("note:"))  # notes come first
    assert f"threshold {res['threshold']:.3f}" in line and "p(" in line
    # --resume re-uses OUT/plan.json (no new timing, same plan)
    assert main(["train", str(binary_manifest), "--out", str(out), "--epochs", "2", "--size", "32",
                 "--slice-subset", "4", "--batch-size", "4", "--resume"]) == 0
    assert "(from " in capsys.readouterr().out


def test_progress_display_shows_an_eta(capsys):
    from anymc3d.training.trainer import progress_bar

    bar = progress_bar(4, True)
    bar.disable = False
    for _ in range(2):
        bar.update(1)
    bar.refresh()
    text = str(bar)
    bar.close()
    assert "ETA " in text and "2/4 steps" in text and "elapsed" in text


def test_slice_subset_and_no_work_on_padding():
    from anymc3d.runtime.batching import collate, per_case_stacks, slice_subset

    g = torch.Generator().manual_seed(0)
    cases = [{"s": torch.arange(10.0).view(10, 1)}, {"s": torch.arange(3.0).view(3, 1)}]
    sub = slice_subset(cases, 4, g)
    assert sub[0]["s"].shape[0] == 4 and sub[1]["s"].shape[0] == 3
    assert torch.all(sub[0]["s"][1:, 0] > sub[0]["s"][:-1, 0])  # kept in slice order
    assert set(sub[0]["s"][:, 0].tolist()) <= set(range(10))
    slices, masks, _ = collate(cases, ["s"])
    back = per_case_stacks(slices, masks)
    assert torch.equal(back[1]["s"], cases[1]["s"]) and torch.equal(back[0]["s"], cases[0]["s"])


def test_padding_slices_do_not_reach_the_backbone(binary_manifest):
    """A short stack padded in a batch gives the same probabilities as alone, and the backbone
    sees only the real slices."""
    from anymc3d.backbones import create_backbone
    from anymc3d.plugins import LoraSpec, PluginSpec
    from anymc3d.plugins.model import AnyMC3D
    from anymc3d.runtime.batching import collate

    bb = create_backbone("efficientnet_lite0", input_size=32)
    spec = PluginSpec(task="t", task_type="binary", label_names=["0", "1"], inputs=["image"],
                      preprocess={"image": {"views": ["axial"], "size": 32}}, backbone=bb.name, backbone_fingerprint=bb.fingerprint,
                      input_size=32, lora=LoraSpec(r=2))
    torch.manual_seed(0)
    model = AnyMC3D(bb, spec, autocast=False).eval()
    long, short = torch.rand(6, 1, 32, 32), torch.rand(2, 1, 32, 32)
    slices, masks, present = collate([{"image:axial": long}, {"image:axial": short}], ["image:axial"])
    seen = []
    hook = bb.register_forward_hook(lambda m, i, o: seen.append(i[0].shape[0]))
    with torch.no_grad():
        both = model(slices, masks, present).logits
        alone = model({"image:axial": short[None]}, {"image:axial": torch.ones(1, 2, dtype=torch.bool)}).logits
    hook.remove()
    assert seen[0] == 8  # 6 + 2 real slices, not 2 x 6
    assert torch.allclose(both[1], alone[0], atol=1e-5)


def test_threshold_policies():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 400)
    # focal-like scores: informative but shifted low; the accuracy-optimal cut is well below 0.5
    z = (y * 2.0 - 1.0) * 1.5 + rng.normal(0, 1.0, 400) - 1.6
    p = 1 / (1 + np.exp(-z))
    t = platt_threshold(y, p)
    assert 0.05 < t < 0.4
    acc = lambda thr: float(np.mean((p > thr) == y))  # noqa: E731
    assert acc(t) > acc(0.5)
    assert choose_threshold(y, p, "binary", "youden") == youden_threshold(y, p)
    assert choose_threshold(y, p, "binary", 0.3) == 0.3
    assert choose_threshold(y, p, "multiclass") == 0.5
    assert platt_threshold(np.ones(5), np.linspace(0, 1, 5)) == 0.5  # one class: fall back
    assert platt_threshold(y, 1 - p) == 0.5  # anti-correlated: no positive slope, fall back
    assert parse_policy("youden") == "youden" and parse_policy("0.4") == 0.4
    with pytest.raises(ValueError):
        parse_policy("1.5")


def test_no_plan_keeps_the_fixed_defaults(binary_manifest, tmp_path):
    import argparse

    from anymc3d.planning.cli import settings_for_training

    a = argparse.Namespace(no_plan=True, workers=0, epochs=None, batch_size=None, patience=None, size=None,
                           views=None, lora_last_k=None, augment=None, slice_subset=5, out=tmp_path, resume=False)
    st = settings_for_training(a, None)
    assert st["epochs"] == 30 and st["augment"] and st["lora_last_k"] is None and st["slice_subset"] == 5
    assert Path(tmp_path).is_dir() and not (tmp_path / "plan.json").exists()


def test_bench_plan_method_trains_with_the_plan(binary_manifest, tmp_path):
    """The bench's `plan` method is `anymc3d train DATA` with no options (here with injected timings)."""
    from anymc3d.bench.methods import DEFAULT_OPTIONS, get_method

    tfile = tmp_path / "timings.json"
    tfile.write_text(json.dumps(TIMINGS))
    o = {**DEFAULT_OPTIONS, "timings": str(tfile), "budget": "10m"}
    res = get_method("plan").run(load_data(binary_manifest), tmp_path / "cell", 0, o)
    plan = json.loads((tmp_path / "cell" / "plan.json").read_text())
    assert plan["epochs"] == res["epochs_run"] or res["epochs_run"] < plan["epochs"]  # early stopping may end it
    spec = json.loads((tmp_path / "cell" / "plugin.json").read_text())
    assert res["auc"] == spec["metrics"]["test"]["auc"]  # the cell reports the plugin's own test AUC
    # the cell selects on validation as `anymc3d train` does: its plugin is the selection's winner
    from anymc3d.planning.planner import member_plan

    won = json.loads((tmp_path / "cell" / "selection.json").read_text())["winner"] if len(plan["select"]) > 1 \
        else plan["name"]
    assert f"the default training plan: {won}" in res["detail"]
    assert spec["training"]["plan"] == member_plan(plan, next(e for e in plan["select"] if e["name"] == won))
    assert spec["preprocess"]["image"]["size"] == plan["size"] == 64
