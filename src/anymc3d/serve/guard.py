"""ASGI middleware that decides before the request body is read: bearer token (401), body size (413,
from Content-Length at once, else counted while the body streams in) and admission to the bounded
queue (503 with Retry-After). Only ``/v1/...`` needs the token; ``/``, ``/static``, ``/healthz`` and the
OpenAPI schema are public (they hold no patient data)."""
from __future__ import annotations

import json
import secrets

from .jobs import Admission


def _too_large(limit: int):
    # an HTTPException: FastAPI passes it through its body parsing (any other error there becomes a 400)
    from starlette.exceptions import HTTPException

    return HTTPException(413, f"request body larger than the service's limit of {mib(limit)} "
                              f"(--max-upload-mb)", headers={"Connection": "close"})


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


class Guard:
    def __init__(self, app, token: str | None, max_body: int, admission: Admission,
                 predict_path: str = "/v1/predict") -> None:
        self.app, self.token, self.max_body, self.admission = app, token, int(max_body), admission
        self.predict_path = predict_path

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope.get("path", "")
        root = scope.get("root_path", "").rstrip("/")
        if root and path.startswith(root + "/"):  # a proxy that forwards the prefix (the router strips it too)
            path = path[len(root):]
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

        async def counted_receive():
            nonlocal seen
            msg = await receive()
            if msg["type"] == "http.request":
                seen += len(msg.get("body", b""))
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
        except Exception as exc:  # the 413 of counted_receive, when it surfaces outside FastAPI's handlers
            if getattr(exc, "status_code", None) != 413 or started:
                raise
            await _send_json(send, 413, exc.detail, {"Connection": "close"})
        finally:
            if admitted:
                self.admission.release()
