"""The on-disk cache of exported graphs: one folder per (engine, key), never a file from elsewhere.

The key is a sha256 over the backbone's name and weight fingerprint, the cut point, the slice size
and channels, the engine's name and version, torch's version and the cache format: a change of any
of them gives another folder, so a graph exported for other weights, another cut or another size is
never loaded (``anymc3d cache clear``-style removal: delete the folder). The folder is
``ROOT/<engine>/<key[:16]>/`` with the graph's files and ``meta.json`` (the full key and a sha256
of every file); an entry whose meta does not match its key or whose files fail their checksum is
deleted and rebuilt. Entries are built in a temporary folder and renamed into place, so a reader
sees a whole entry or none.

``ROOT``: ``$ANYMC3D_ENGINE_CACHE``, else ``~/.cache/anymc3d/engines``.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
import warnings
from pathlib import Path
from typing import Callable

FORMAT = "anymc3d-engine-export/1"


def default_root() -> Path:
    env = os.environ.get("ANYMC3D_ENGINE_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "anymc3d" / "engines"


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


class ExportCache:
    """``entry(material, engine, build)`` -> the folder of a verified entry (built by ``build(tmpdir)`` when missing)."""

    def __init__(self, root: str | Path | None = None) -> None:
        self.root = Path(root) if root is not None else default_root()
        self.stats = {"hits": 0, "builds": 0, "corrupt": 0}

    @staticmethod
    def make_key(material: dict) -> str:
        return hashlib.sha256(json.dumps({"format": FORMAT, **material}, sort_keys=True).encode()).hexdigest()

    def folder(self, engine: str, key: str) -> Path:
        return self.root / engine / key[:16]

    def _valid(self, folder: Path, key: str) -> bool:
        meta_p = folder / "meta.json"
        if not meta_p.is_file():
            return False
        try:
            meta = json.loads(meta_p.read_text())
            if meta.get("key") != key:
                raise ValueError(f"holds key {str(meta.get('key'))[:12]}…")
            files = meta.get("files") or {}
            if not files:
                raise ValueError("lists no files")
            for name, digest in files.items():
                p = folder / name
                if Path(name).name != name or not p.is_file() or file_sha256(p) != digest:
                    raise ValueError(f"{name}: missing or checksum mismatch")
        except Exception as exc:  # truncated meta, bit rot, another entry's files
            warnings.warn(f"engine export cache: corrupt entry {folder} ({str(exc)[:120]}); rebuilding",
                          RuntimeWarning, stacklevel=3)
            self.stats["corrupt"] += 1
            shutil.rmtree(folder, ignore_errors=True)
            return False
        return True

    def entry(self, material: dict, engine: str, build: Callable[[Path], None]) -> Path:
        """The verified folder for ``material`` (computed once: ``build(tmp)`` writes the graph's files
        into an empty temporary folder, which is then checksummed and renamed into place)."""
        key = self.make_key({**material, "engine": engine})
        folder = self.folder(engine, key)
        if self._valid(folder, key):
            self.stats["hits"] += 1
            return folder
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = folder.parent / f".tmp-{uuid.uuid4().hex[:12]}"
        tmp.mkdir()
        try:
            build(tmp)
            files = {p.name: file_sha256(p) for p in sorted(tmp.iterdir()) if p.is_file()}
            if not files:
                raise RuntimeError(f"engine {engine}: the export wrote no files")
            (tmp / "meta.json").write_text(json.dumps({"key": key, "format": FORMAT, "material": material,
                                                       "engine": engine, "files": files}, indent=1, sort_keys=True))
            if folder.exists():  # a stale entry, or another process finished first: ours replaces it
                shutil.rmtree(folder, ignore_errors=True)
            try:
                os.replace(tmp, folder)
            except OSError:  # another process renamed its (equal) entry in between
                if not self._valid(folder, key):
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        self.stats["builds"] += 1
        return folder
