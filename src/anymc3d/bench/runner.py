"""The bench runner: suite x methods x seeds -> one JSON per cell -> results.csv + results.md.

Layout of ``DIR``::

    cells/<task>__<method>__s<seed>.json   one finished (or failed) cell, written atomically
    runs/<task>/<method>/s<seed>/          what the method wrote (plugin files, logs)
    cache/                                 frozen-feature caches shared by the cached methods
    data/                                  generated synthetic tasks
    results.csv, results.md                rebuilt from cells/ after every cell

Resume: a cell whose JSON says ``status: ok`` with the same option fingerprint is not
recomputed; failed cells and cells whose options changed are run again. A training cell that was
interrupted (Ctrl-C, a killed job) continues from its last finished epoch
(``runs/.../checkpoint.pt``) when its fingerprint is unchanged, so a long row can be built over
several sittings; a checkpoint that other options wrote is deleted first.
"""
from __future__ import annotations

import csv
import hashlib
import json
import math
import os
import platform
import shlex
import sys
import time
import traceback
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from ..errors import InputError
from ..io import atomic_write, write_json
from .methods import DEFAULT_OPTIONS, METHODS, get_method
from .quoted import QUOTED
from .suite import Suite, materialise

CSV_COLUMNS = ["method", "task", "source", "n_seeds", "seeds", "auc_mean", "auc_std", "auc_ci_lo", "auc_ci_hi",
               "acc_mean", "acc_std", "acc_ci_lo", "acc_ci_hi", "acc05_mean", "trainable_params", "train_s",
               "infer_s_per_volume", "status", "description", "citation"]


def cell_path(out: Path, task: str, method: str, seed: int) -> Path:
    return Path(out) / "cells" / f"{task}__{method}__s{seed}.json"


def prepare_workdir(work: Path, fp: str) -> Path:
    """Create a cell's run folder; keep a training checkpoint only if this fingerprint wrote it."""
    work.mkdir(parents=True, exist_ok=True)
    marker = work / "cell_fingerprint.txt"
    if not marker.is_file() or marker.read_text().strip() != fp:
        (work / "checkpoint.pt").unlink(missing_ok=True)
        with atomic_write(marker) as tmp:
            Path(tmp).write_text(fp + "\n")
    return work


