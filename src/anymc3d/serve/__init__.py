"""``anymc3d serve``: an HTTP service for a plugin store, with a web viewer (docs/serve.md).

One process loads the store's backbone and every compatible plugin once; requests go through a
bounded queue to worker threads that call the same code as ``anymc3d predict --plugins`` and
``anymc3d explain``. Modules, one concept each:

* :mod:`.config` - the settings of one service (``ServeConfig``);
* :mod:`.uploads` - an upload into a private folder: type allow-list, header checks, DICOM zips;
* :mod:`.results` - result files (heatmaps, the volume for the viewer) kept for a bounded time;
* :mod:`.jobs` - admission (bounded queue, 503 + Retry-After) and the inference worker threads;
* :mod:`.service` - one request's work on the loaded predictors (predict, heatmaps, URLs);
* :mod:`.guard` - ASGI middleware: bearer token, upload size, admission, before the body is read;
* :mod:`.app` - the FastAPI application factory ``create_app``;
* :mod:`.cli` - the ``serve`` verb (uvicorn).

Needs the ``serve`` extra: ``pip install "anymc3d[serve]"``.
"""
from __future__ import annotations

__all__ = ["create_app", "ServeConfig"]


def __getattr__(name: str):
    if name == "create_app":
        from .app import create_app

        return create_app
    if name == "ServeConfig":
        from .config import ServeConfig

        return ServeConfig
    raise AttributeError(name)
