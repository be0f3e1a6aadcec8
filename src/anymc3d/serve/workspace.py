"""The service's one private folder on disk, and the removal of those that dead services left behind.

Every service (every ``create_app``) makes ``$TMPDIR/anymc3d-serve-<pid>-<random>/`` (mode 0700) with
``uploads/`` (one ``anymc3d-upload-*`` folder per request) and ``results/`` (heatmaps, for a bounded time)
and an ``owner`` file: the process id and its start time. The folder is removed when the service stops
(and, as a fallback, when the process exits). At start-up, folders of this user whose owner process no
longer runs (a crash, ``kill -9``) are removed; a folder whose owner is alive (another service, a test
run) is never touched, and the start time guards against a recycled process id. Folders of the older
layout (``anymc3d-upload-*`` / ``anymc3d-results-*`` directly in ``$TMPDIR``, no owner file) are removed
when nothing in them changed for :data:`LEGACY_AGE_S`.
"""
from __future__ import annotations

import atexit
import os
import shutil
import tempfile
import time
from pathlib import Path

PREFIX = "anymc3d-serve-"
LEGACY = ("anymc3d-upload-", "anymc3d-results-")
LEGACY_AGE_S = 24 * 3600.0
OWNER = "owner"


def _start_time(pid: int) -> str:
    """The process's start time in clock ticks since boot (Linux), '' where unknown."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat[stat.rindex(")") + 2:].split()[19]
    except (OSError, ValueError, IndexError):
        return ""


def _alive(pid: int, started: str) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process: alive (and not ours to judge)
    now = _start_time(pid)
    return not (started and now and now != started)


def _newest_mtime(folder: Path) -> float:
    newest = folder.lstat().st_mtime
    for dirpath, dirnames, filenames in os.walk(folder):
        for n in dirnames + filenames:
            try:
                newest = max(newest, os.lstat(os.path.join(dirpath, n)).st_mtime)
            except OSError:
                pass
    return newest


def remove_stale(parent: Path | None = None, legacy_age_s: float = LEGACY_AGE_S) -> list[Path]:
    """Remove the service folders of dead processes (and old legacy folders) of this user under
    ``parent`` (default: the temporary directory). Returns what was removed."""
    parent = Path(parent or tempfile.gettempdir())
    uid = os.getuid()
    gone = []
    try:
        entries = list(parent.iterdir())
    except OSError:
        return gone
    for d in entries:
        try:
            st = d.lstat()
        except OSError:
            continue
        if not d.is_dir() or d.is_symlink() or st.st_uid != uid:
            continue
        if d.name.startswith(PREFIX):
            try:
                pid_text, _, started = (d / OWNER).read_text().strip().partition(" ")
                pid = int(pid_text)
            except (OSError, ValueError):
                # no owner file yet: a service being created right now, or a broken one; judge by age
                if time.time() - st.st_mtime < 60:
                    continue
                pid, started = -1, ""
            if _alive(pid, started):
                continue
        elif d.name.startswith(LEGACY):
            if time.time() - _newest_mtime(d) < legacy_age_s:
                continue
        else:
            continue
        shutil.rmtree(d, ignore_errors=True)
        gone.append(d)
    return gone


class Workspace:
    """``root`` (0700) with ``uploads`` and ``results``; :meth:`close` removes it."""

    def __init__(self, parent: Path | None = None) -> None:
        self.removed = remove_stale(parent)
        self.root = Path(tempfile.mkdtemp(prefix=f"{PREFIX}{os.getpid()}-",
                                          dir=None if parent is None else str(parent)))
        (self.root / OWNER).write_text(f"{os.getpid()} {_start_time(os.getpid())}\n")
        self.uploads = self.root / "uploads"
        self.results = self.root / "results"
        self.uploads.mkdir(mode=0o700)
        self.results.mkdir(mode=0o700)
        atexit.register(self.close)

    def close(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)
        atexit.unregister(self.close)
