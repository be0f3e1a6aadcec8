"""The one activation cache: frozen activations, content-keyed, in memory and/or on disk.

It serves training (un-augmented batches of shared-trunk and pooling-only plugins), predict-all
over a plugin store (one volume's trunk shared by every plugin) and the frozen-feature baselines
(class embeddings of every slice). ``ActivationCache(None)`` is a memory-only cache (one run or
one volume); ``ActivationCache(DIR)`` keeps entries on disk too (``train --cache DIR``,
``bench --set trunk_cache=DIR``), reused by later epochs, runs and tasks.

What is cached, per (case, stream):

* shared-trunk plugins (``lora.last_k = k``): the output of the backbone's first blocks
  (``forward_trunk(x, k)``; bf16), i.e. everything before the LoRA-adapted tail;
* pooling-only plugins (``lora.r = 0``): the whole frozen backbone's class embeddings (S, D).

A miss is computed by the inference engine of ``--engine`` (:mod:`anymc3d.runtime.engines`: torch eager,
ONNX Runtime or OpenVINO, checked equal to torch within 1e-3) through :func:`frozen_engine`.

Full-depth LoRA plugins have no frozen part worth caching (LoRA starts at the patch embedding / first
pointwise convolution), so they are never cached.

The key is a sha256 over: the slice stack the backbone receives (the volume's content after
preprocessing; shape, dtype and bytes), the preprocessing spec of that input (every field) and the
view, the backbone's name and weight fingerprint, the cut point (``trunk:k`` or ``embed``), whether
bf16 autocast was on (the torch path's; the other engines compute in fp32), and the cache format. Any change of volume, preprocessing or backbone weights
gives another key: the stale entry is never read (``anymc3d cache clear`` removes old entries).

Each entry is one safetensors file ``DIR/ab/<key>.safetensors`` written atomically, with the key and
a sha256 of the tensor bytes in its metadata. An entry that cannot be parsed, has another key or
fails its checksum is reported (``warnings``), deleted and recomputed.

Several processes may share one cache folder (the ranks of a ``torchrun`` job, several jobs on one
disk): every entry is written to a temporary file and renamed into place, so a reader sees a whole
entry or none, and the process that misses an entry first takes ``DIR/ab/<key>.lock`` (created
with ``O_CREAT | O_EXCL``, which exactly one process wins) while it computes it; another process
that misses the same entry meanwhile waits for the entry instead of computing it twice (up to
``LOCK_WAIT_S``; a lock older than ``STALE_LOCK_S`` - its owner died - is taken over).

With augmentation on, training batches are augmented 3D volumes that differ every step, so they
always run the full backbone and are never cached; only un-augmented passes (validation every
epoch, the final validation/test predictions, and ``--no-augment`` training) read and fill the cache.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import time
import warnings
from collections import Counter
from pathlib import Path
import torch

from ..io import atomic_write

CACHE_FORMAT = "anymc3d-activations/1"
#: seconds a process waits for an entry that another process is computing, before computing it itself
LOCK_WAIT_S = 120.0
#: a lock file older than this is left over by a process that died: it is taken over
STALE_LOCK_S = 600.0


def tensor_digest(t: torch.Tensor) -> str:
    t = t.detach().to("cpu").contiguous()
    h = hashlib.sha256()
    h.update(f"{tuple(t.shape)}|{t.dtype}|".encode())
    if t.numel():
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


class ActivationCache:
    """Content-addressed tensor store with corruption detection. ``stats`` counts hits, misses, corrupt, writes.

    ``root=None``: memory only. ``memory=True``: entries read or computed are also kept in memory
    (a dict keyed by the same content key), so later epochs skip the disk read."""

    def __init__(self, root: str | Path | None, memory: bool = False) -> None:
        self.root = Path(root) if root is not None else None
        self.memory: dict[str, tuple[torch.Tensor, dict]] | None = {} if (memory or root is None) else None
        self.stats: Counter = Counter()

    @staticmethod
    def make_key(material: dict) -> str:
        return hashlib.sha256(json.dumps({"format": CACHE_FORMAT, **material}, sort_keys=True).encode()).hexdigest()

    def path(self, key: str) -> Path:
        if self.root is None:
            raise ValueError("a memory-only activation cache has no files")
        return self.root / key[:2] / f"{key}.safetensors"

    def get(self, key: str, with_meta: bool = False):
        """The entry's tensor (``with_meta``: and its metadata dict), or None."""
        from safetensors import safe_open

        if self.memory is not None and key in self.memory:
            self.stats["hits"] += 1
            t, meta = self.memory[key]
            return (t, meta) if with_meta else t
        if self.root is None or not self.path(key).is_file():
            self.stats["misses"] += 1
            return None
        p = self.path(key)
        try:
            with safe_open(str(p), framework="pt") as fh:
                meta = fh.metadata() or {}
                t = fh.get_tensor("act")
            if meta.get("key") != key:
                raise ValueError(f"entry holds key {str(meta.get('key'))[:12]}…")
            if meta.get("sha256") != tensor_digest(t):
                raise ValueError("checksum mismatch")
        except Exception as exc:  # truncated file, bad header, bit rot, wrong entry
            warnings.warn(f"activation cache: corrupt entry {p} ({str(exc).splitlines()[0][:120]}); recomputing",
                          RuntimeWarning, stacklevel=2)
            self.stats["corrupt"] += 1
            p.unlink(missing_ok=True)
            return None
        self.stats["hits"] += 1
        if self.memory is not None:
            self.memory[key] = (t, meta)
        return (t, meta) if with_meta else t

    def put(self, key: str, t: torch.Tensor, info: dict | None = None) -> Path | None:
        t = t.detach().to("cpu").contiguous()
        meta = {"key": key, "format": CACHE_FORMAT, **{k: str(v) for k, v in (info or {}).items()}}
        if self.memory is not None:
            self.memory[key] = (t, meta)
        if self.root is None:
            return None
        meta["sha256"] = tensor_digest(t)
        from safetensors.torch import save_file

        p = self.path(key)
        with atomic_write(p) as tmp:
            save_file({"act": t}, str(tmp), metadata=meta)
        self.stats["writes"] += 1
        return p

    # ---- several processes on one folder ---------------------------------------------------------
    def lock_path(self, key: str) -> Path:
        return self.path(key).with_suffix(".lock")

    def try_lock(self, key: str) -> bool:
        """Take the entry's lock file (True), or learn that another live process holds it (False).
        A memory-only cache needs no lock (True)."""
        if self.root is None:
            return True
        lock = self.lock_path(key)
        lock.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(2):
            try:
                fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                try:
                    age = time.time() - lock.stat().st_mtime
                except FileNotFoundError:  # released meanwhile: try again
                    continue
                if age > STALE_LOCK_S:
                    lock.unlink(missing_ok=True)
                    self.stats["stale_locks"] += 1
                    continue
                return False
            with os.fdopen(fd, "w") as fh:
                fh.write(f"{socket.gethostname()} {os.getpid()}\n")
            return True
        return False

    def unlock(self, key: str) -> None:
        if self.root is not None:
            self.lock_path(key).unlink(missing_ok=True)

    def wait_for(self, key: str, timeout: float = LOCK_WAIT_S, poll: float = 0.05):
        """The entry once another process has written it (None after ``timeout``, or when its lock goes
        away without an entry)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.path(key).is_file():
                self.stats["waited"] += 1
                return self.get(key, with_meta=True)
            if not self.lock_path(key).exists():
                return self.get(key, with_meta=True) if self.path(key).is_file() else None
            time.sleep(poll)
        return None

    def clear_memory(self) -> None:
        if self.memory is not None:
            self.memory.clear()

    # ---- maintenance ----------------------------------------------------------------------------
    def entries(self) -> list[Path]:
        return sorted(self.root.glob("??/*.safetensors")) if self.root is not None and self.root.is_dir() else []

    def size_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.entries())

    def clear(self) -> int:
        n = len(self.entries())
        self.clear_memory()
        for d in (self.root.glob("??") if self.root is not None else []):
            if d.is_dir():
                shutil.rmtree(d)
        return n


def cut_point(model) -> str | None:
    """What can be cached for this plugin: ``trunk:k`` (shared trunk), ``embed`` (pooling-only) or None."""
    if model.spec.lora.r == 0:
        return "embed"
    if model.last_k is not None:
        return f"trunk:{model.last_k}"
    return None


def torch_frozen(model, stream: str):
    """The torch path of ``model``'s frozen part (its chunking, autocast and memory format): slices -> float32."""
    if model.spec.lora.r == 0:
        return lambda x: model.embed_slices(stream, x)[0]
    return lambda x: model.trunk(x, engine=False).float()


