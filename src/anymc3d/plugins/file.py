"""Plugin file = ``plugin.safetensors`` (LoRA, queries, head) + ``plugin.json`` (PluginSpec).

Tensors go through safetensors (no pickle); both files are written atomically. Loading checks
the backbone fingerprint so a plugin never runs silently on other weights than it was trained on.
"""
from __future__ import annotations

import json
from pathlib import Path

from safetensors.torch import load_file, save_file

from ..backbones import Backbone, create_backbone
from ..errors import InputError
from ..io import atomic_write
from .spec import PluginSpec


def plugin_paths(path: str | Path) -> tuple[Path, Path]:
    """Accept the folder, the .json or the .safetensors; return (json, safetensors)."""
    p = Path(path)
    if p.is_dir():
        return p / "plugin.json", p / "plugin.safetensors"
    if p.suffix == ".safetensors":
        return p.with_suffix(".json"), p
    return p.with_suffix(".json"), p.with_suffix(".safetensors")


def save_plugin(model, out: str | Path) -> tuple[Path, Path]:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    jpath, tpath = out / "plugin.json", out / "plugin.safetensors"
    state = {k: v.detach().to("cpu").contiguous().float() for k, v in model.trainable_state().items()}
    with atomic_write(tpath) as tmp:
        save_file(state, str(tmp), metadata={"format": model.spec.format, "task": model.spec.task})
    with atomic_write(jpath) as tmp:
        Path(tmp).write_text(json.dumps(model.spec.to_dict(), indent=2))
    return jpath, tpath


def read_spec(path: str | Path) -> PluginSpec:
    jpath, _ = plugin_paths(path)
    if not jpath.is_file():
        raise InputError(f"{jpath}: plugin spec not found (a plugin is plugin.json + plugin.safetensors)")
    try:
        return PluginSpec.from_dict(json.loads(jpath.read_text()))
    except (json.JSONDecodeError, TypeError, ValueError, KeyError) as exc:
        raise InputError(f"{jpath}: not a valid plugin spec ({exc})") from exc


def check_fingerprint(spec: PluginSpec, backbone: Backbone, where: str) -> None:
    if spec.backbone != backbone.name or spec.backbone_fingerprint != backbone.fingerprint:
        raise InputError(
            f"{where}: plugin was trained on {spec.backbone} ({spec.backbone_fingerprint}) but the loaded backbone is "
            f"{backbone.name} ({backbone.fingerprint}, weights {backbone.weights_source}); load the same weights file")


def load_plugin(path: str | Path, backbone: Backbone | None = None, weights: str | None = None,
                adapter_prefix: str = "p0_"):
    """Rebuild a trained plugin on ``backbone`` (created from the spec if not given)."""
    from ..model import AnyMC3D

    jpath, tpath = plugin_paths(path)
    spec = read_spec(path)
    if not tpath.is_file():
        raise InputError(f"{tpath}: plugin tensors not found")
    try:
        state = load_file(str(tpath))
    except Exception as exc:
        raise InputError(f"{tpath}: cannot read plugin tensors ({str(exc).splitlines()[0][:200]})") from exc
    if backbone is None:
        backbone = create_backbone(spec.backbone, weights=weights, input_size=spec.input_size)
    check_fingerprint(spec, backbone, str(jpath))
    model = AnyMC3D(backbone, spec, adapter_prefix=adapter_prefix)
    try:
        model.load_trainable_state(state)
    except KeyError as exc:
        raise InputError(f"{tpath}: {exc.args[0]}") from exc
    model.eval()
    return model
