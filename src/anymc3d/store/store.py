"""A plugin store: one folder, one sub-folder per task, all tasks on one frozen backbone.

Layout::

    STORE/
      store.json              {"format": "anymc3d-store/1", "backbone": name, "backbone_fingerprint": sha}
      liver_lesion/           plugin.json + plugin.safetensors (+ metrics.json when it came with the plugin)
      adrenal/                ...

``store.json`` pins the backbone (name + weight fingerprint) of the first plugin added; ``add``
refuses a plugin trained on another backbone or other weights. A folder assembled by hand (no
``store.json``, or plugins copied in) is accepted too: flat ``NAME.json`` + ``NAME.safetensors``
pairs are listed as well, and at prediction time plugins that do not match the loaded backbone are
reported and skipped, never run.
"""
from __future__ import annotations

import json
import re
import shutil
import uuid
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import InputError
from ..io import write_json
from ..plugins.file import check_tensor_hash, plugin_paths, read_spec
from ..plugins.spec import PluginSpec

STORE_FORMAT = "anymc3d-store/1"
_NAME_RE = re.compile(r"[^A-Za-z0-9_.-]+")


def safe_name(text: str) -> str:
    name = _NAME_RE.sub("_", text.strip()).strip("._-")
    if not name:
        raise InputError(f"{text!r}: not usable as a plugin name (use letters, digits, _ . -)")
    return name


@dataclass
class StoreEntry:
    name: str
    path: Path                 # the plugin folder (or the .json of a flat pair)
    spec: PluginSpec | None    # None when the spec cannot be read
    error: str | None = None

    @property
    def backbone_key(self) -> tuple[str, str] | None:
        return (self.spec.backbone, self.spec.backbone_fingerprint) if self.spec else None


def tensor_summary(path: Path) -> dict[str, Any]:
    """Number of tensors and parameters of a plugin file, read from the safetensors header only."""
    from safetensors import safe_open

    _, tpath = plugin_paths(path)
    if not tpath.is_file():
        raise InputError(f"{tpath}: plugin tensors not found")
    try:
        n, total, lora, trust = 0, 0, 0, 0
        with safe_open(str(tpath), framework="pt") as fh:
            for k in fh.keys():
                numel = 1
                for s in fh.get_slice(k).get_shape():
                    numel *= int(s)
                n += 1
                fitted = k.startswith("norm.") or k.startswith("trust.")  # fitted statistics, not parameters
                total += 0 if fitted else numel
                lora += numel if k.startswith("lora.") else 0
                trust += numel if k.startswith("trust.") else 0
    except InputError:
        raise
    except Exception as exc:  # safetensors raises its own error types for truncated/invalid files
        raise InputError(f"{tpath}: cannot read plugin tensors ({str(exc).splitlines()[0][:200]})") from exc
    return {"tensors": n, "parameters": total, "lora_parameters": lora, "trust_values": trust,
            "trust_bytes": 4 * trust, "bytes": tpath.stat().st_size}


