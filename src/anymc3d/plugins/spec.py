"""The JSON half of a plugin file: everything needed to rebuild and re-apply a trained plugin."""
from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field
from typing import Any

from .lora import LoraSpec

TASK_TYPES = ("binary", "multiclass", "multilabel")
#: in-plane flips a plugin may average at prediction: "w" (last axis), "h" (second-to-last), "hw" (both)
TEST_FLIPS = ("w", "h", "hw")
#: the most ensemble members one plugin may hold
MAX_ENSEMBLE = 16
#: what ``weights_fingerprint`` writes: a truncated sha256 of the frozen weights
FINGERPRINT_RE = re.compile(r"sha256:[0-9a-f]{16}")
SHA256_RE = re.compile(r"[0-9a-f]{64}")
REQUIRED_FIELDS = ("task", "task_type", "label_names", "inputs", "preprocess", "backbone", "backbone_fingerprint",
                   "input_size")


@dataclass
class PluginSpec:
    task: str
    task_type: str
    label_names: list[str]
    inputs: list[str]                       # image inputs (manifest image columns), e.g. ["image"] or ["t1", "t2"]
    preprocess: dict[str, dict[str, Any]]   # input -> PreprocessSpec.to_dict(); re-applied verbatim at prediction
    backbone: str
    backbone_fingerprint: str
    input_size: int
    lora: LoraSpec = field(default_factory=LoraSpec)
    head_dropout: float = 0.2
    #: slice-embedding normalisation before the task query (anymc3d.plugins.embed_norm); "none" in older files
    embed_norm: str = "none"
    #: test-time flips (anymc3d.runtime.engine.Runtime.forward): every prediction averages the probabilities of
    #: the slices as they are and flipped in-plane ("w": left-right, "h": up-down, "hw": both); [] in older files
    test_flips: list[str] = field(default_factory=list)
    #: members trained together on one (cached) trunk, each with its own LoRA, queries and head; a prediction
    #: is the mean of the members' probabilities (anymc3d.plugins.model); 1 in older files
    ensemble: int = 1
    threshold: float = 0.5
    training: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    version: str = ""
    format: str = "anymc3d-plugin/1"
    #: sha256 of plugin.safetensors, written by save_plugin and checked on loading ("" = not recorded)
    tensors_sha256: str = ""
    #: calibration, OOD reference and conformal settings (anymc3d.plugins.trust; tensors under "trust."
    #: in plugin.safetensors); None in files written before them
    trust: dict[str, Any] | None = None

    @classmethod
    def for_task(cls, data, specs: dict, on, **fields) -> "PluginSpec":
        """The one way a spec is built: ``data`` (a ``TaskData``: name, type, labels, inputs; None when
        ``fields`` give them), ``specs`` (input -> ``PreprocessSpec`` or its dict), ``on``: the backbone
        (name, fingerprint, input size; None when ``fields`` give them); ``fields``: every other field, and
        overrides of the task's (``task=``, ``inputs=``, ...)."""
        base: dict[str, Any] = {"preprocess": {k: v if isinstance(v, dict) else v.to_dict() for k, v in specs.items()}}
        if data is not None:
            base.update(task=data.name, task_type=data.task_type, label_names=list(data.label_names),
                        inputs=list(data.inputs))
        if on is not None:
            base.update(backbone=on.name, backbone_fingerprint=on.fingerprint, input_size=on.input_size)
        return cls(**{**base, **fields})

    def __post_init__(self) -> None:
        if self.task_type not in TASK_TYPES:
            raise ValueError(f"task_type must be one of {TASK_TYPES}, got {self.task_type!r}")
        if self.task_type == "binary" and len(self.label_names) != 2:
            raise ValueError("a binary task has exactly two label names (negative, positive)")
        from .embed_norm import EMBED_NORMS

        if self.embed_norm not in EMBED_NORMS:
            raise ValueError(f"embed_norm must be one of {EMBED_NORMS}, got {self.embed_norm!r}")
        if any(f not in TEST_FLIPS for f in self.test_flips) or len(set(self.test_flips)) != len(self.test_flips):
            raise ValueError(f"test_flips must be distinct items of {TEST_FLIPS}, got {self.test_flips!r}")
        if not (isinstance(self.ensemble, int) and 1 <= self.ensemble <= MAX_ENSEMBLE):
            raise ValueError(f"ensemble must be an integer in 1..{MAX_ENSEMBLE}, got {self.ensemble!r}")

    @property
    def streams(self) -> list[str]:
        """One stream per (input, view); each has its own LoRA adapter and task query."""
        return [f"{inp}:{view}" for inp in self.inputs for view in self.preprocess[inp]["views"]]

    @property
    def n_outputs(self) -> int:
        return 1 if self.task_type == "binary" else len(self.label_names)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["lora"] = self.lora.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "PluginSpec":
        """A spec read from a file: every field is type-checked first (``ValueError`` names the field)."""
        validate_spec_dict(d)
        d = dict(d)
        d["lora"] = LoraSpec.from_dict(d.get("lora", {}))
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in d.items() if k in known})


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v) -> bool:
    return (isinstance(v, (int, float)) and not isinstance(v, bool)) and math.isfinite(v)


def _str_list(d: dict, key: str) -> list[str]:
    v = d.get(key)
    if not isinstance(v, list) or not v or not all(isinstance(x, str) and x for x in v):
        raise ValueError(f"'{key}' must be a non-empty list of names, got {v!r:.80}")
    if len(set(v)) != len(v):
        raise ValueError(f"'{key}' has duplicate names: {v!r:.80}")
    return v


