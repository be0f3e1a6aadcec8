"""ASGI middleware that decides before the request body is read: the Origin of a browser request
(403 unless the service's own or one of ``--allowed-origins``), bearer token (401), body size (413,
from Content-Length at once, else counted while the body streams in) and admission to the bounded
queue (503 with Retry-After); then, while the body streams in, the upload deadline and minimum rate
(408: a slow client cannot hold a queue slot). Only ``/v1/...`` needs the token and the origin check;
``/``, ``/static``, ``/healthz`` and the OpenAPI schema are public (they hold no patient data).

:class:`SecurityHeaders` adds the browser protections to every response (CSP, nosniff, no framing,
no referrer)."""
from __future__ import annotations

import asyncio
import json
import secrets
import time

from .jobs import Admission


def _too_large(limit: int):
    # an HTTPException: FastAPI passes it through its body parsing (any other error there becomes a 400)
    from starlette.exceptions import HTTPException

    return HTTPException(413, f"request body larger than the service's limit of {mib(limit)} "
                              f"(--max-upload-mb)", headers={"Connection": "close"})


def _timeout(detail: str):
    from starlette.exceptions import HTTPException

    return HTTPException(408, detail, headers={"Connection": "close"})


def mib(n: int) -> str:
    return f"{n / 2**20:.3g} MiB"


def _header(scope, name: bytes) -> str | None:
    for k, v in scope.get("headers") or []:
        if k.lower() == name:
            return v.decode("latin-1")
    return None


def token_ok(authorization: str | None, token: str | None) -> bool:
    if token is None:
        return True
    if not authorization or not authorization.lower().startswith("bearer "):
        return False
    return secrets.compare_digest(authorization[7:].strip().encode(), token.encode())