class PluginStore:
    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    # ---- store metadata -----------------------------------------------------------------------
    @property
    def meta_path(self) -> Path:
        return self.root / "store.json"

    def meta(self) -> dict[str, Any]:
        if not self.meta_path.is_file():
            return {}
        try:
            d = json.loads(self.meta_path.read_text())
        except json.JSONDecodeError as exc:
            raise InputError(f"{self.meta_path}: not valid JSON ({exc})") from exc
        if not isinstance(d, dict) or d.get("format") != STORE_FORMAT:
            fmt = d.get("format") if isinstance(d, dict) else type(d).__name__
            raise InputError(f"{self.meta_path}: unknown store format {fmt!r} (expected {STORE_FORMAT})")
        if d.get("backbone") is not None:
            from ..backbones import list_backbones
            from ..plugins.spec import FINGERPRINT_RE

            if d["backbone"] not in list_backbones():
                raise InputError(f"{self.meta_path}: names backbone {d['backbone']!r}, which is not a registered "
                                 f"backbone (available: {', '.join(list_backbones())})")
            fp = d.get("backbone_fingerprint")
            if not isinstance(fp, str) or not FINGERPRINT_RE.fullmatch(fp):
                raise InputError(f"{self.meta_path}: 'backbone_fingerprint' must look like sha256:<16 hex digits>, "
                                 f"got {fp!r:.60}")
        return d

    def _write_meta(self, d: dict[str, Any]) -> None:
        write_json({"format": STORE_FORMAT, **d}, self.meta_path)

    def pinned_backbone(self) -> tuple[str, str] | None:
        m = self.meta()
        return (m["backbone"], m["backbone_fingerprint"]) if m.get("backbone") else None

    # ---- listing ------------------------------------------------------------------------------
    def entries(self) -> list[StoreEntry]:
        if not self.root.is_dir():
            raise InputError(f"{self.root}: plugin store folder not found")
        out = []
        for p in sorted(self.root.iterdir()):
            if p.name.startswith("."):
                continue
            if p.is_dir() and (p / "plugin.json").is_file():
                out.append(self._entry(p.name, p))
            elif p.is_file() and p.suffix == ".json" and p.name != "store.json" and p.with_suffix(".safetensors").is_file():
                out.append(self._entry(p.stem, p))
        return out

    @staticmethod
    def _entry(name: str, path: Path) -> StoreEntry:
        """A broken entry (spec unreadable or invalid, unknown backbone, tensors missing or unreadable)
        has ``spec=None`` and the reason in ``error``: listed as UNREADABLE, skipped by predict."""
        try:
            spec = read_spec(path)
            tensor_summary(path)
            jpath, tpath = plugin_paths(path)
            check_tensor_hash(spec, jpath, tpath)
            return StoreEntry(name, path, spec)
        except InputError as exc:
            return StoreEntry(name, path, None, str(exc))

    def get(self, name: str) -> StoreEntry:
        for e in self.entries():
            if e.name == name:
                return e
        names = ", ".join(e.name for e in self.entries()) or "none"
        raise InputError(f"{self.root}: no plugin named '{name}' (plugins: {names})")

    def target_backbone(self) -> tuple[str, str] | None:
        """The backbone the store is for: the pinned one, else the one most plugins were trained on."""
        pinned = self.pinned_backbone()
        if pinned:
            return pinned
        counts = Counter(e.backbone_key for e in self.entries() if e.spec is not None)
        if not counts:
            return None
        return sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[0][0]

    # ---- info ---------------------------------------------------------------------------------
    def info(self, name: str) -> dict[str, Any]:
        e = self.get(name)
        if e.spec is None:
            return {"name": e.name, "path": str(e.path), "error": e.error}
        return describe(e.name, e.path, e.spec, self.target_backbone())

    # ---- add / remove -------------------------------------------------------------------------
    def add(self, source: str | Path, name: str | None = None, replace: bool = False,
            weights: str | None = None) -> StoreEntry:
        """Copy a trained plugin into the store (atomically), after checking it end to end.

        The spec must be valid and name a registered backbone; the tensors are loaded (safetensors)
        and must fit the spec exactly (built on a randomly initialised backbone of that architecture);
        the backbone fingerprint must equal the store's. The first plugin of an empty store pins it, so
        its fingerprint is verified against real weights: ``weights`` (a file), else the backbone's
        default weights or its ``random`` initialisation. Nothing is copied when a check fails.
        """
        jpath, tpath = plugin_paths(source)
        if not self.root.exists() and self.root.parent.exists() and not self.root.parent.is_dir():
            raise InputError(f"{self.root}: the store's parent is not a folder")
        spec = read_spec(source)
        if not tpath.is_file():
            raise InputError(f"{tpath}: plugin tensors not found")
        name = safe_name(name or spec.task)
        pinned = self.target_backbone() if self.root.is_dir() else None
        if pinned and (spec.backbone, spec.backbone_fingerprint) != pinned:
            raise InputError(
                f"{jpath}: refused: plugin was trained on {spec.backbone} ({spec.backbone_fingerprint}) but the store "
                f"{self.root} holds plugins for {pinned[0]} ({pinned[1]}); one store = one backbone (use another --store)")
        random_fp = check_tensors_fit(spec, jpath, tpath)
        if pinned is None:
            verify_fingerprint(spec, jpath, weights, random_fp)
        dest = self.root / name
        if dest.exists() and not replace:
            raise InputError(f"{dest}: a plugin named '{name}' is already in the store (use --name or --replace)")
        self.root.mkdir(parents=True, exist_ok=True)
        staging = self.root / f".tmp-{uuid.uuid4().hex[:12]}-{name}"
        try:
            staging.mkdir()
            shutil.copyfile(jpath, staging / "plugin.json")
            shutil.copyfile(tpath, staging / "plugin.safetensors")
            metrics = jpath.parent / "metrics.json"
            if jpath.name == "plugin.json" and metrics.is_file():
                shutil.copyfile(metrics, staging / "metrics.json")
            if dest.exists():
                old = self.root / f".tmp-{uuid.uuid4().hex[:12]}-old-{name}"
                dest.rename(old)
                staging.rename(dest)
                shutil.rmtree(old, ignore_errors=True)
            else:
                staging.rename(dest)
        finally:
            if staging.exists():
                shutil.rmtree(staging, ignore_errors=True)
        if self.pinned_backbone() is None:
            bb, fp = pinned or (spec.backbone, spec.backbone_fingerprint)
            self._write_meta({"backbone": bb, "backbone_fingerprint": fp})
        return self._entry(name, dest)

    def remove(self, name: str) -> Path:
        e = self.get(name)
        if e.path.is_dir():
            shutil.rmtree(e.path)
        else:
            for p in plugin_paths(e.path):
                p.unlink(missing_ok=True)
        if not self.entries() and self.meta_path.is_file():
            self.meta_path.unlink()  # an empty store is no longer tied to a backbone
        return e.path


