"""What every HTTP request passes before a route: one log line and the request metrics; 503
while the model loads or the server shuts down; bearer auth; the body size limit (413)."""

from __future__ import annotations

import hmac
import json
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from templated_llm.serving.metrics import Metrics
from templated_llm.serving.openai_responses import error_body

_logger = logging.getLogger("templated_llm.serving")

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

#: The scope key under which a route finds its request's :class:`Record`.
RECORD = "templated_llm.record"
_ROUTES = ("/v1/chat/completions", "/v1/completions", "/v1/models", "/invocations", "/ping",
           "/health", "/version", "/metrics")
_OPEN = ("/ping", "/health", "/version", "/metrics")  # no auth: probes and scrapers


@dataclass
class Record:
    """What the log line says of a request; routes fill in what they know."""

    id: str = field(default_factory=lambda: uuid.uuid4().hex[:16])
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    ttft: float | None = None
    outcome: str = ""  # how a stream ended, when not by itself


def route_of(path: str) -> str:
    """A bounded metric label for ``path``."""
    if path in _ROUTES:
        return path
    return "/v1/models/{model}" if path.startswith("/v1/models/") else "other"


class Gate:
    """ASGI middleware in front of the app. ``available()`` says why the server takes no
    requests now (loading, shutting down), or None when it does."""

    def __init__(self, app: ASGIApp, metrics: Metrics, *, api_key: str | None, max_body_bytes: int,
                 available: Callable[[], str | None]) -> None:
        self._app = app
        self._metrics = metrics
        self._api_key = api_key
        self._max_body = max_body_bytes
        self._available = available

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self._app(scope, receive, send)
            return
        record = scope[RECORD] = Record()
        start, status = time.perf_counter(), [500]

        async def send_and_watch(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
                message["headers"] = [*message.get("headers", ()), (b"x-request-id", record.id.encode())]
            await send(message)

        try:
            await self._admit(scope, receive, send_and_watch)
        finally:
            self._finish(scope, record, status[0], time.perf_counter() - start)

    async def _admit(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope["path"]
        if path != "/metrics" and (why := self._available()):
            await _refuse(send, path, 503, why, "server_error", "unavailable")
            return
        if self._api_key and path not in _OPEN and not self._authorized(scope):
            await _refuse(send, path, 401, "a valid API key is required: send the header "
                          "'Authorization: Bearer <key>'", "invalid_request_error", "invalid_api_key")
            return
        if scope["method"] in ("POST", "PUT", "PATCH"):
            body = await _read_body(scope, receive, self._max_body)
            if body is None:
                await _refuse(send, path, 413, f"the request body is over the server's limit of "
                              f"{self._max_body} bytes (--max-body-bytes)", "invalid_request_error",
                              "request_too_large")
                return
            receive = _replay(body, receive)
        await self._app(scope, receive, send)

    def _authorized(self, scope: Scope) -> bool:
        # Header bytes against the key's UTF-8 bytes, as clients send a key beyond ASCII.
        scheme, _, token = dict(scope["headers"]).get(b"authorization", b"").partition(b" ")
        return scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), self._api_key.encode())

    def _finish(self, scope: Scope, record: Record, status: int, seconds: float) -> None:
        route = route_of(scope["path"])
        self._metrics.requests.labels(route, str(status)).inc()
        self._metrics.request_seconds.labels(route).observe(seconds)
        tokens = "" if record.prompt_tokens is None else \
            f" prompt_tokens={record.prompt_tokens} completion_tokens={record.completion_tokens}"
        ttft = "" if record.ttft is None else f" ttft_ms={record.ttft * 1000:.0f}"
        outcome = f" outcome={record.outcome}" if record.outcome else ""
        _logger.info("request id=%s %s %s status=%d%s%s latency_ms=%.0f%s", record.id, scope["method"],
                     route, status, tokens, ttft, seconds * 1000, outcome)


async def _read_body(scope: Scope, receive: Receive, limit: int) -> bytes | None:
    """The whole body, or None once it is over ``limit`` bytes."""
    length = dict(scope["headers"]).get(b"content-length", b"")
    if length.isdigit() and int(length) > limit:
        return None
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] != "http.request":  # the client left
            return b"".join(chunks)
        chunks.append(message.get("body", b""))
        size += len(chunks[-1])
        if size > limit:
            return None
        if not message.get("more_body", False):
            return b"".join(chunks)


def _replay(body: bytes, receive: Receive) -> Receive:
    sent = False

    async def replay() -> dict[str, Any]:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()  # then wait for the disconnect, as the server would

    return replay


async def _refuse(send: Send, path: str, status: int, message: str, type: str, code: str) -> None:
    if path.startswith("/v1"):
        body = error_body(message, type=type, code=code)
    else:  # MLflow's scoring routes answer MLflow's error shape
        body = json.dumps({"error_code": code.upper(), "message": message}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if status == 401:
        headers.append((b"www-authenticate", b"Bearer"))
    if status == 503:  # loading or shutting down: when clients (the openai SDK) retry
        headers.append((b"retry-after", b"1"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
