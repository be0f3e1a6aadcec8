"""Plugin file = ``plugin.safetensors`` (LoRA, queries, head, embedding-norm statistics) + ``plugin.json`` (PluginSpec).

Tensors go through safetensors (no pickle); both files are written atomically. Loading checks
the backbone fingerprint so a plugin never runs silently on other weights than it was trained on.
"""
from __future__ import annotations

import json
from pathlib import Path

from safetensors.torch import load_file, save_file

from ..backbones import Backbone, create_backbone, list_backbones
from ..errors import InputError
from ..io import atomic_write, write_json
from .spec import PluginSpec


def plugin_paths(path: str | Path) -> tuple[Path, Path]:
    """Accept the folder, the .json or the .safetensors; return (json, safetensors)."""
    p = Path(path)
    if p.is_dir():
        return p / "plugin.json", p / "plugin.safetensors"
    if p.suffix == ".safetensors":
        return p.with_suffix(".json"), p
    if p.suffix != ".json" and not p.exists() and not p.with_suffix(".json").exists():
        raise InputError(f"{p}: plugin spec not found: no such plugin folder (a plugin is a folder with "
                         f"plugin.json + plugin.safetensors)")
    return p.with_suffix(".json"), p.with_suffix(".safetensors")


def save_plugin(model, out: str | Path) -> tuple[Path, Path]:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    jpath, tpath = out / "plugin.json", out / "plugin.safetensors"
    state = {k: v.detach().to("cpu").contiguous().float() for k, v in model.trainable_state().items()}
    trust = getattr(model, "trust", None)  # calibration / OOD reference / conformal scores (anymc3d.plugins.trust)
    if trust is not None:
        state.update(trust.tensors())
        model.spec.trust = trust.spec_dict()
    with atomic_write(tpath) as tmp:
        save_file(state, str(tmp), metadata={"format": model.spec.format, "task": model.spec.task})
        model.spec.tensors_sha256 = file_sha256(tmp)  # plugin.json vouches for exactly these tensors
    write_json(model.spec.to_dict(), jpath)
    return jpath, tpath


def read_spec(path: str | Path) -> PluginSpec:
    jpath, _ = plugin_paths(path)
    if not jpath.is_file():
        raise InputError(f"{jpath}: plugin spec not found (a plugin is plugin.json + plugin.safetensors)")
    try:
        spec = PluginSpec.from_dict(json.loads(jpath.read_text()))
    except (OSError, RecursionError, TypeError, ValueError, KeyError) as exc:  # JSONDecodeError, UnicodeDecodeError
        raise InputError(f"{jpath}: not a valid plugin spec ({' '.join(str(exc).split())[:300]})") from exc
    known = list_backbones()
    if spec.backbone not in known:
        raise InputError(f"{jpath}: names backbone '{spec.backbone}', which is not a registered backbone "
                         f"(available: {', '.join(known)})")
    return spec


def file_sha256(path: str | Path) -> str:
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def check_tensor_hash(spec: PluginSpec, jpath: Path, tpath: Path) -> None:
    """plugin.safetensors must be the file that plugin.json was written with (when the spec records its hash)."""
    if not spec.tensors_sha256:
        return  # written before hashes were recorded
    actual = file_sha256(tpath)
    if actual != spec.tensors_sha256:
        raise InputError(f"{tpath}: does not match {jpath.name} (sha256 {actual[:16]}..., {jpath.name} records "
                         f"{spec.tensors_sha256[:16]}...): the tensors were changed or damaged after training; "
                         f"restore the plugin folder as it was written")


def _short(exc: BaseException) -> str:
    return " ".join(f"{type(exc).__name__}: {exc}".split())[:200]


def load_tensors(tpath: Path) -> dict:
    """All tensors of a plugin file (safetensors: never unpickled), each a finite floating-point tensor."""
    import torch

    try:
        state = load_file(str(tpath))
    except Exception as exc:  # safetensors' own error types for truncated/invalid files
        text = (str(exc).splitlines() or [type(exc).__name__])[0][:200]
        raise InputError(f"{tpath}: cannot read plugin tensors ({text})") from exc
    for k, v in state.items():
        if not v.is_floating_point():
            raise InputError(f"{tpath}: plugin tensor {k} has dtype {v.dtype}; plugin tensors are floating point")
        if not bool(torch.isfinite(v).all()):
            raise InputError(f"{tpath}: plugin tensor {k} holds NaN or Inf values")
    return state


def check_fingerprint(spec: PluginSpec, backbone: Backbone, where: str) -> None:
    if spec.backbone != backbone.name or spec.backbone_fingerprint != backbone.fingerprint:
        raise InputError(
            f"{where}: plugin was trained on {spec.backbone} ({spec.backbone_fingerprint}) but the loaded backbone is "
            f"{backbone.name} ({backbone.fingerprint}, weights {backbone.weights_source}); load the same weights file")


def load_plugin(path: str | Path, backbone: Backbone | None = None, weights: str | None = None,
                adapter_prefix: str = "p0_"):
    """Rebuild a trained plugin on ``backbone`` (created from the spec if not given)."""
    from .model import AnyMC3D

    jpath, tpath = plugin_paths(path)
    spec = read_spec(path)
    if not tpath.is_file():
        raise InputError(f"{tpath}: plugin tensors not found")
    state = load_tensors(tpath)
    from .trust import PREFIX as TRUST_PREFIX

    trust_tensors = {k: state.pop(k) for k in list(state) if k.startswith(TRUST_PREFIX)}
    if backbone is None:
        try:
            backbone = create_backbone(spec.backbone, weights=weights, input_size=spec.input_size)
        except InputError as exc:
            raise InputError(f"{jpath}: cannot load its backbone {spec.backbone}: {exc}") from exc
    check_fingerprint(spec, backbone, str(jpath))
    try:
        model = AnyMC3D(backbone, spec, adapter_prefix=adapter_prefix)
    except (ValueError, KeyError, IndexError, TypeError) as exc:  # a spec that the checks let through but cannot be built
        raise InputError(f"{jpath}: the spec cannot be built on {spec.backbone} ({_short(exc)})") from exc
    try:
        model.load_trainable_state(state)
    except KeyError as exc:
        raise InputError(f"{tpath}: {exc.args[0]}") from exc
    check_tensor_hash(spec, jpath, tpath)  # last: a file that parses and fits the spec, but not the one trained
    from .trust import Trust

    model.trust = Trust.from_file(spec, trust_tensors)  # None for a plugin written before it was stored
    model.eval()
    return model