def validate_spec_dict(d: Any) -> None:
    """Check the JSON of a plugin spec field by field, so that a damaged or hand-edited ``plugin.json``
    is refused with the field's name at reading time instead of failing deep inside the model."""
    if not isinstance(d, dict):
        raise ValueError(f"expected a JSON object, got {type(d).__name__}")
    fmt = d.get("format", "anymc3d-plugin/1")
    if not isinstance(fmt, str) or not fmt.startswith("anymc3d-plugin/"):
        raise ValueError(f"unknown plugin format {fmt!r} (expected anymc3d-plugin/1)")
    missing = [k for k in REQUIRED_FIELDS if k not in d]
    if missing:
        raise ValueError(f"missing field(s) {', '.join(missing)}")
    for key in ("task", "backbone"):
        if not isinstance(d[key], str) or not d[key].strip():
            raise ValueError(f"'{key}' must be a non-empty string, got {d[key]!r:.80}")
    if d["task_type"] not in TASK_TYPES:
        raise ValueError(f"'task_type' must be one of {TASK_TYPES}, got {d['task_type']!r:.80}")
    labels = _str_list(d, "label_names")
    if d["task_type"] != "binary" and len(labels) < 2:
        raise ValueError(f"a {d['task_type']} task needs at least two label names, got {labels!r}")
    inputs = _str_list(d, "inputs")
    fp = d["backbone_fingerprint"]
    if not isinstance(fp, str) or not FINGERPRINT_RE.fullmatch(fp):
        raise ValueError(f"'backbone_fingerprint' must look like sha256:<16 hex digits>, got {fp!r:.80}")
    if not _is_int(d["input_size"]) or not 8 <= d["input_size"] <= 4096:
        raise ValueError(f"'input_size' must be an integer in 8..4096, got {d['input_size']!r:.80}")
    pre = d["preprocess"]
    if not isinstance(pre, dict) or set(pre) != set(inputs):
        raise ValueError(f"'preprocess' must have one entry per input {inputs}, got {list(pre) if isinstance(pre, dict) else pre!r:.80}")
    from ..preprocess.spec import PreprocessSpec

    for inp, p in pre.items():
        if not isinstance(p, dict):
            raise ValueError(f"'preprocess.{inp}' must be an object, got {p!r:.80}")
        try:
            PreprocessSpec.from_dict(p)
        except Exception as exc:  # ValueError/TypeError/KeyError from the preprocessing spec
            raise ValueError(f"'preprocess.{inp}': {' '.join(str(exc).split())[:200]}") from None
    lora = d.get("lora", {})
    if not isinstance(lora, dict) or set(lora) - {"r", "alpha", "dropout", "last_k"}:
        raise ValueError(f"'lora' must be an object with r, alpha, dropout, last_k, got {lora!r:.80}")
    if not _is_int(lora.get("r", 8)) or not 0 <= lora.get("r", 8) <= 1024:
        raise ValueError(f"'lora.r' must be an integer in 0..1024, got {lora.get('r')!r:.40}")
    for k in ("alpha", "dropout"):
        if k in lora and not _is_num(lora[k]):
            raise ValueError(f"'lora.{k}' must be a number, got {lora[k]!r:.40}")
    if not 0.0 <= float(lora.get("dropout", 0.0)) < 1.0:
        raise ValueError(f"'lora.dropout' must be in [0, 1), got {lora.get('dropout')!r:.40}")
    lk = lora.get("last_k")
    if lk is not None and (not _is_int(lk) or lk < 1):
        raise ValueError(f"'lora.last_k' must be a positive integer or null, got {lk!r:.40}")
    for k, lo, hi in (("head_dropout", 0.0, 1.0), ("threshold", 0.0, 1.0)):
        if k in d and (not _is_num(d[k]) or not lo <= d[k] <= hi):
            raise ValueError(f"'{k}' must be a number in [{lo}, {hi}], got {d[k]!r:.40}")
    if d.get("head_dropout", 0.0) >= 1.0:
        raise ValueError("'head_dropout' must be below 1")
    from .embed_norm import EMBED_NORMS

    if d.get("embed_norm", "none") not in EMBED_NORMS:
        raise ValueError(f"'embed_norm' must be one of {EMBED_NORMS}, got {d.get('embed_norm')!r:.40}")
    ens = d.get("ensemble", 1)
    if not _is_int(ens) or not 1 <= ens <= MAX_ENSEMBLE:
        raise ValueError(f"'ensemble' must be an integer in 1..{MAX_ENSEMBLE}, got {ens!r:.40}")
    flips = d.get("test_flips", [])
    if not isinstance(flips, list) or any(f not in TEST_FLIPS for f in flips) or len(set(flips)) != len(flips):
        raise ValueError(f"'test_flips' must be a list of distinct items of {TEST_FLIPS}, got {flips!r:.60}")
    if d.get("trust") is not None and not isinstance(d["trust"], dict):
        raise ValueError(f"'trust' must be an object or null, got {type(d['trust']).__name__}")
    for k in ("training", "metrics"):
        if k in d and not isinstance(d[k], dict):
            raise ValueError(f"'{k}' must be an object, got {type(d[k]).__name__}")
    sha = d.get("tensors_sha256", "")
    if not isinstance(sha, str) or (sha and not SHA256_RE.fullmatch(sha)):
        raise ValueError(f"'tensors_sha256' must be 64 hex digits, got {sha!r:.80}")
    if "version" in d and not isinstance(d["version"], str):
        raise ValueError(f"'version' must be a string, got {d['version']!r:.40}")
