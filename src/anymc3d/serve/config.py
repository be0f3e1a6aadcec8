"""The settings of one ``anymc3d serve`` process."""
from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from ..errors import InputError

#: the serve default of ``--max-voxels``: 512³ values (512 MiB as float32), lower than the CLI's
SERVE_MAX_VOXELS = 512 ** 3
LOOPBACK_NAMES = ("127.0.0.1", "localhost", "::1")
#: the Host of Starlette's / FastAPI's TestClient (a single-label name no public DNS resolves)
TEST_HOST = "testserver"


def is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _host_form(h: str) -> str:
    """A host as it appears (lowercased) in a Host header: IPv6 literals in brackets."""
    h = h.strip().lower()
    try:
        if ipaddress.ip_address(h.strip("[]")).version == 6:
            return f"[{h.strip('[]')}]"
    except ValueError:
        pass
    return h


def default_allowed_hosts(host: str) -> list[str]:
    """Host header values accepted by default for a service bound to ``host``."""
    names = [host]
    if is_loopback(host):
        names += [*LOOPBACK_NAMES, TEST_HOST]
    elif host in ("0.0.0.0", "::", ""):
        names = [*LOOPBACK_NAMES]
        try:  # this machine's own names and addresses, best effort
            hn = socket.gethostname()
            names += [hn, socket.getfqdn(hn), *socket.gethostbyname_ex(hn)[2]]
        except OSError:
            pass
    return list(dict.fromkeys(_host_form(n) for n in names if n))


@dataclass
class ServeConfig:
    plugins: Path                        # the plugin store
    weights: Optional[str] = None        # backbone weights file ('random' in tests); None: the registry's
    device: str = "auto"
    workers: int = 1                     # inference worker threads, each with its own loaded predictor
    queue: int = 8                       # requests admitted at once (uploading + waiting + running)
    max_upload_mb: float = 512.0         # largest request body; larger -> 413
    token: Optional[str] = None          # bearer token required on /v1/* when set
    keep: Optional[Path] = None          # keep each request's upload folder here instead of deleting it
    results_ttl_s: float = 900.0         # how long heatmap / image files stay downloadable
    max_unzipped_mb: Optional[float] = None  # DICOM zip: uncompressed size limit (default 4 x max_upload_mb)
    max_zip_members: int = 10000
    # reader options, as the CLI flags of the reading verbs (docs/data.md); max_voxels lower than the CLI's
    max_voxels: Optional[int] = SERVE_MAX_VOXELS
    allow_gaps: bool = False
    series: Optional[str] = None
    # hardening (docs/serve.md, threat model)
    host: str = "127.0.0.1"                  # the bound address: decides the default allowed hosts
    allowed_hosts: Optional[list] = None     # Host header values accepted (None: default_allowed_hosts(host))
    allowed_origins: list = field(default_factory=list)  # cross-origin pages allowed to call /v1/*
    upload_timeout_s: float = 120.0          # the whole request body must arrive within this
    min_upload_rate_kib: float = 64.0        # and, after the first 10 s, at least this many KiB/s on average
    max_results_mb: float = 2048.0           # disk used by result files; oldest evicted above it

    def __post_init__(self) -> None:
        self.plugins = Path(self.plugins)
        if self.allowed_hosts is None:
            self.allowed_hosts = default_allowed_hosts(self.host)
        else:
            self.allowed_hosts = list(dict.fromkeys(_host_form(h) for h in self.allowed_hosts if h.strip()))
        self.allowed_origins = [o.strip().rstrip("/").lower() for o in self.allowed_origins if o.strip()]
        for o in self.allowed_origins:
            if o != "*" and "://" not in o:
                raise InputError(f"--allowed-origins: {o!r} is not an origin (scheme://host[:port])")
        if self.upload_timeout_s <= 0:
            raise InputError(f"--upload-timeout must be positive, got {self.upload_timeout_s}")
        if self.min_upload_rate_kib < 0:
            raise InputError(f"--min-upload-rate must not be negative, got {self.min_upload_rate_kib}")
        if self.max_results_mb <= 0:
            raise InputError(f"--max-results-mb must be positive, got {self.max_results_mb}")
        if self.max_voxels is not None and self.max_voxels < 1:
            raise InputError(f"--max-voxels must be positive, got {self.max_voxels}")
        if self.workers < 1:
            raise InputError(f"--workers must be at least 1, got {self.workers}")
        if self.queue < 1:
            raise InputError(f"--queue must be at least 1, got {self.queue}")
        if self.max_upload_mb <= 0:
            raise InputError(f"--max-upload-mb must be positive, got {self.max_upload_mb}")
        if self.results_ttl_s <= 0:
            raise InputError(f"--results-ttl must be positive, got {self.results_ttl_s}")
        if self.token is not None and not self.token.strip():
            raise InputError("the token is empty")
        if not self.plugins.is_dir():
            raise InputError(f"{self.plugins}: plugin store not found (a folder made by `anymc3d plugins add`)")

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 2**20)

    @property
    def max_unzipped_bytes(self) -> int:
        mb = self.max_unzipped_mb if self.max_unzipped_mb is not None else 4 * self.max_upload_mb
        return int(mb * 2**20)

    @property
    def max_results_bytes(self) -> int:
        return int(self.max_results_mb * 2**20)

    def reader_args(self):
        import argparse

        return argparse.Namespace(max_voxels=self.max_voxels, allow_gaps=self.allow_gaps, series=self.series)


def read_token_file(path: str | Path) -> str:
    """The bearer token: the file's first line, stripped. Refuses an empty file or one others can read."""
    import os
    import stat

    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise InputError(f"{p}: cannot read the token file ({exc.strerror or exc})") from exc
    except UnicodeDecodeError as exc:
        raise InputError(f"{p}: the token file is not UTF-8 text") from exc
    token = text.strip().splitlines()[0].strip() if text.strip() else ""
    if len(token) < 16:
        raise InputError(f"{p}: the token must be at least 16 characters (e.g. `openssl rand -hex 32 > {p.name}`)")
    mode = os.stat(p).st_mode
    if mode & (stat.S_IRGRP | stat.S_IROTH):
        raise InputError(f"{p}: the token file is readable by other users; run `chmod 600 {p}`")
    return token
