"""Recipe selection on validation: ``anymc3d train`` trains each candidate of the plan's selection
(``Plan.select``, :func:`anymc3d.planning.planner.selection`) and keeps the one with the best
validation AUC, like nnU-Net's ``find_best_configuration`` picks among its configurations on
cross-validation. The test split never takes part in the choice.

Layout of ``--out`` when the plan selects among several candidates::

    OUT/candidates/<name>/   one finished (or resumable) training run per candidate
    OUT/plugin.*, metrics.json, train_log.csv   the winner's files, copied (temp name, then rename)
    OUT/selection.json       every candidate's validation AUC, wall time and the winner

With one candidate the run trains straight into ``OUT`` as before. On ``--resume`` a candidate whose
``metrics.json`` is written is not trained again; an unfinished one continues from its checkpoint."""
from __future__ import annotations

import json
import math
import os
import shutil
import time
from pathlib import Path
from typing import Callable

from ..io import write_json
from ..io.outputs import CHECKPOINT, PLUGIN_FILES
from .distributed import is_main

#: the files of a finished run that make up the plugin folder (the checkpoint stays with its candidate)
RUN_FILES = (*PLUGIN_FILES, "metrics.json", "train_log.csv")
CANDIDATES = "candidates"


def val_auc(metrics: dict) -> float | None:
    """The validation AUC of a run's metrics.json (None when validation gave none)."""
    v = (metrics.get("val") or {}).get("auc")
    return float(v) if v is not None and math.isfinite(float(v)) else None


def pick(rows: list[dict]) -> int:
    """Index of the best row by validation AUC; a tie keeps the earlier row (higher in the quality order),
    a row without a validation AUC never wins over one with."""
    return max(range(len(rows)), key=lambda i: (rows[i]["val_auc"] if rows[i]["val_auc"] is not None else -math.inf, -i))


def _copy_run(src: Path, dst: Path) -> None:
    """The winner's files into ``dst``: each copied to a temporary name first, then all renamed."""
    staged = []
    for name in RUN_FILES:
        if (src / name).is_file():
            tmp = dst / f".{name}.selecting"
            shutil.copy2(src / name, tmp)
            staged.append((tmp, dst / name))
    for tmp, final in staged:
        os.replace(tmp, final)


def train_selection(members: list[dict], out: str | Path, train_one: Callable[[dict, Path, bool], dict],
                    resume: bool = False, log=print) -> dict:
    """Train every member of ``members`` (``Plan.select`` entries: name, prior, estimate_s, settings)
    with ``train_one(member, folder, resume) -> metrics`` and return the winner's metrics (with its
    ``selection`` table). One member: trained straight into ``out``."""
    out, t0 = Path(out), time.time()
    if len(members) <= 1:
        return train_one(members[0], out, resume)
    rows, done = [], {}
    for k, member in enumerate(members):
        folder = out / CANDIDATES / member["name"]
        finished = folder / "metrics.json"
        if resume and finished.is_file():  # metrics.json is the last file a finished run writes
            m = json.loads(finished.read_text())
            log(f"selection {k + 1}/{len(members)}: {member['name']} finished earlier (val AUC {val_auc(m)})")
        else:
            log(f"selection {k + 1}/{len(members)}: training {member['name']} "
                f"(prior {member['prior'] if member.get('prior') is not None else '-'}, "
                f"estimate {member['estimate_s']:.0f} s) into {folder}")
            folder.mkdir(parents=True, exist_ok=True)
            m = train_one(member, folder, resume and (folder / CHECKPOINT).is_file())
        if not is_main():  # torchrun: rank 0 alone scores, compares and writes
            continue
        done[member["name"]] = m
        rows.append({"name": member["name"], "prior": member.get("prior"), "estimate_s": member["estimate_s"],
                     "val_auc": val_auc(m), "wall_s": m.get("total_wall_s"), "folder": str(folder.relative_to(out))})
    if not is_main():
        return {}
    best = pick(rows)
    for i, r in enumerate(rows):
        r["chosen"] = i == best
    winner = rows[best]
    _copy_run(out / winner["folder"], out)
    table = {"rule": "the best validation AUC (ties: the earlier candidate in the plan's quality order); "
                     "the test split takes no part", "winner": winner["name"], "wall_s": round(time.time() - t0, 2),
             "candidates": rows}
    write_json(table, out / "selection.json")
    m = dict(done[winner["name"]], selection=table)
    write_json(m, out / "metrics.json")
    log(selection_table(table))
    return m


def selection_table(table: dict) -> str:
    w = max(len(r["name"]) for r in table["candidates"])
    lines = [f"selection on validation ({table['rule']}):", f"    {'':2s}{'name':{w}s}  {'prior':>6s}  {'val AUC':>7s}  wall"]
    for r in table["candidates"]:
        prior = f"{r['prior']:.3f}" if r.get("prior") is not None else "–"
        auc = f"{r['val_auc']:.4f}" if r["val_auc"] is not None else "–"
        wall = f"{r['wall_s']:.0f} s" if r.get("wall_s") is not None else "–"
        lines.append(f"    {'->' if r['chosen'] else '':2s}{r['name']:{w}s}  {prior:>6s}  {auc:>7s}  {wall}")
    return "\n".join(lines)
