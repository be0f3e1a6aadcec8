"""Rules for output folders: never overwrite a trained plugin by accident, never resume from nothing.

``anymc3d train --out DIR``:

* DIR holds a plugin (``plugin.json`` or ``plugin.safetensors``) or the ``checkpoint.pt`` of an
  unfinished run → refused unless ``--resume`` (continue that run) or ``--overwrite`` (train anew;
  the old files are replaced only when the new plugin is written);
* ``--resume`` needs ``DIR/checkpoint.pt`` (or a selection candidate's ``DIR/candidates/NAME/checkpoint.pt``); without it the run is refused, not started from scratch;
* ``--resume`` and ``--overwrite`` exclude each other;
* DIR must be a folder (or not exist yet).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Union

from anymc3d.errors import InputError

PLUGIN_FILES = ("plugin.json", "plugin.safetensors")
CHECKPOINT = "checkpoint.pt"


def check_output_folder(out: Union[str, Path], resume: bool = False, overwrite: bool = False) -> Path:
    """Raise :class:`InputError` when training into ``out`` would lose work or pretend to resume."""
    out = Path(out)
    if resume and overwrite:
        raise InputError(f"{out}: --resume continues the run in this folder and --overwrite starts a new one; give one")
    if out.exists() and not out.is_dir():
        raise InputError(f"{out}: exists and is not a folder (--out must be a folder)")
    parent = out if out.exists() else next((p for p in out.parents if p.exists()), Path("."))
    if parent.is_dir() and not os.access(parent, os.W_OK | os.X_OK):
        raise InputError(f"{parent}: not writable (output folder {out})")
    ckpts = [out / CHECKPOINT] + sorted(out.glob(f"candidates/*/{CHECKPOINT}"))  # a selection's (training.selection)
    ckpt = next((c for c in ckpts if c.is_file()), out / CHECKPOINT)
    if resume:
        if not ckpt.is_file():
            raise InputError(f"{ckpt}: --resume needs the checkpoint of an earlier run in this folder and there is "
                             f"none; train without --resume (or into the folder of the run to continue)")
        return out
    if overwrite or not out.is_dir():
        return out
    held = [n for n in PLUGIN_FILES if (out / n).exists()]
    if held:
        raise InputError(f"{out / held[0]}: the output folder already holds a plugin; use --overwrite to replace "
                         f"it, --resume to continue its training, or another --out")
    if ckpt.is_file():
        raise InputError(f"{ckpt}: the output folder holds the checkpoint of an unfinished run; use --resume to "
                         f"continue it, --overwrite to start again, or another --out")
    return out
