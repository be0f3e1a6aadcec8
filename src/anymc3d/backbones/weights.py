"""Safe loading of local weight files: safetensors, or torch files with ``weights_only=True`` (never unpickle)."""
from __future__ import annotations

import os
from pathlib import Path

import torch

from ..errors import InputError


def weights_search_dirs() -> list[Path]:
    """Where a backbone looks for ``<name>.safetensors`` / ``<name>.pth`` when no path is given."""
    dirs = []
    if os.environ.get("ANYMC3D_WEIGHTS_DIR"):
        dirs.append(Path(os.environ["ANYMC3D_WEIGHTS_DIR"]))
    dirs.append(Path.home() / ".cache" / "anymc3d" / "weights")
    return dirs


def find_weights(name: str, hint: str) -> Path:
    for d in weights_search_dirs():
        for ext in (".safetensors", ".pth", ".pt", ".bin"):
            p = d / f"{name}{ext}"
            if p.is_file():
                return p
    where = " or ".join(str(d / f"{name}.pth") for d in weights_search_dirs())
    raise InputError(f"{name}: no weights file given and none found; this backbone needs {hint}. "
                     f"Pass --weights PATH, or place it at {where} (safetensors also accepted)")


def load_state_dict_file(path: Path, name: str) -> dict[str, torch.Tensor]:
    """Read a flat tensor dict; unwraps common containers ('model', 'state_dict', 'teacher')."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: weights file for {name} not found")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file
            state = load_file(str(path))
        else:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # corrupt, truncated, or a pickle with arbitrary objects
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise InputError(f"{path}: cannot read weights for {name} ({msg[:200]})") from exc
    for key in ("teacher", "model_ema", "model", "state_dict", "module"):
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise InputError(f"{path}: not a tensor state dict (weights for {name})")
    prefixes = ("backbone.", "module.", "encoder.")
    for p in prefixes:
        if all(k.startswith(p) for k in state):
            state = {k[len(p):]: v for k, v in state.items()}
    return state
