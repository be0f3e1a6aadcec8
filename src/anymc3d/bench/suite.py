"""Benchmark suites: built-in names or a YAML file.

Built-in:

* ``medmnist3d:PATH.npz[,PATH2.npz]`` -- MedMNIST 3D files (28³ or 64³) with their official splits;
  MedMNIST's metric definitions (see :mod:`anymc3d.evaluation.metrics`).
* ``synthetic`` -- the generated lesion tasks (binary, small lesion, multi-class, multi-label,
  view-dependent, sequence-dependent), written once into ``DIR/data/``.

YAML (paths relative to the YAML file)::

    name: my-suite                 # optional (default: file stem)
    methods: [linear_probe, plugin_lastk1]   # optional default for --methods
    seeds: 1                       # optional default for --seeds
    options: {size: 64, epochs: 10}           # optional, general method options (CLI overrides)
    tasks:
      - name: liver                # unique; [A-Za-z0-9_.-]
        data: data/liver/manifest.csv         # a manifest CSV or a MedMNIST .npz
        image_columns: [image]     # optional manifest column roles (else task.json / defaults)
        label_columns: [label]
        mask_column: mask
        task_type: binary
        quoted: adrenalmnist3d     # optional key of published reference rows (bench.quoted.QUOTED)
      - name: lesion_small
        synthetic: {task: lesion_binary, n_cases: 160, seed: 0, knobs: {lesion_radius: 1.5, size: 32}}
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import InputError
from .quoted import QUOTED, quoted_key_for

_SUITE_KEYS = {"name", "methods", "seeds", "options", "tasks", "description"}
_TASK_KEYS = {"name", "data", "synthetic", "image_columns", "label_columns", "mask_column", "task_type", "quoted",
              "description"}
_SYN_KEYS = {"task", "n_cases", "seed", "knobs", "splits"}
_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")

#: The built-in synthetic suite: small enough for a CPU (32³ volumes, 160 cases, 60/20/20 split).
SYNTHETIC_TASKS: list[dict[str, Any]] = [
    {"name": "lesion_binary", "synthetic": {"task": "lesion_binary", "n_cases": 160, "knobs": {"size": 32}},
     "description": "binary: one liver lesion present or not (masks)"},
    {"name": "lesion_small", "synthetic": {"task": "lesion_binary", "n_cases": 160,
                                           "knobs": {"size": 32, "lesion_radius": 1.5}},
     "description": "binary, small lesion (radius 1.5 voxels)"},
    {"name": "lesion_location", "synthetic": {"task": "lesion_location", "n_cases": 150, "knobs": {"size": 32}},
     "description": "multi-class: liver / left kidney / right kidney"},
    {"name": "lesion_types", "synthetic": {"task": "lesion_types", "n_cases": 160, "knobs": {"size": 32}},
     "description": "multi-label: hypodense / hyperdense / calcified"},
    {"name": "elongated", "synthetic": {"task": "elongated", "n_cases": 160, "knobs": {"size": 32}},
     "description": "binary, view-dependent: lesion elongated along z (same disc in axial slices)"},
    {"name": "t2_only", "synthetic": {"task": "t2_only", "n_cases": 160, "knobs": {"size": 32}},
     "description": "binary, sequence-dependent: lesion visible in T2 only (inputs t1, t2)"},
]


@dataclass
class TaskEntry:
    name: str
    data: Path | None = None
    synthetic: dict | None = None
    data_kwargs: dict = field(default_factory=dict)
    quoted: str | None = None
    description: str = ""

    def to_dict(self) -> dict:
        return {"name": self.name, "data": str(self.data) if self.data else None, "synthetic": self.synthetic,
                "data_kwargs": self.data_kwargs, "quoted": self.quoted}


@dataclass
class Suite:
    name: str
    tasks: list[TaskEntry]
    methods: list[str] | None = None
    seeds: int | None = None
    options: dict = field(default_factory=dict)
    source: str = ""

    def task(self, name: str) -> TaskEntry:
        for t in self.tasks:
            if t.name == name:
                return t
        raise InputError(f"suite {self.name}: no task {name!r}; tasks: {', '.join(t.name for t in self.tasks)}")


def _err(where: str, msg: str) -> InputError:
    return InputError(f"{where}: {msg}")


def _task_entry(d: Any, i: int, base: Path, where: str) -> TaskEntry:
    at = f"{where}: tasks[{i}]"
    if not isinstance(d, dict):
        raise _err(at, f"expected a mapping with 'name' and 'data' or 'synthetic', got {type(d).__name__}")
    unknown = sorted(set(d) - _TASK_KEYS)
    if unknown:
        raise _err(at, f"unknown key(s) {unknown}; allowed: {', '.join(sorted(_TASK_KEYS))}")
    name = d.get("name")
    if not isinstance(name, str) or not _NAME.match(name):
        raise _err(at, f"'name' must be a non-empty string of letters, digits, '_', '.', '-' (got {name!r})")
    at = f"{where}: task '{name}'"
    has_data, has_syn = d.get("data") is not None, d.get("synthetic") is not None
    if has_data == has_syn:
        raise _err(at, "give exactly one of 'data' (a manifest CSV or MedMNIST .npz) or 'synthetic'")
    entry = TaskEntry(name=name, description=str(d.get("description", "")))
    if has_data:
        if not isinstance(d["data"], str):
            raise _err(at, f"'data' must be a path string, got {d['data']!r}")
        p = Path(d["data"]).expanduser()
        p = p if p.is_absolute() else (base / p)
        if not p.is_file():
            raise _err(at, f"data file not found: {p}")
        if p.suffix not in (".csv", ".npz"):
            raise _err(at, f"data must be a manifest .csv or a MedMNIST .npz, got {p.name}")
        entry.data = p
        for k in ("image_columns", "label_columns"):
            v = d.get(k)
            if v is not None:
                if isinstance(v, str):
                    v = [v]
                if not (isinstance(v, list) and v and all(isinstance(x, str) for x in v)):
                    raise _err(at, f"'{k}' must be a list of column names, got {d.get(k)!r}")
                entry.data_kwargs[k] = v
        if d.get("mask_column") is not None:
            entry.data_kwargs["mask_column"] = str(d["mask_column"])
        if d.get("task_type") is not None:
            if d["task_type"] not in ("binary", "multiclass", "multilabel"):
                raise _err(at, f"'task_type' must be binary, multiclass or multilabel, got {d['task_type']!r}")
            entry.data_kwargs["task_type"] = d["task_type"]
        if p.suffix == ".npz" and entry.data_kwargs:
            raise _err(at, "column options apply to manifests only, not to a MedMNIST .npz")
    else:
        syn = d["synthetic"]
        if not isinstance(syn, dict):
            raise _err(at, f"'synthetic' must be a mapping with 'task', got {syn!r}")
        unknown = sorted(set(syn) - _SYN_KEYS)
        if unknown:
            raise _err(at, f"synthetic: unknown key(s) {unknown}; allowed: {', '.join(sorted(_SYN_KEYS))}")
        from ..synthetic import TASKS, task_knobs

        if syn.get("task") not in TASKS:
            raise _err(at, f"synthetic.task must be one of {', '.join(sorted(TASKS))}, got {syn.get('task')!r}")
        n = syn.get("n_cases", 160)
        if not isinstance(n, int) or isinstance(n, bool) or n < 20:
            raise _err(at, f"synthetic.n_cases must be an integer >= 20, got {n!r}")
        knobs = syn.get("knobs") or {}
        if not isinstance(knobs, dict):
            raise _err(at, f"synthetic.knobs must be a mapping, got {knobs!r}")
        bad = sorted(set(knobs) - set(task_knobs(syn["task"])))
        if bad:
            raise _err(at, f"synthetic.knobs: unknown knob(s) {bad} for {syn['task']}; "
                           f"known: {', '.join(task_knobs(syn['task']))}")
        entry.synthetic = {"task": syn["task"], "n_cases": n, "seed": int(syn.get("seed", 0)), "knobs": knobs,
                           "splits": list(syn.get("splits", (0.6, 0.2, 0.2)))}
    q = d.get("quoted")
    if q is not None and q is not False:
        if q not in QUOTED:
            raise _err(at, f"quoted: unknown key {q!r}; known: {', '.join(QUOTED)}")
        entry.quoted = q
    elif q is None and entry.data is not None and entry.data.suffix == ".npz":
        entry.quoted = quoted_key_for(str(entry.data))
    return entry


def suite_from_dict(d: Any, base: Path, where: str, default_name: str) -> Suite:
    if not isinstance(d, dict):
        raise _err(where, "a suite file is a YAML mapping with a 'tasks' list")
    unknown = sorted(set(d) - _SUITE_KEYS)
    if unknown:
        raise _err(where, f"unknown key(s) {unknown}; allowed: {', '.join(sorted(_SUITE_KEYS))}")
    tasks = d.get("tasks")
    if not isinstance(tasks, list) or not tasks:
        raise _err(where, "'tasks' must be a non-empty list")
    entries = [_task_entry(t, i, base, where) for i, t in enumerate(tasks)]
    names = [e.name for e in entries]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise _err(where, f"duplicate task name(s) {dup}")
    methods = d.get("methods")
    if methods is not None:
        if isinstance(methods, str):
            methods = [m.strip() for m in methods.split(",") if m.strip()]
        if not (isinstance(methods, list) and all(isinstance(m, str) for m in methods)):
            raise _err(where, f"'methods' must be a list of method names, got {d.get('methods')!r}")
        from .methods import METHODS

        bad = [m for m in methods if m not in METHODS]
        if bad:
            raise _err(where, f"unknown method(s) {bad}; known: {', '.join(METHODS)}")
    seeds = d.get("seeds")
    if seeds is not None and (not isinstance(seeds, int) or isinstance(seeds, bool) or seeds < 1):
        raise _err(where, f"'seeds' must be a positive integer, got {seeds!r}")
    options = d.get("options") or {}
    if not isinstance(options, dict):
        raise _err(where, f"'options' must be a mapping, got {options!r}")
    from .methods import DEFAULT_OPTIONS

    bad = sorted(set(options) - set(DEFAULT_OPTIONS))
    if bad:
        raise _err(where, f"options: unknown option(s) {bad}; known: {', '.join(DEFAULT_OPTIONS)}")
    return Suite(name=str(d.get("name") or default_name), tasks=entries, methods=methods, seeds=seeds,
                 options=dict(options), source=where)


def _npz_side(path: Path) -> int:
    """The size tag of a MedMNIST 3D file: 64 when its ``train_images`` are 64³, else 28 (MedMNIST's
    two releases), read from the array header only (nothing is decompressed); 28 where the file
    cannot tell (loading reports the error)."""
    import zipfile

    from ..io.readers import read_npy_header

    try:
        with zipfile.ZipFile(path) as z, z.open("train_images.npy") as fh:
            shape = read_npy_header(fh)[0]
        return 64 if len(shape) == 4 and int(shape[-1]) == 64 else 28
    except (OSError, KeyError, ValueError, zipfile.BadZipFile):
        return 28


def load_suite(spec: str) -> Suite:
    """``medmnist3d:PATH[,PATH]``, ``synthetic``, or a path to a suite YAML."""
    if spec == "synthetic":
        return suite_from_dict({"name": "synthetic", "tasks": SYNTHETIC_TASKS}, Path("."), "synthetic", "synthetic")
    if spec.startswith("medmnist3d:"):
        paths = [p for p in spec.split(":", 1)[1].split(",") if p]
        if not paths:
            raise InputError("medmnist3d: give one or more .npz paths, e.g. medmnist3d:adrenalmnist3d.npz")
        tasks = []
        for p in paths:
            pp = Path(p).expanduser()
            if pp.suffix != ".npz":
                raise InputError(f"{p}: medmnist3d expects MedMNIST .npz files")
            stem = pp.stem.lower()
            name = stem if stem.rsplit("_", 1)[-1].isdigit() else f"{stem}_{_npz_side(pp)}"
            tasks.append({"name": name, "data": str(pp.resolve())})
        return suite_from_dict({"name": "medmnist3d", "tasks": tasks}, Path("."), spec, "medmnist3d")
    p = Path(spec).expanduser()
    if p.suffix.lower() not in (".yaml", ".yml", ".json"):
        raise InputError(f"{spec}: SUITE must be 'synthetic', 'medmnist3d:PATH.npz' or a suite .yaml file")
    if not p.is_file():
        raise InputError(f"{spec}: suite file not found")
    import yaml

    try:
        d = json.loads(p.read_text(encoding="utf-8")) if p.suffix.lower() == ".json" else yaml.safe_load(p.read_text(encoding="utf-8"))
    except (yaml.YAMLError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputError(f"{p}: not valid YAML ({str(exc).splitlines()[0]})") from exc
    return suite_from_dict(d, p.parent.resolve(), str(p), p.stem)


def materialise(entry: TaskEntry, data_dir: Path, log=print):
    """-> TaskData. Synthetic tasks are generated once into ``data_dir/<name>`` (reused when the recipe matches)."""
    from ..data import load_data

    if entry.data is not None:
        return load_data(entry.data, **entry.data_kwargs)
    from ..io import atomic_write
    from ..synthetic import make_task, write_task

    s = entry.synthetic
    folder = Path(data_dir) / entry.name
    stamp = folder / "bench_recipe.json"
    recipe = json.dumps(s, sort_keys=True)
    manifest = folder / "manifest.csv"
    if not (manifest.is_file() and stamp.is_file() and stamp.read_text() == recipe):
        log(f"  generating synthetic task {entry.name} ({s['task']}, {s['n_cases']} cases) -> {folder}")
        ds = make_task(s["task"], s["n_cases"], seed=s["seed"], **s["knobs"])
        write_task(ds, folder, splits=tuple(s["splits"]), seed=s["seed"])
        with atomic_write(stamp) as tmp:
            Path(tmp).write_text(recipe)
    task = load_data(manifest)
    task.name = entry.name
    return task