def fingerprint(method: str, options: dict, task_entry, device: str) -> str:
    """The cell's identity: method, the options it reads, the task, and the device it computes on
    (:func:`used_device`): a cell measured on another device is measured again, not taken as the same."""
    blob = json.dumps({"method": method, "options": get_method(method).relevant_options(options),
                       "task": task_entry.to_dict(), "device": device}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def used_device(options: dict) -> str:
    """The device the cells actually compute on: the ``device`` option resolved on this machine, e.g.
    ``cpu``, ``cuda (NVIDIA H200)`` or ``mps`` (the same text on every rank of a torchrun launch)."""
    from ..runtime.device import resolve_device
    from ..runtime.distributed import rank_device

    dev = resolve_device(rank_device(str(options.get("device", "auto"))))
    if dev.type == "cuda":
        import torch

        return f"cuda ({torch.cuda.get_device_name(dev)})"
    return dev.type


def machine(device: str | None = None) -> str:
    """The machine line of ``results.md``: CPU, threads and the device used (:func:`used_device`)."""
    try:
        import torch

        threads = torch.get_num_threads()
        tv = torch.__version__
    except Exception:  # pragma: no cover
        threads, tv = "?", "?"
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (f"{cpu}, {os.cpu_count()} logical CPUs, torch {tv} with {threads} thread(s), "
            f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}, {_device_text(device)}")


def _device_text(device: str | None) -> str:
    if device is None:
        return "device not recorded"
    return "device cpu (no GPU used)" if device == "cpu" else f"device {device}"


def _read_cell(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _json_safe(x):
    if isinstance(x, dict):
        return {k: _json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_safe(v) for v in x]
    if isinstance(x, (np.floating, float)):
        return None if not math.isfinite(float(x)) else float(x)
    if isinstance(x, np.integer):
        return int(x)
    return x


class _Progress:
    """A rich progress bar naming the running cell; plain log lines when rich is unavailable or quiet."""

    def __init__(self, total: int, enabled: bool, verbose: bool = True) -> None:
        self.enabled, self.verbose, self.total, self._p = enabled, verbose, total, None
        if enabled:
            try:
                from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

                self._p = Progress(TextColumn("[bold]bench[/]"), BarColumn(), MofNCompleteColumn(),
                                   TimeElapsedColumn(), TextColumn("{task.description}"), transient=False)
                self._id = self._p.add_task("", total=total)
                self._p.start()
            except Exception:  # pragma: no cover - rich missing or no terminal
                self._p = None

    def running(self, text: str) -> None:
        if self._p is not None:
            self._p.update(self._id, description=f"running {text}")

    def advance(self) -> None:
        if self._p is not None:
            self._p.advance(self._id)

    def log(self, msg: str) -> None:
        if self._p is not None:
            self._p.console.print(msg, highlight=False, markup=False)
        elif self.verbose:
            print(msg, flush=True)

    def stop(self) -> None:
        if self._p is not None:
            self._p.stop()


class _RankZeroFailed(Exception):
    """Under torchrun: rank 0 could not set a cell up (it records why); the other ranks skip the cell."""


#: method kinds that train through ``training.trainer.fit``: under torchrun every rank runs such a cell
#: (DistributedDataParallel); the other kinds (frozen features + a small head) run on rank 0 alone
DDP_KINDS = ("plugin", "plan", "cnn3d")


def _plan_cells(suite: Suite, methods: list[str], seeds: int | list[int], tasks: list[str] | None,
                options: dict | None) -> tuple[list[int], list, dict, list[tuple]]:
    """Check the methods, seeds, tasks and options -> ``(seeds, task entries, options, cells)``; the cells
    are ``(entry, method, seed)`` in the order every rank walks them."""
    for m in methods:
        get_method(m)
    seeds = list(range(seeds)) if isinstance(seeds, int) else list(seeds)
    if not seeds:
        raise InputError("--seeds must be >= 1")
    entries = [suite.task(t) for t in tasks] if tasks else list(suite.tasks)
    opts = {**DEFAULT_OPTIONS, **suite.options, **(options or {})}
    unknown = sorted(set(opts) - set(DEFAULT_OPTIONS))
    if unknown:
        raise InputError(f"unknown option(s) {unknown}; known: {', '.join(DEFAULT_OPTIONS)}")
    cells = [(e, m, s) for e in entries for m in methods for s in seeds]
    return seeds, entries, opts, cells


@dataclass
class _BenchRun:
    """What the cells of one ``run_bench`` share: the folder, options, this rank's role, progress and counts."""
    out: Path
    suite: Suite
    state: dict
    opts: dict
    run_opts: dict
    ui: _Progress
    main: bool
    several: bool
    command: str | None
    retry_failed: bool
    loaded: dict = field(default_factory=dict)
    done: int = 0
    skipped: int = 0
    failed: int = 0

    def task(self, entry):
        """The task of ``entry``, generated or read once (one task kept in memory)."""
        if entry.name not in self.loaded:
            self.loaded.clear()  # keep one task in memory
            self.loaded[entry.name] = materialise(entry, self.out / "data", log=self.ui.log)
        return self.loaded[entry.name]


def _cell_decision(run: _BenchRun, path: Path, fp: str) -> str | None:
    """Rank 0's view of one cell, shared with every rank: ``skip`` (done with these options), ``changed``
    (ran with other options) or None (to run)."""
    from ..runtime import distributed as dist

    decision = None
    if run.main:
        old = _read_cell(path) if path.is_file() else None
        if old and old.get("fingerprint") == fp and (old.get("status") == "ok" or not run.retry_failed):
            decision = "skip"
        elif old and old.get("fingerprint") != fp:
            decision = "changed"
    return dist.broadcast_object(decision)  # every rank takes rank 0's view of the cells


def _compute_cell(run: _BenchRun, cell: dict, entry, method: str, seed: int, m, fp: str, path: Path,
                  t0: float) -> None:
    """Set one cell up (rank 0) and run it where it runs; its result or error goes into ``cell``.

    A training cell that fails under torchrun after its set-up is recorded (rank 0) and re-raised."""
    from ..runtime import distributed as dist

    runs_here = run.main or m.kind in DDP_KINDS
    work = run.out / "runs" / entry.name / method / f"s{seed}"
    told = not run.several  # under torchrun: have the other ranks heard whether rank 0's set-up worked?
    past_setup = False
    try:
        if run.main:  # rank 0 generates a synthetic task and prepares the folder; the others read them
            run.task(entry)
            prepare_workdir(work, fp)
        if not told:
            told = True
            if not dist.broadcast_object(True):  # False: rank 0 failed and records the cell
                raise _RankZeroFailed
        past_setup = True
        if runs_here:
            task = run.task(entry)
            res = m.run(task, work, seed, run.run_opts)
            cell.update(status="ok", result=res, task_type=task.task_type)
            run.done += 1
            run.ui.log(f"   {entry.name} / {method} / seed {seed}: AUC {_f(res.get('auc'))}  ACC {_f(res.get('acc'))}  "
                       f"({time.time() - t0:.0f} s)")
    except KeyboardInterrupt:
        raise
    except _RankZeroFailed:
        run.failed += 1
    except Exception as exc:  # a failing cell is recorded and the bench goes on
        if not told:  # rank 0's set-up failed before the others heard from it
            told = True
            dist.broadcast_object(False)
        cell.update(status="error", error=f"{type(exc).__name__}: {exc}", traceback=traceback.format_exc()[-4000:])
        run.failed += 1
        run.ui.log(f"   FAILED {entry.name} / {method} / seed {seed}: {type(exc).__name__}: {exc}")
        if run.several and m.kind in DDP_KINDS and past_setup:  # the others may wait in a collective
            if run.main:
                cell["wall_s"] = round(time.time() - t0, 2)
                write_json(_json_safe(cell), path)
            raise


def _run_cell(run: _BenchRun, entry, method: str, seed: int, where: str) -> None:
    """One cell: skipped when done, else run and (rank 0) written with the tables rebuilt."""
    from ..runtime import distributed as dist

    path = cell_path(run.out, entry.name, method, seed)
    device = run.state["device"]
    fp = fingerprint(method, run.opts, entry, device)
    m = get_method(method)
    decision = _cell_decision(run, path, fp)
    if decision == "skip":
        run.skipped += 1
        run.ui.advance()
        return
    if decision == "changed":
        run.ui.log(f"{path.name}: options changed since it ran, recomputing")
    label = f"{entry.name} / {method} / seed {seed} ({where})"
    run.ui.running(label)
    run.ui.log(f"-> {label}")
    t0 = time.time()
    cell = {"task": entry.name, "method": method, "seed": seed, "fingerprint": fp,
            "options": m.relevant_options(run.opts), "description": m.description,
            "started": datetime.now(timezone.utc).isoformat(timespec="seconds"), "machine": run.state["machine"],
            "device": device,
            "command": run.command, **({"world_size": dist.world_size()} if m.kind in DDP_KINDS else {})}
    _compute_cell(run, cell, entry, method, seed, m, fp, path, t0)
    if run.main:
        cell["wall_s"] = round(time.time() - t0, 2)
        write_json(_json_safe(cell), path)
        write_tables(run.out, run.suite, run.state)
    if run.several:
        dist.barrier()  # the rank-0-only cells: the others wait here
    run.ui.advance()


def run_bench(suite: Suite, methods: list[str], seeds: int | list[int], out: str | Path, tasks: list[str] | None = None,
              options: dict | None = None, progress: bool = True, command: str | None = None,
              retry_failed: bool = True, verbose: bool = True) -> dict:
    """Run the missing cells, then rebuild ``results.csv`` / ``results.md``. Returns a summary dict.

    Under ``torchrun`` (docs/scale.md) the ranks walk the same cells in the same order: rank 0 decides
    which cells are done, generates synthetic data and writes every file of ``out`` (cell JSONs,
    tables, ``bench.json``); training cells run data-parallel on every rank, the others on rank 0
    while the rest wait. A training cell that fails under torchrun stops the bench on every rank
    (rank 0 has recorded it when it failed there): a rank left inside a collective cannot go on.
    A rerun continues from the finished cells."""
    from ..runtime import distributed as dist

    out = Path(out)
    seeds, entries, opts, cells = _plan_cells(suite, methods, seeds, tasks, options)
    main, several = dist.is_main(), dist.world_size() > 1
    out.mkdir(parents=True, exist_ok=True)
    ui = _Progress(len(cells), progress and main, verbose and main)
    run_opts = {**opts, "cache_dir": str(out / "cache"), "progress": False, "log": ui.log}
    device = used_device(opts)
    state = {"suite": suite.name, "source": suite.source, "command": command, "machine": machine(device),
             "device": device,
             "methods": methods, "seeds": seeds, "tasks": [e.name for e in entries],
             "options": {k: v for k, v in opts.items()}, "world_size": dist.world_size()}
    if main:
        write_json(_json_safe(state), out / "bench.json")
    run = _BenchRun(out=out, suite=suite, state=state, opts=opts, run_opts=run_opts, ui=ui, main=main,
                    several=several, command=command, retry_failed=retry_failed)
    try:
        for i, (entry, method, seed) in enumerate(cells):
            _run_cell(run, entry, method, seed, f"cell {i + 1}/{len(cells)}")
    finally:
        ui.stop()
        if main:
            write_tables(out, suite, state)
    return {"ran": run.done, "skipped": run.skipped, "failed": run.failed, "cells": len(cells),
            "csv": str(out / "results.csv"), "md": str(out / "results.md")}


# ------------------------------------------------------------------------------------ tables
def _f(x, nd: int = 3) -> str:
    return "–" if x is None or (isinstance(x, float) and not math.isfinite(x)) else f"{x:.{nd}f}"


def _mean(vals):
    v = [float(x) for x in vals if x is not None and math.isfinite(float(x))]
    return float(np.mean(v)) if v else None


def _std(vals):
    v = [float(x) for x in vals if x is not None and math.isfinite(float(x))]
    return float(np.std(v, ddof=1)) if len(v) > 1 else None


def collect(out: Path, suite: Suite | None = None) -> tuple[list[dict], list[dict]]:
    """-> (measured rows, quoted rows); one measured row per (method, task) with any cell in ``out/cells``."""
    groups: dict[tuple, list[dict]] = {}
    for p in sorted((Path(out) / "cells").glob("*.json")):
        c = _read_cell(p)
        if not c or "task" not in c:
            continue
        groups.setdefault((c["method"], c["task"]), []).append(c)
    order = {m: i for i, m in enumerate(METHODS)}
    task_order = {t.name: i for i, t in enumerate(suite.tasks)} if suite else {}
    rows = []
    for (method, task), cs in sorted(groups.items(), key=lambda kv: (task_order.get(kv[0][1], 99), order.get(kv[0][0], 999), kv[0])):
        ok = sorted((c for c in cs if c.get("status") == "ok"), key=lambda c: c["seed"])
        res = [c["result"] for c in ok]
        ci = lambda k, j: _mean([(r.get("ci") or {}).get(k)[j] for r in res if (r.get("ci") or {}).get(k)])  # noqa: E731
        status = "ok" if ok and len(ok) == len(cs) else ("partial" if ok else "failed: " + "; ".join(
            str(c.get("error", "?")).splitlines()[0][:120] for c in cs))
        rows.append({
            "method": method, "task": task, "source": "measured", "n_seeds": len(ok),
            "seeds": " ".join(str(c["seed"]) for c in ok),
            "auc_mean": _mean([r.get("auc") for r in res]), "auc_std": _std([r.get("auc") for r in res]),
            "auc_ci_lo": ci("auc", 0), "auc_ci_hi": ci("auc", 1),
            "acc_mean": _mean([r.get("acc") for r in res]), "acc_std": _std([r.get("acc") for r in res]),
            "acc_ci_lo": ci("acc", 0), "acc_ci_hi": ci("acc", 1),
            "acc05_mean": _mean([r.get("acc_at_0.5") for r in res]),
            "trainable_params": res[0].get("trainable_params") if res else None,
            "train_s": _mean([r.get("train_s") for r in res]),
            "infer_s_per_volume": _mean([r.get("infer_s_per_volume") for r in res]),
            "status": status, "description": (cs[0].get("description") or ""), "citation": "",
        })
    quoted = []
    if suite:
        for t in suite.tasks:
            if t.quoted and any(r["task"] == t.name for r in rows) or (t.quoted and not rows):
                for q in QUOTED[t.quoted]:
                    quoted.append({"method": q["method"], "task": t.name, "source": "quoted", "n_seeds": None,
                                   "seeds": "", "auc_mean": q["auc"], "acc_mean": q["acc"], "status": "quoted",
                                   "description": "published number, not measured here", "citation": q["citation"]})
    return rows, quoted


def write_tables(out: Path, suite: Suite, state: dict | None = None) -> None:
    out = Path(out)
    rows, quoted = collect(out, suite)
    with atomic_write(out / "results.csv") as tmp:
        with open(tmp, "w", newline="", encoding="utf-8") as fh:
            w = csv.DictWriter(fh, fieldnames=CSV_COLUMNS, extrasaction="ignore")
            w.writeheader()
            for r in rows + quoted:
                w.writerow({k: ("" if r.get(k) is None else (f"{r[k]:.6g}" if isinstance(r.get(k), float) else r[k]))
                            for k in CSV_COLUMNS})
    with atomic_write(out / "results.md") as tmp:
        Path(tmp).write_text(render_markdown(rows, quoted, suite, state or {}, out), encoding="utf-8")


def _commands(out: Path) -> list[str]:
    cmds = []
    for p in sorted((Path(out) / "cells").glob("*.json")):
        c = _read_cell(p)
        if c and c.get("status") == "ok" and c.get("command"):
            cmds.append(c["command"])
    return list(dict.fromkeys(cmds))


def _pm(mean, std) -> str:
    if mean is None:
        return "–"
    return f"{mean:.3f} ± {std:.3f}" if std is not None else f"{mean:.3f}"


def _params(n) -> str:
    if n is None:
        return "–"
    return f"{n / 1e6:.2f} M" if n >= 1e5 else f"{n:,}"


def render_markdown(rows: list[dict], quoted: list[dict], suite: Suite, state: dict, out: Path) -> str:
    tasks = [t.name for t in suite.tasks if any(r["task"] == t.name for r in rows + quoted)]
    methods = list(dict.fromkeys(r["method"] for r in rows))
    by = {(r["method"], r["task"]): r for r in rows}
    lines = [f"# Benchmark: {suite.name}", ""]
    commands = list(dict.fromkeys([c for c in _commands(out) if c] + ([state["command"]] if state.get("command") else [])))
    if commands:
        lines += ["Commands that produced these cells:", ""] + [f"    {c}" for c in commands] + [""]
    devices: dict[str, int] = {}
    for c in filter(None, map(_read_cell, sorted((Path(out) / "cells").glob("*.json")))):
        if c.get("status") == "ok":
            key = c.get("device") or "not recorded"
            devices[key] = devices.get(key, 0) + 1
    lines += [f"Machine: {state.get('machine') or machine()}  ",
              f"Devices the cells ran on: {', '.join(f'{d} ({n} cells)' for d, n in devices.items()) or 'none yet'}  ",
              f"Updated: {datetime.now(timezone.utc).isoformat(timespec='seconds')}  ",
              "Metrics on the test split, MedMNIST definitions (binary AUC on the positive-class score; multi-class "
              "AUC = mean one-vs-rest; multi-label = macro mean). ACC at the threshold chosen on validation "
              "(the Platt policy of docs/plan.md; Youden's J in cells older than issue 15) for trained binary heads, 0.5 for logistic regression; `ACC@0.5` is MedMNIST's ACC. "
              "mean ± std over seeds (std only with ≥ 2 seeds); CI = 95 % bootstrap CI of the test metric "
              "(1000 resamples, averaged over seeds).", ""]
    lines += ["## Measured", ""]
    if rows:
        head = ["method"] + [f"{t} AUC | {t} ACC" for t in tasks] + ["trainable params", "train s", "infer s/vol"]
        lines.append("| " + " | ".join(head) + " |")
        lines.append("|" + "---|" * (1 + 2 * len(tasks) + 3))
        for m in methods:
            cells = []
            for t in tasks:
                r = by.get((m, t))
                if r is None or r["auc_mean"] is None and r["acc_mean"] is None:
                    note = "not run" if r is None else r["status"].split(":")[0]
                    cells += [note, "–"]
                else:
                    cells += [_pm(r["auc_mean"], r["auc_std"]), _pm(r["acc_mean"], r["acc_std"])]
            mine = [by[(m, t)] for t in tasks if (m, t) in by and by[(m, t)]["n_seeds"]]
            params = sorted({r["trainable_params"] for r in mine if r["trainable_params"] is not None})
            p = "–" if not params else (_params(params[0]) if len(params) == 1 else f"{_params(params[0])}–{_params(params[-1])}")
            tr = _mean([r["train_s"] for r in mine])
            inf = _mean([r["infer_s_per_volume"] for r in mine])
            lines.append("| " + " | ".join([f"`{m}`", *cells, p, _f(tr, 0), _f(inf, 4)]) + " |")
        lines += ["", "train s and infer s/vol: mean over the tasks in the row (per task below).", "",
                  "### Per cell", "",
                  "| method | task | seeds | AUC | AUC 95% CI | ACC | ACC 95% CI | ACC@0.5 | params | train s | infer s/vol | status |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in rows:
            ci_a = f"[{_f(r['auc_ci_lo'])}, {_f(r['auc_ci_hi'])}]" if r["auc_ci_lo"] is not None else "–"
            ci_c = f"[{_f(r['acc_ci_lo'])}, {_f(r['acc_ci_hi'])}]" if r["acc_ci_lo"] is not None else "–"
            lines.append(f"| `{r['method']}` | {r['task']} | {r['seeds'] or '–'} | {_pm(r['auc_mean'], r['auc_std'])} | {ci_a} "
                         f"| {_pm(r['acc_mean'], r['acc_std'])} | {ci_c} | {_f(r['acc05_mean'])} | {_params(r['trainable_params'])} "
                         f"| {_f(r['train_s'], 0)} | {_f(r['infer_s_per_volume'], 4)} | {r['status']} |")
        lines += ["", "Methods:", ""]
        for m in methods:
            lines.append(f"- `{m}`: {METHODS[m].description if m in METHODS else by[next(k for k in by if k[0] == m)]['description']}")
    else:
        lines.append("No cell has finished yet.")
    if quoted:
        lines += ["", "## Published reference numbers (quoted, NOT measured here)", "",
                  "| method | task | AUC | ACC | source |", "|---|---|---|---|---|"]
        for q in quoted:
            lines.append(f"| {q['method']} | {q['task']} | {_f(q['auc_mean'])} | {_f(q['acc_mean'])} | quoted: {q['citation']} |")
    lines.append("")
    return "\n".join(lines)


def command_line() -> str:
    return "anymc3d " + " ".join(shlex.quote(a) for a in sys.argv[1:])
