"""``anymc3d serve --plugins STORE``: the HTTP service (FastAPI on uvicorn; the ``serve`` extra)."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..cli_args import add_weights_arg
from ..errors import InputError
from ..runtime.device import DEVICE_CHOICES


def register(sub) -> dict:
    s = sub.add_parser("serve", help="an HTTP service (+ web viewer) for a plugin store; needs anymc3d[serve]",
                       description="Serve every task of a plugin store over HTTP: POST /v1/predict, GET /v1/plugins, "
                                   "GET /healthz, the web viewer at /, the OpenAPI schema at /openapi.json "
                                   "(docs/serve.md).")
    s.add_argument("--plugins", required=True, type=Path, metavar="STORE", help="the plugin store to serve")
    s.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--token-file", type=Path, metavar="F",
                   help="require 'Authorization: Bearer <token>' on /v1/* (the token: first line of F, chmod 600)")
    s.add_argument("--max-upload-mb", type=float, default=512.0, help="largest upload in MiB (default 512); larger -> 413")
    s.add_argument("--queue", type=int, default=8, metavar="N",
                   help="requests admitted at once (uploading, waiting, running); more -> 503 (default 8)")
    s.add_argument("--keep", type=Path, metavar="DIR",
                   help="keep each request's upload folder in DIR (default: deleted after the request)")
    s.add_argument("--results-ttl", type=float, default=900.0, metavar="S",
                   help="seconds heatmap files stay downloadable (default 900)")
    s.add_argument("--root-path", default="", help="URL prefix when served behind a reverse proxy (e.g. /anymc3d)")
    h = s.add_argument_group("hardening (docs/serve.md: threat model)")
    h.add_argument("--allowed-hosts", default=None, metavar="H,H",
                   help="Host header values accepted (default: the bound host; on a loopback address also "
                        "localhost, 127.0.0.1, ::1; on 0.0.0.0 this machine's names); others -> 400")
    h.add_argument("--allowed-origins", default="", metavar="O,O",
                   help="other web origins (scheme://host[:port]) allowed to call /v1/* from a browser; "
                        "requests with any other Origin -> 403")
    h.add_argument("--upload-timeout", type=float, default=120.0, metavar="S",
                   help="the whole upload must arrive within S seconds (default 120); else 408")
    h.add_argument("--min-upload-rate", type=float, default=64.0, metavar="KIB_S",
                   help="after the first 10 s, an upload slower than this (KiB/s, average) gets 408 (default 64; 0: off)")
    h.add_argument("--max-results-mb", type=float, default=2048.0, metavar="MB",
                   help="disk for heatmap result files (default 2048); over it the oldest results are deleted")
    h.add_argument("--ssl-certfile", type=Path, metavar="PEM", help="serve HTTPS with this certificate (uvicorn)")
    h.add_argument("--ssl-keyfile", type=Path, metavar="PEM", help="the private key of --ssl-certfile")
    add_weights_arg(s)
    g = s.add_argument_group("runtime")
    g.add_argument("--device", default="auto", metavar="DEVICE", help=f"{DEVICE_CHOICES} (default auto)")
    g.add_argument("--workers", type=int, default=1, metavar="N",
                   help="inference worker threads, each with its own copy of the backbone and plugins (default 1)")
    from ..io.options import add_reader_args

    add_reader_args(s)
    return {"serve": cmd_serve}


def _require_extra():
    try:
        import fastapi  # noqa: F401
        import python_multipart  # noqa: F401  (python-multipart)
        import uvicorn  # noqa: F401
    except ModuleNotFoundError as exc:
        raise InputError(f"serve needs the serve extra ({exc.name} is missing): pip install \"anymc3d[serve]\"") from exc


def config_from_args(a: argparse.Namespace):
    from .config import ServeConfig, read_token_file

    from .config import SERVE_MAX_VOXELS

    token = read_token_file(a.token_file) if a.token_file else None
    if bool(getattr(a, "ssl_certfile", None)) != bool(getattr(a, "ssl_keyfile", None)):
        raise InputError("--ssl-certfile and --ssl-keyfile go together")
    hosts = getattr(a, "allowed_hosts", None)
    return ServeConfig(plugins=a.plugins, weights=a.weights, device=a.device, workers=a.workers, queue=a.queue,
                       max_upload_mb=a.max_upload_mb, token=token, keep=a.keep, results_ttl_s=a.results_ttl,
                       max_voxels=getattr(a, "max_voxels", None) or SERVE_MAX_VOXELS,
                       allow_gaps=bool(getattr(a, "allow_gaps", False)), series=getattr(a, "series", None),
                       host=getattr(a, "host", "127.0.0.1"),
                       allowed_hosts=[h for h in hosts.split(",")] if hosts else None,
                       allowed_origins=[o for o in (getattr(a, "allowed_origins", "") or "").split(",") if o.strip()],
                       upload_timeout_s=getattr(a, "upload_timeout", 120.0),
                       min_upload_rate_kib=getattr(a, "min_upload_rate", 64.0),
                       max_results_mb=getattr(a, "max_results_mb", 2048.0))


def warnings_for(a: argparse.Namespace, config) -> list[str]:
    """The start-up warnings of ``anymc3d serve`` for these settings."""
    from .config import is_loopback

    out = []
    tls = bool(getattr(a, "ssl_certfile", None))
    if not is_loopback(a.host) and config.token is None:
        out.append(f"serving on {a.host} without --token-file: anyone who reaches this port can send volumes")
    if not is_loopback(a.host) and config.token is not None and not tls:
        out.append(f"serving on {a.host} with a token but without TLS: the bearer token and the volumes travel "
                   f"in clear text; use --ssl-certfile/--ssl-keyfile or a TLS reverse proxy on this machine")
    return out


def cmd_serve(a: argparse.Namespace) -> int:
    _require_extra()
    import uvicorn

    from .app import create_app

    config = config_from_args(a)
    app = create_app(config)
    mp = app.state.engines[0].predictor
    for s in mp.skipped:
        print(f"anymc3d: skipped plugin {s['name']}: {s['reason']}", file=sys.stderr)
    print(f"backbone {mp.backbone.name} ({mp.backbone.fingerprint}) loaded once on {mp.attached[0].runtime.device}; "
          f"tasks: {', '.join(mp.tasks)}", file=sys.stderr)
    for w in warnings_for(a, config):
        print(f"anymc3d: warning: {w}", file=sys.stderr)
    ws = app.state.workspace
    if ws.removed:
        print(f"anymc3d: removed {len(ws.removed)} folder(s) left by earlier services", file=sys.stderr)
    scheme = "https" if a.ssl_certfile else "http"
    print(f"serving on {scheme}://{a.host}:{a.port}{a.root_path}/  (API schema: /openapi.json; accepted Host "
          f"headers: {', '.join(config.allowed_hosts)})", file=sys.stderr)
    tls = {"ssl_certfile": str(a.ssl_certfile), "ssl_keyfile": str(a.ssl_keyfile)} if a.ssl_certfile else {}
    uvicorn.run(app, host=a.host, port=a.port, root_path=a.root_path, log_level="info",
                timeout_graceful_shutdown=10, **tls)
    return 0
