"""ASGI middleware in front of every request: the token, the size limit, security headers and
the request metrics.

Token policy (docs/serve.md): requests that change state (POST, PUT, PATCH, DELETE, except
POST /v1/predict, which only reads) always need `Authorization: Bearer TOKEN`; when the server
listens beyond loopback every request does, except the page's own static files (`/`,
`/static/...`), which hold no data and which a browser cannot fetch with a header. No token:
401; a wrong one: 403. Tokens are compared in constant time.

Bodies larger than the limit get 413 before they are read when they declare their length, and
as soon as the limit is crossed otherwise.
"""

from __future__ import annotations

import hmac
import json
import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from starlette.datastructures import Headers, MutableHeaders
from starlette.exceptions import HTTPException

from mtl_edge.serve.errors import error_body
from mtl_edge.serve.metrics import Metrics

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

WRITE_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})
READ_ONLY_POSTS = frozenset({"/v1/predict"})
PAGE_PATHS = frozenset({"/", "/index.html", "/favicon.ico"})
#: Served with every answer. The page may load and connect to this server only.
SECURITY_HEADERS = {
    "content-security-policy": (
        "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' blob: data:; "
        "media-src 'self' blob:; connect-src 'self'; object-src 'none'; base-uri 'none'; "
        "form-action 'self'; frame-ancestors 'none'"
    ),
    "x-content-type-options": "nosniff",
    "x-frame-options": "DENY",
    "referrer-policy": "no-referrer",
    "permissions-policy": "camera=(self), microphone=(), geolocation=()",
}
UNAUTHORIZED = (
    "this request needs the API token: send the header 'Authorization: Bearer TOKEN' (the "
    "token `mtl-edge serve` printed at start, or its $MTL_EDGE_SERVE_TOKEN)"
)
FORBIDDEN = (
    "wrong API token: use the one `mtl-edge serve` printed at start, or its $MTL_EDGE_SERVE_TOKEN"
)


def needs_token(method: str, path: str, token_for_reads: bool) -> bool:
    """Whether a request must carry the token (see the module docstring)."""
    if path in PAGE_PATHS or path.startswith("/static/"):
        return False
    if token_for_reads:
        return True
    return method in WRITE_METHODS and path not in READ_ONLY_POSTS


def route_label(scope: Scope) -> str:
    """The route template ("/v1/classes/{name}"), never the raw path (bounded label values)."""
    route = scope.get("route")
    path = getattr(route, "path", None)
    if path:
        return str(path)
    return "/static" if str(scope.get("path", "")).startswith("/static/") else "unmatched"


class Guard:
    """The middleware. Args: the app, the token, whether reads need it, the body limit, the
    metrics to count requests in."""

    def __init__(
        self,
        app: ASGIApp,
        token: str,
        token_for_reads: bool,
        max_request_bytes: int,
        metrics: Metrics,
    ) -> None:
        self.app = app
        self.token = token.encode()
        self.token_for_reads = token_for_reads
        self.max_request_bytes = max_request_bytes
        self.metrics = metrics

    def _refusal(self, scope: Scope) -> tuple[int, str, dict[str, str]] | None:
        headers = Headers(scope=scope)
        method, path = scope["method"], scope["path"]
        if needs_token(method, path, self.token_for_reads):
            auth = headers.get("authorization", "")
            scheme, _, given = auth.partition(" ")
            if scheme.lower() != "bearer" or not given.strip():
                return 401, UNAUTHORIZED, {"www-authenticate": "Bearer"}
            if not hmac.compare_digest(given.strip().encode(), self.token):
                return 403, FORBIDDEN, {}
        length = headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > self.max_request_bytes:
            return 413, self._too_large(int(length)), {"connection": "close"}
        return None

    def _too_large(self, size: int | None) -> str:
        what = f"{size} bytes" if size is not None else "the request body"
        return (
            f"{what} is over the limit of {self.max_request_bytes} bytes (--max-request-mb); "
            "send fewer or smaller images per request"
        )

    def _limited(self, receive: Receive) -> Receive:
        seen = 0

        async def limited() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_request_bytes:
                    raise HTTPException(413, self._too_large(None))
            return message

        return limited

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500

        async def send_with_headers(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = MutableHeaders(scope=message)
                for key, value in SECURITY_HEADERS.items():
                    headers.setdefault(key, value)
                if scope["path"].startswith("/v1/"):
                    headers.setdefault("cache-control", "no-store")
            await send(message)

        refusal = None
        try:
            refusal = self._refusal(scope)
            if refusal is None:
                await self.app(scope, self._limited(receive), send_with_headers)
            else:
                code, message, extra = refusal
                body = json.dumps(error_body(code, message)).encode()
                headers = [(b"content-type", b"application/json")]
                headers += [(k.encode(), v.encode()) for k, v in extra.items()]
                headers.append((b"content-length", str(len(body)).encode()))
                await send_with_headers(
                    {"type": "http.response.start", "status": code, "headers": headers}
                )
                await send_with_headers({"type": "http.response.body", "body": body})
        finally:
            route = "refused" if refusal is not None else route_label(scope)
            self.metrics.requests.labels(scope["method"], route, str(status)).inc()
            self.metrics.request_seconds.labels(route).observe(time.perf_counter() - start)
