"""Which engine runs a frozen pass: ``--engine auto|torch|onnxruntime|openvino``.

The choice is process-wide (one CLI run = one ``--engine``; :func:`set_engine`, or
:func:`using_engine` for a block); Python callers that never set it get ``torch`` (eager, exactly
as before). :func:`frozen_runner` gives the :class:`~.base.Runner` for one backbone, cut point and
slice shape, built once per process (graphs come from the export cache):

* ``torch``: PyTorch eager (None is returned: the caller keeps its own torch path);
* ``onnxruntime`` / ``openvino``: that engine, when installed and when its output on the first
  slices equals the fp32 torch path within the tolerance; otherwise torch, with a one-line note;
* ``auto``: every installed engine that passes the same check, timed on the first slices against
  the caller's own torch path (its autocast setting included); the fastest wins (a one-line note
  gives the slices/s of each).

Engines run only on the CPU; on a CUDA / MPS device the torch path is used.
"""
from __future__ import annotations

import contextlib
import sys
import time
from typing import Callable

import torch

from .base import EngineUnavailable, FrozenPass, Runner
from .export_cache import ExportCache
from .onnxruntime import OnnxRuntimeEngine
from .openvino import OpenVinoEngine
from .torch import TorchEngine

ENGINES = {e.name: e for e in (TorchEngine(), OnnxRuntimeEngine(), OpenVinoEngine())}
ENGINE_CHOICES = ("auto", *ENGINES)
INSTALL_HINT = 'pip install "anymc3d[cpu]"'
#: an engine whose output differs from the fp32 torch path by more than this (relative to the output's
#: largest magnitude, at least 1) on the first slices is not used
TOLERANCE = 1e-3
#: slices the checks and the ``auto`` timing run on
PROBE_SLICES = 8

_engine = "torch"
_runners: dict[tuple, tuple[Runner | None, str]] = {}
_notes_shown: set[str] = set()
notes: list[str] = []  # every note of this process, in order (tests read it)


def available_engines() -> list[str]:
    return [n for n, e in ENGINES.items() if e.available()]


def set_engine(name: str) -> str:
    """Set the process's engine; returns the previous one."""
    global _engine
    if name not in ENGINE_CHOICES:
        raise ValueError(f"engine must be one of {', '.join(ENGINE_CHOICES)}, got {name!r}")
    previous, _engine = _engine, name
    return previous


def current_engine() -> str:
    return _engine


@contextlib.contextmanager
def using_engine(name: str | None):
    """Within: ``name`` is the process's engine (None: unchanged)."""
    if name is None:
        yield
        return
    previous = set_engine(name)
    try:
        yield
    finally:
        set_engine(previous)


def with_engine_args(handler, args):
    """``handler`` run with ``args.engine`` (``--engine``) as the process's engine, restored afterwards."""
    def run(a=args):
        with using_engine(getattr(a, "engine", None)):
            return handler(a)
    return run


def note(text: str) -> None:
    """One line on stderr (once per process per text)."""
    notes.append(text)
    if text not in _notes_shown:
        _notes_shown.add(text)
        print(f"anymc3d: note: {text}", file=sys.stderr)


def clear() -> None:
    """Forget the runners built in this process (tests; after a backbone's weights changed in place)."""
    _runners.clear()
    _notes_shown.clear()
    notes.clear()


def export_material(backbone, cut: str, shape: tuple[int, ...]) -> dict:
    """What an exported graph depends on (the export cache's key): backbone, weights, cut, slice shape, torch."""
    return {"backbone": backbone.name, "fingerprint": backbone.fingerprint, "cut": cut, "channels": int(shape[0]),
            "size": [int(s) for s in shape[1:]], "torch": torch.__version__}


def _seconds(fn: Callable, x: torch.Tensor, repeats: int = 2) -> float:
    fn(x)  # warm-up (first-call allocation, lazy kernels)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn(x)
        best = min(best, time.perf_counter() - t0)
    return best


def _differs(a: torch.Tensor, ref: torch.Tensor) -> float:
    """Largest |a - ref| relative to max(1, max |ref|)."""
    if a.shape != ref.shape:
        return float("inf")
    return float((a.float() - ref.float()).abs().max()) / max(1.0, float(ref.float().abs().max()))


@contextlib.contextmanager
def adapters_off(model):
    """Within: every LoRA layer of ``model`` is off (the frozen pass); on leaving, each is as it was
    (the caller's active adapter, e.g. a stream's in ``embed_slices``, stays active)."""
    try:
        from peft.tuners.tuners_utils import BaseTunerLayer
    except ImportError:  # pragma: no cover - peft is a dependency
        yield
        return
    layers = [m for m in model.modules() if isinstance(m, BaseTunerLayer)]
    saved = [m._disable_adapters for m in layers]
    for m in layers:
        m._disable_adapters = True
    try:
        yield
    finally:
        for m, s in zip(layers, saved):
            m._disable_adapters = s