def check_tensors_fit(spec: PluginSpec, jpath: Path, tpath: Path) -> str:
    """Load the plugin's tensors and check that they are exactly what the spec builds (names and shapes),
    on a randomly initialised backbone of the spec's architecture. Returns that backbone's fingerprint."""
    from ..backbones import create_backbone
    from ..plugins.file import check_tensor_hash, load_tensors
    from ..plugins.model import AnyMC3D

    state = load_tensors(tpath)
    state = {k: v for k, v in state.items() if not k.startswith("trust.")}  # calibration / OOD reference (plugins.trust)
    bb = create_backbone(spec.backbone, weights="random", input_size=spec.input_size)
    try:
        model = AnyMC3D(bb, spec, adapter_prefix="check_")
    except (ValueError, KeyError, IndexError, TypeError) as exc:
        raise InputError(f"{jpath}: refused: the spec cannot be built on {spec.backbone} "
                         f"({' '.join(str(exc).split())[:200]})") from exc
    try:
        model.load_trainable_state(state)
    except KeyError as exc:
        raise InputError(f"{tpath}: refused: {exc.args[0]}") from exc
    check_tensor_hash(spec, jpath, tpath)
    return bb.fingerprint


def verify_fingerprint(spec: PluginSpec, jpath: Path, weights: str | None, random_fp: str | None = None) -> None:
    """The fingerprint that would pin a store must be the one of real weights (see :meth:`PluginStore.add`)."""
    from ..backbones import create_backbone

    fp = spec.backbone_fingerprint
    if weights is not None and weights != "random":
        actual = create_backbone(spec.backbone, weights=weights, input_size=spec.input_size).fingerprint
        if actual != fp:
            raise InputError(f"{jpath}: refused: backbone fingerprint {fp} is not that of {weights} ({actual}); "
                             f"the plugin was trained on other weights")
        return
    if random_fp is None or weights == "random":
        random_fp = create_backbone(spec.backbone, weights="random", input_size=spec.input_size).fingerprint
    if fp == random_fp:
        return
    if weights == "random":
        raise InputError(f"{jpath}: refused: backbone fingerprint {fp} is not that of randomly initialised "
                         f"{spec.backbone} ({random_fp})")
    try:
        default = create_backbone(spec.backbone, weights=None, input_size=spec.input_size)
    except InputError as exc:
        raise InputError(f"{jpath}: refused: cannot verify backbone fingerprint {fp}: the default weights of "
                         f"{spec.backbone} are not available here ({' '.join(str(exc).split())[:160]}); give the "
                         f"weights file with --weights PATH") from exc
    if default.fingerprint != fp:
        raise InputError(f"{jpath}: refused: backbone fingerprint {fp} is neither that of {spec.backbone}'s default "
                         f"weights ({default.fingerprint}, {default.weights_source}) nor of its random initialisation "
                         f"({random_fp}); if the plugin was trained on a local weights file, give it with --weights PATH")


def trust_info(spec: PluginSpec) -> dict[str, Any]:
    from ..plugins.trust import info

    return info(spec)


def describe(name: str, path: Path, spec: PluginSpec, target: tuple[str, str] | None = None) -> dict[str, Any]:
    """Everything ``plugins info`` shows: task, labels, views, parameters, backbone, fingerprint, metrics."""
    try:
        tensors = tensor_summary(path)
    except InputError as exc:
        tensors = {"error": str(exc)}
    pre = {inp: {k: v for k, v in d.items() if k != "schema"} for inp, d in spec.preprocess.items()}
    compatible = None if target is None else (spec.backbone, spec.backbone_fingerprint) == tuple(target)
    tr = spec.training or {}
    return {
        "name": name, "path": str(path), "task": spec.task, "task_type": spec.task_type,
        "labels": list(spec.label_names), "inputs": list(spec.inputs), "streams": spec.streams,
        "views": sorted({s.split(":")[1] for s in spec.streams}),
        "parameters": tensors.get("parameters", tr.get("trainable_params")), "tensors": tensors,
        "lora": spec.lora.to_dict(),
        "mode": ("pooling-only (frozen backbone)" if spec.lora.r == 0 else
                 f"shared trunk (LoRA in the last {spec.lora.last_k} blocks)" if spec.lora.last_k else "full-depth LoRA"),
        "backbone": spec.backbone, "backbone_fingerprint": spec.backbone_fingerprint, "input_size": spec.input_size,
        "compatible_with_store_backbone": compatible,
        "threshold": spec.threshold, "preprocess": pre, "metrics": spec.metrics,
        "training": {k: tr[k] for k in ("data", "epochs_run", "best_epoch", "train_wall_s", "n_train", "train_fraction")
                     if k in tr},
        "version": spec.version,
        "trust": trust_info(spec),
    }