async def _send_json(send, status: int, detail: str, headers: dict | None = None) -> None:
    body = json.dumps({"detail": detail}).encode()
    hdrs = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    hdrs += [(k.lower().encode(), str(v).encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": hdrs})
    await send({"type": "http.response.body", "body": body})


_DEFAULT_PORT = {"http": "80", "https": "443", "ws": "80", "wss": "443"}


def normal_origin(origin: str) -> str:
    """``scheme://host[:port]`` lowercased, without a default port."""
    origin = origin.strip().rstrip("/").lower()
    scheme, sep, rest = origin.partition("://")
    if not sep:
        return origin
    port = _DEFAULT_PORT.get(scheme)
    if port and rest.endswith(":" + port) and not rest.endswith("]"):
        rest = rest[: -len(port) - 1]
    return f"{scheme}://{rest}"


def origin_ok(scope, origin: str | None, allowed: list[str]) -> bool:
    """No Origin (not a cross-site browser request), the service's own origin (scheme + Host header), or
    one of ``allowed`` ('*': any)."""
    if origin is None:
        return True
    if "*" in allowed:
        return True
    got = normal_origin(origin)
    own = normal_origin(f"{scope.get('scheme', 'http')}://{_header(scope, b'host') or ''}")
    return got == own or got in {normal_origin(a) for a in allowed}


#: the viewer (static/): scripts and styles from this service only; NiiVue decodes some formats with
#: WebAssembly (instantiated from data: URLs), draws into blob:/data: images; no framing, no plugins
CSP = ("default-src 'self'; script-src 'self' 'wasm-unsafe-eval'; style-src 'self' 'unsafe-inline'; "
       "img-src 'self' data: blob:; connect-src 'self' data: blob:; worker-src 'self' blob:; "
       "font-src 'self' data:; object-src 'none'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
SECURITY_HEADERS = [(b"content-security-policy", CSP.encode()), (b"x-content-type-options", b"nosniff"),
                    (b"x-frame-options", b"DENY"), (b"referrer-policy", b"no-referrer"),
                    (b"cross-origin-opener-policy", b"same-origin"),
                    (b"cross-origin-resource-policy", b"same-origin")]


class SecurityHeaders:
    """Pure ASGI middleware: :data:`SECURITY_HEADERS` on every HTTP response (errors included)."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def send_with_headers(msg):
            if msg["type"] == "http.response.start":
                names = {k.lower() for k, _ in msg.get("headers", [])}
                msg = {**msg, "headers": [*msg.get("headers", []),
                                          *[(k, v) for k, v in SECURITY_HEADERS if k not in names]]}
            await send(msg)

        await self.app(scope, receive, send_with_headers)


class Guard:
    def __init__(self, app, token: str | None, max_body: int, admission: Admission,
                 predict_path: str = "/v1/predict", allowed_origins: list[str] | None = None,
                 upload_timeout_s: float = 120.0, min_rate_bps: float = 0.0, rate_grace_s: float = 10.0) -> None:
        self.app, self.token, self.max_body, self.admission = app, token, int(max_body), admission
        self.predict_path = predict_path
        self.allowed_origins = list(allowed_origins or [])
        self.upload_timeout_s, self.min_rate_bps, self.rate_grace_s = float(upload_timeout_s), float(min_rate_bps), float(rate_grace_s)
        self.timed_out = 0

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope.get("path", "")
        root = scope.get("root_path", "").rstrip("/")
        if root and path.startswith(root + "/"):  # a proxy that forwards the prefix (the router strips it too)
            path = path[len(root):]
        if path.startswith("/v1/") and not origin_ok(scope, _header(scope, b"origin"), self.allowed_origins):
            return await _send_json(send, 403, "cross-origin request refused: the Origin header is not this "
                                               "service's origin (add it with --allowed-origins)")
        if path.startswith("/v1/") and not token_ok(_header(scope, b"authorization"), self.token):
            return await _send_json(send, 401, "missing or wrong bearer token (Authorization: Bearer <token>)",
                                    {"WWW-Authenticate": "Bearer"})
        length = _header(scope, b"content-length")
        try:
            too_big = length is not None and int(length) > self.max_body
        except ValueError:
            return await _send_json(send, 400, "bad Content-Length header")
        if too_big:
            return await _send_json(send, 413, f"request body of {mib(int(length))} is larger than the "
                                               f"service's limit of {mib(self.max_body)} (--max-upload-mb)",
                                    {"Connection": "close"})
        admitted = False
        if scope.get("method") == "POST" and path == self.predict_path:
            if not self.admission.try_acquire():
                return await _send_json(send, 503, "the service is busy (request queue full); retry later",
                                        {"Retry-After": self.admission.retry_after_s()})
            admitted = True

        seen = 0
        started = False
        body_done = False
        t0 = time.monotonic()

        async def timed(awaitable):
            """``receive()`` within the upload deadline and above the minimum rate (408 otherwise)."""
            elapsed = time.monotonic() - t0
            wait = self.upload_timeout_s - elapsed
            if self.min_rate_bps > 0:  # the moment the average rate would fall below the minimum
                wait = min(wait, max(self.rate_grace_s, seen / self.min_rate_bps) - elapsed)
            try:
                return await asyncio.wait_for(awaitable, timeout=max(wait, 0.0))
            except asyncio.TimeoutError:
                self.timed_out += 1
                elapsed = time.monotonic() - t0
                if elapsed >= self.upload_timeout_s - 1e-3:
                    raise _timeout(f"upload not complete after {self.upload_timeout_s:g} s (--upload-timeout); "
                                   f"{mib(seen)} received") from None
                raise _timeout(f"upload too slow: {seen / 1024 / max(elapsed, 1e-9):.3g} KiB/s after {elapsed:.0f} s, "
                               f"under the minimum of {self.min_rate_bps / 1024:g} KiB/s (--min-upload-rate)") from None

        async def counted_receive():
            nonlocal seen, body_done
            msg = await (timed(receive()) if admitted and not body_done else receive())
            if msg["type"] == "http.request":
                seen += len(msg.get("body", b""))
                if not msg.get("more_body", False):
                    body_done = True
                if seen > self.max_body:
                    raise _too_large(self.max_body)
            return msg

        async def tracked_send(msg):
            nonlocal started
            if msg["type"] == "http.response.start":
                started = True
            await send(msg)

        try:
            await self.app(scope, counted_receive, tracked_send)
        except Exception as exc:  # the 413 / 408 of counted_receive, when it surfaces outside FastAPI's handlers
            if getattr(exc, "status_code", None) not in (408, 413) or started:
                raise
            await _send_json(send, exc.status_code, exc.detail, {"Connection": "close"})
        finally:
            if admitted:
                self.admission.release()