def frozen_engine(model, stream: str, x: torch.Tensor):
    """The engine runner for ``model``'s frozen part on slices like ``x`` (None: torch; see
    :mod:`anymc3d.runtime.engines`: ``--engine``, checked against torch, ``auto`` timed against
    :func:`torch_frozen`)."""
    from .engines import frozen_runner

    cut = cut_point(model)
    if cut is None:
        return None
    return frozen_runner(model.backbone, cut, x, torch_path=torch_frozen(model, stream))


def trunk_dtype(model) -> torch.dtype:
    """The dtype trunk activations are kept in: bf16 under autocast (what the tail computes in anyway,
    half the memory), fp32 without (rounding them to bf16 would move an fp32 answer by ~1e-3)."""
    return torch.bfloat16 if model.autocast else torch.float32


@torch.no_grad()
def frozen_activations(model, stream: str, x: torch.Tensor, runner=None) -> torch.Tensor:
    """The frozen part of ``model`` on slices x (N, C, H, W): trunk activations (:func:`trunk_dtype`) or
    class embeddings. ``runner``: an engine's runner (:func:`frozen_engine`) instead of the torch path."""
    from ..plugins.lora import activate

    activate(model.backbone.model, None)  # other plugins' adapters on a shared backbone must not leak in
    if runner is not None:
        out = torch.cat([runner(x[i:i + model.chunk].to("cpu")) for i in range(0, x.shape[0], model.chunk)])
        return out.float() if model.spec.lora.r == 0 else out.to(trunk_dtype(model))
    if model.spec.lora.r == 0:
        return model.embed_slices(stream, x)[0]
    return model.trunk(x, engine=False).to(trunk_dtype(model))