def build_runner(name: str, backbone, cut: str, example: torch.Tensor, threads: int | None = None,
                 cache: ExportCache | str | None = None) -> Runner:
    """The runner of engine ``name`` for ``backbone`` at ``cut`` (EngineUnavailable when not installed).
    No checks, no memo: :func:`frozen_runner` is the one the runtime uses."""
    engine = ENGINES[name]
    if not engine.available():
        raise EngineUnavailable(f"engine {name} is not installed ({INSTALL_HINT})")
    frozen = FrozenPass(backbone, cut).eval()
    threads = int(threads or torch.get_num_threads())
    example = example[:PROBE_SLICES].detach().to("cpu", torch.float32).contiguous()
    if name == "torch":
        run = engine.build(frozen, example, None, threads)
        fn = run.fn

        def off(x):
            with adapters_off(backbone.model):
                return fn(x)
        run.fn = off
        return run
    cache = cache if isinstance(cache, ExportCache) else ExportCache(cache)
    with adapters_off(backbone.model):  # the exported graph never carries an adapter
        return engine.build(frozen, example, cache, threads, export_material(backbone, cut, tuple(example.shape[1:])))


def frozen_runner(backbone, cut: str, x: torch.Tensor, engine: str | None = None,
                  torch_path: Callable[[torch.Tensor], torch.Tensor] | None = None,
                  cache: ExportCache | str | None = None, announce: bool = True) -> Runner | None:
    """The runner for slices like ``x`` (N, C, H, W), or None: use the caller's torch path.

    ``engine``: a name of :data:`ENGINE_CHOICES` (None: the process's). ``torch_path``: the caller's own
    torch computation of the same output (timed by ``auto``; default: eager fp32). ``announce=False``:
    the choice is recorded in :data:`notes` but not printed (an optional speed-up whose fallback is the
    caller's own working path, e.g. the merged slice network at prediction)."""
    say = note if announce else notes.append
    name = engine or _engine
    if name == "torch":
        return None
    if x.device.type != "cpu":
        return None  # engines are CPU engines; CUDA / MPS keep torch
    threads = torch.get_num_threads()
    memo = (id(backbone), backbone.fingerprint, cut, tuple(x.shape[1:]), name, threads)
    if memo in _runners:
        return _runners[memo][0]
    probe = x[:PROBE_SLICES].detach().float()
    # the reference is eager fp32 even when the caller runs under bf16 autocast (prediction does)
    with torch.no_grad(), adapters_off(backbone.model), torch.autocast("cpu", enabled=False):
        ref = FrozenPass(backbone, cut).eval()(probe).float()
    candidates = [n for n in ENGINES if n != "torch"] if name == "auto" else [name]
    built: dict[str, Runner] = {}
    for n in candidates:
        if not ENGINES[n].available():
            if name != "auto":
                say(f"engine {n} is not installed ({INSTALL_HINT}); using torch")
            continue
        try:
            with torch.autocast("cpu", enabled=False):  # the export traces the fp32 graph
                r = build_runner(n, backbone, cut, probe, threads, cache)
                diff = _differs(r(probe), ref)
        except Exception as exc:  # an export the engine cannot take: torch does the work
            say(f"engine {n} could not run {backbone.name} at {cut} ({type(exc).__name__}: "
                 f"{str(exc).splitlines()[0][:100] if str(exc) else ''}); using torch")
            continue
        if diff > TOLERANCE:
            say(f"engine {n} differs from torch by {diff:.1e} on {backbone.name} at {cut} (> {TOLERANCE}); using torch")
            continue
        built[n] = r
    chosen: Runner | None = None
    if name != "auto":
        chosen = built.get(name)
    elif not built:
        installed = any(ENGINES[n].available() for n in candidates)
        say("engine auto: " + ("no other engine passed its check against torch" if installed else
                                f"no other engine installed ({INSTALL_HINT})") + "; using torch")
    else:
        if torch_path is None:
            torch_path = build_runner("torch", backbone, cut, probe, threads)
        n = probe.shape[0]
        rates = {"torch": n / _seconds(torch.no_grad()(torch_path), probe)}
        rates.update({k: n / _seconds(r, probe) for k, r in built.items()})
        best = max(rates, key=rates.get)
        chosen = built.get(best)
        say(f"engine auto for {backbone.name} at {cut}, {tuple(x.shape[1:])}: {best} ("
             + ", ".join(f"{k} {v:.0f}" for k, v in sorted(rates.items(), key=lambda kv: -kv[1])) + " slices/s)")
    _runners[memo] = (chosen, name)
    return chosen


def engine_name(runner: Runner | None) -> str:
    return runner.engine if runner is not None else "torch"


__all__ = ["ENGINES", "ENGINE_CHOICES", "EngineUnavailable", "FrozenPass", "Runner", "available_engines",
           "build_runner", "clear", "current_engine", "engine_name", "frozen_runner", "note", "notes", "set_engine",
           "using_engine", "with_engine_args"]
