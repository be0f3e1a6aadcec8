"""Result files (heatmap NIfTI + PNG, the volume shown by the viewer) served for a bounded time.

Each request with ``heatmaps=true`` gets an unguessable id (128 random bits) and a folder under the
service's private results folder. Only the files the service wrote and registered are served (no path
from a URL ever reaches the file system); a result expires ``ttl`` seconds after it was returned and is
deleted at the next sweep (every request, and a background thread).

The disk they use is capped (``max_bytes``, ``--max-results-mb``): when a new result is published and the
total is over the cap, the oldest published results are deleted first (their URLs answer 404 as if
expired); a single result larger than the cap is refused (:class:`ResultsFull`, HTTP 507).
"""
from __future__ import annotations

import secrets
import shutil
import tempfile
import threading
import time
from pathlib import Path

from ..errors import InputError
from ..io import atomic_write


class ResultsFull(InputError):
    """One result is larger than the whole results cap: HTTP 507."""


def _size(folder: Path) -> int:
    total = 0
    for p in folder.rglob("*"):
        try:
            if p.is_file() and not p.is_symlink():
                total += p.stat().st_size
        except OSError:
            pass
    return total


class ResultStore:
    def __init__(self, ttl_s: float, root: Path | None = None, max_bytes: int | None = None) -> None:
        self.ttl_s = float(ttl_s)
        self.max_bytes = None if max_bytes is None else int(max_bytes)
        self._sizes: dict[str, tuple[float, int]] = {}  # published id -> (publish time, bytes)
        self.evicted = 0
        self.root = Path(tempfile.mkdtemp(prefix="anymc3d-results-")) if root is None else Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._entries: dict[str, tuple[float, dict[str, Path]]] = {}  # id -> (expiry, {relative name: path})

    def new(self) -> tuple[str, Path]:
        rid = secrets.token_hex(16)
        folder = self.root / rid
        folder.mkdir(mode=0o700)
        with self._lock:
            self._entries[rid] = (float("inf"), {})  # the clock starts at publish()
        return rid, folder

    def publish(self, rid: str) -> None:
        """The result is complete: its files expire ``ttl`` seconds from now. Over the disk cap, the oldest
        other results are deleted; a result alone over the cap raises ResultsFull (and is deleted)."""
        size = _size(self.root / rid)
        if self.max_bytes is not None and size > self.max_bytes:
            self.discard(rid)
            raise ResultsFull(f"the heatmap files of this request ({size / 2**20:.3g} MiB) are larger than the "
                              f"service's results limit of {self.max_bytes / 2**20:.3g} MiB (--max-results-mb)")
        now = time.monotonic()
        evict = []
        with self._lock:
            _, files = self._entries[rid]
            self._entries[rid] = (now + self.ttl_s, files)
            self._sizes[rid] = (now, size)
            if self.max_bytes is not None:
                total = sum(s for _, s in self._sizes.values())
                for old, (_, s) in sorted(self._sizes.items(), key=lambda kv: kv[1][0]):
                    if total <= self.max_bytes:
                        break
                    if old == rid:
                        continue
                    evict.append(old)
                    total -= s
                for old in evict:
                    self._entries.pop(old, None)
                    self._sizes.pop(old, None)
                self.evicted += len(evict)
        for old in evict:
            shutil.rmtree(self.root / old, ignore_errors=True)

    @property
    def used_bytes(self) -> int:
        with self._lock:
            return sum(s for _, s in self._sizes.values())

    def register(self, rid: str, path: Path) -> str:
        """Make ``path`` (inside the result's folder) downloadable; returns its name in URLs."""
        rel = Path(path).relative_to(self.root / rid).as_posix()
        with self._lock:
            expiry, files = self._entries[rid]
            files[rel] = Path(path)
        return rel

    def write_bytes(self, rid: str, rel: str, data: bytes) -> str:
        path = self.root / rid / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_write(path) as tmp:
            Path(tmp).write_bytes(data)
        return self.register(rid, path)

    def get(self, rid: str, rel: str) -> Path | None:
        self.sweep()
        with self._lock:
            entry = self._entries.get(rid)
            if entry is None:
                return None
            return entry[1].get(rel)

    def expires_in(self, rid: str) -> float | None:
        with self._lock:
            entry = self._entries.get(rid)
        return None if entry is None else max(0.0, entry[0] - time.monotonic())

    def discard(self, rid: str) -> None:
        with self._lock:
            self._entries.pop(rid, None)
            self._sizes.pop(rid, None)
        shutil.rmtree(self.root / rid, ignore_errors=True)

    def sweep(self) -> int:
        now = time.monotonic()
        with self._lock:
            gone = [rid for rid, (exp, _) in self._entries.items() if exp <= now]
            for rid in gone:
                del self._entries[rid]
                self._sizes.pop(rid, None)
        for rid in gone:
            shutil.rmtree(self.root / rid, ignore_errors=True)
        return len(gone)

    def close(self) -> None:
        with self._lock:
            self._entries.clear()
            self._sizes.clear()
        shutil.rmtree(self.root, ignore_errors=True)
