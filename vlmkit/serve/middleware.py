"""ASGI middleware of the app, outermost first: what every request passes before its route.

    StatusCounter   counts each HTTP request by route and status code (serve/metrics.py)
    Admission       at most `capacity` chat completions in flight: past it a 429, while the server
                    drains a 503, both with Retry-After and sent before the body is read, so a
                    flood of requests holds no memory beyond their headers
    BodySizeLimit   413 for bodies over the limit, by Content-Length or while streaming in

Each answers in OpenAI's error shape (serve/protocol.py).
"""

from __future__ import annotations

import json

from vlmkit.serve.metrics import CLIENT_CLOSED_REQUEST, ServerMetrics
from vlmkit.serve.protocol import APIError, busy, error_body, shutting_down
from vlmkit.serve.scheduler import SHUTTING_DOWN, Scheduler

OTHER_PATH = "other"
"""The path label of requests to no route (unbounded paths would make unbounded label sets)."""


class StatusCounter:
    """Counts every HTTP request by route and status; a response never started (its client went
    away) counts as CLIENT_CLOSED_REQUEST."""

    def __init__(self, app, metrics: ServerMetrics, paths: set[str]):
        self.app = app
        self.metrics = metrics
        self.paths = paths

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = CLIENT_CLOSED_REQUEST

        async def counting_send(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, counting_send)
        finally:
            path = scope["path"] if scope["path"] in self.paths else OTHER_PATH
            self.metrics.http_requests.labels(path, str(status)).inc()


class Admission:
    """At most `capacity` requests to `path` in flight (being prepared, waiting or decoding)."""

    def __init__(self, app, path: str, scheduler: Scheduler, capacity: int, retry_after_s: int):
        self.app = app
        self.path = path
        self.scheduler = scheduler
        self.capacity = capacity
        self.retry_after_s = retry_after_s
        self.in_flight = 0

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] != self.path:
            return await self.app(scope, receive, send)
        if self.scheduler.draining:
            return await send_error(send, shutting_down(f"{SHUTTING_DOWN}; retry later", self.retry_after_s))
        if self.in_flight >= self.capacity:
            return await send_error(send, busy(f"the server is busy: {self.in_flight} requests are in flight "
                                               f"(limit {self.capacity}); retry later", self.retry_after_s))
        self.in_flight += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.in_flight -= 1


class BodySizeLimit:
    """ASGI middleware: 413 for bodies over the limit, by Content-Length or while streaming in."""

    def __init__(self, app, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            return await _send_json(send, 413, self._message(int(declared)))
        received = 0

        async def limited_receive():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise _BodyTooLarge()
            return message

        try:
            await self.app(scope, limited_receive, send)
        except _BodyTooLarge:
            await _send_json(send, 413, self._message(received))

    def _message(self, size: int) -> dict:
        return error_body(f"request body of {size} bytes is over the limit of {self.max_bytes} bytes",
                          "invalid_request_error", None, "request_too_large")


class _BodyTooLarge(Exception):
    pass


async def send_error(send, error: APIError) -> None:
    await _send_json(send, error.status, error.body(), error.headers or {})


async def _send_json(send, status: int, body: dict, headers: dict[str, str] | None = None) -> None:
    data = json.dumps(body).encode()
    extra = [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode()),
                            *extra]})
    await send({"type": "http.response.body", "body": data})