class PluginActivations:
    """One plugin's (or one frozen backbone's) view of an :class:`ActivationCache`.

    The key of an entry is a sha256 over the backbone's name and weight fingerprint, the cut point,
    bf16 autocast on/off, the input's preprocessing spec (every field but ``views``), the view and
    the slice stack itself, so plugins on one backbone with the same preprocessing share entries
    (predict-all), and any change of volume, preprocessing or weights gives another key."""

    def __init__(self, cache: "ActivationCache | str | Path | None", model, specs: dict, memory: bool = False) -> None:
        self.cache = cache if isinstance(cache, ActivationCache) else ActivationCache(cache, memory=memory)
        self.model, self.specs = model, specs
        self.cut = cut_point(model)
        if self.cut is None:
            raise ValueError("the activation cache needs a shared-trunk (lora.last_k) or pooling-only (r=0) plugin")

    @property
    def stats(self) -> Counter:
        return self.cache.stats

    def path(self, key: str) -> Path:
        return self.cache.path(key)

    def key_for(self, stream: str, x: torch.Tensor, runner=None) -> str:
        """``runner``: the engine that computes a miss (engines compute in fp32: ``amp`` is off for them)."""
        inp, view = stream.split(":")
        pre = {k: v for k, v in self.specs[inp].to_dict().items() if k != "views"}
        bb = self.model.backbone
        return self.cache.make_key({"backbone": bb.name, "fingerprint": bb.fingerprint, "cut": self.cut,
                                    "amp": bool(self.model.autocast) and runner is None, "preprocess": pre,
                                    "view": view, "slices": tensor_digest(x)})

    def activations(self, stream: str, x: torch.Tensor, with_seconds: bool = False, device=None):
        """Frozen activations of slices x (computed on ``device``, default x's, when missing; returned
        on the CPU). ``with_seconds``: also the seconds their computation took (stored with the entry).
        The engine (``--engine``) is chosen first: its fp32 results and the torch path's bf16 autocast ones
        are different entries."""
        dev = x.device if device is None else torch.device(device)
        runner = frozen_engine(self.model, stream, x) if dev.type == "cpu" else None
        key = self.key_for(stream, x, runner)
        hit = self.cache.get(key, with_meta=True)
        if hit is not None:
            t, meta = hit
            return (t, float(meta.get("compute_s", 0.0))) if with_seconds else t
        locked = self.cache.try_lock(key)
        if not locked:  # another process (a torchrun rank) is computing this entry: wait for it
            hit = self.cache.wait_for(key)
            if hit is not None:
                t, meta = hit
                return (t, float(meta.get("compute_s", 0.0))) if with_seconds else t
        try:
            t0 = time.perf_counter()
            t = frozen_activations(self.model, stream, x if device is None else x.to(device), runner).to("cpu")
            secs = time.perf_counter() - t0
            self.cache.put(key, t, {"backbone": self.model.backbone.name, "cut": self.cut, "stream": stream,
                                    "engine": runner.engine if runner is not None else "torch",
                                    "compute_s": f"{secs:.6f}"})
        finally:
            if locked:
                self.cache.unlock(key)
        return (t, secs) if with_seconds else t
