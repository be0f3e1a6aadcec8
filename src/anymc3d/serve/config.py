"""The settings of one ``anymc3d serve`` process."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from ..errors import InputError


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
    # reader options, as the CLI flags of the reading verbs (docs/data.md)
    max_voxels: Optional[int] = None
    allow_gaps: bool = False
    series: Optional[str] = None

    def __post_init__(self) -> None:
        self.plugins = Path(self.plugins)
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
