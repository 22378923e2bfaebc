"""The OpenAI-compatible HTTP app: /v1/chat/completions, /v1/models, /health, /metrics and the chat page.

This module is the HTTP side: routes, the API key, the error handlers and a request's link to its
connection (a client that goes away cancels its request, freeing its row). The middleware in front
of the routes (admission, body-size limit, status counts) is serve/middleware.py's; what a chat
completion does (request -> prompt -> scheduler -> answer) is serve/serving.py's; the request and
response shapes are serve/protocol.py's; the limits and their defaults serve/settings.py's; the
metrics serve/metrics.py's.

Every error is OpenAI's JSON shape `{"error": {"message", "type", "param", "code"}}`: 400 bad
input, 401 missing or wrong API key, 404 unknown path, 413 body or image too large, 422 schema
violation, 429 too many requests in flight (with Retry-After), 500 a failure inside generation,
503 shutting down (with Retry-After), 504 past the request timeout. A bad request affects only itself.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import secrets
from pathlib import Path
from typing import Awaitable, TypeVar

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException as StarletteHTTPException

from vlmkit.infer.engine import Engine
from vlmkit.serve.metrics import CLIENT_CLOSED_REQUEST, ServerMetrics
from vlmkit.serve.middleware import Admission, BodySizeLimit, StatusCounter
from vlmkit.serve.protocol import APIError, ChatCompletionRequest, error_body
from vlmkit.serve.scheduler import Scheduler
from vlmkit.serve.serving import ChatServing, EventStream
from vlmkit.serve.settings import ServerSettings

log = logging.getLogger("vlmkit.serve")
STATIC_DIR = Path(__file__).parent / "static"
CHAT_PATH = "/v1/chat/completions"
BEARER = "bearer "
"""The Authorization scheme of API keys, lower-cased (the scheme is case-insensitive)."""
SCHEMA_ERRORS_SHOWN = 5
"""Schema violations a 422's message lists (the first one also names the `param`)."""
T = TypeVar("T")


class ClientGone(Exception):
    """The client closed its connection before its answer."""


class ClosingStream(StreamingResponse):
    """Server-sent events that free their request however the response ends: answered, the client
    gone (Starlette cancels the stream when the connection closes), or never started."""

    def __init__(self, stream: EventStream):
        super().__init__(stream.events, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.close = stream.close

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.close()


async def until_disconnected(request: Request, work: Awaitable[T]) -> T:
    """`work`'s result, or ClientGone once the client closes its connection first; `work` is then
    cancelled, so that its `finally` frees what it holds (a non-streamed answer's row)."""
    task = asyncio.ensure_future(work)
    watch = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:  # also when this request is cancelled itself (a shutdown past its grace period)
        watch.cancel()
        if not task.done():
            task.cancel()
            await asyncio.wait({task})
    if task.cancelled():
        raise ClientGone()
    return task.result()


async def _disconnected(request: Request) -> None:
    """Returns when the client closes its connection (the body is read: only that message is left)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _key_digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


def create_app(engine: Engine, settings: ServerSettings | None = None) -> FastAPI:
    """The app around a ready engine. The scheduler thread starts with the app and stops with it."""
    settings = settings or ServerSettings()
    metrics = ServerMetrics()
    scheduler = Scheduler(engine, max_batch=settings.max_batch, max_queue=settings.max_queue,
                          timeout_s=settings.request_timeout_s, metrics=metrics)
    serving = ChatServing(engine, scheduler, settings)

    async def lifespan(app):
        scheduler.start()
        try:
            yield
        finally:
            scheduler.stop()

    app = FastAPI(title="vlmkit", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.scheduler = scheduler
    app.state.settings = settings
    app.state.metrics = metrics
    routes: set[str] = set()  # filled below, once the routes exist; StatusCounter labels by it
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_body_bytes)
    app.add_middleware(Admission, path=CHAT_PATH, scheduler=scheduler,
                       capacity=settings.max_batch + settings.max_queue, retry_after_s=settings.retry_after_s)
    app.add_middleware(StatusCounter, metrics=metrics, paths=routes)
    _install_error_handlers(app)
    expected_key = _key_digest(settings.api_key) if settings.api_key is not None else None

    def check_key(request: Request) -> None:
        if expected_key is None:
            return
        auth = request.headers.get("authorization", "")
        given = auth[len(BEARER):].strip() if auth.lower().startswith(BEARER) else ""
        if not given:
            raise APIError(401, "missing API key: send the header 'Authorization: Bearer <key>'",
                           "invalid_request_error", None, "invalid_api_key")
        # digests of equal length, compared in constant time: the time taken tells nothing of the key
        if not secrets.compare_digest(_key_digest(given), expected_key):
            raise APIError(401, "incorrect API key", "invalid_request_error", None, "invalid_api_key")

    @app.get("/", response_class=HTMLResponse)
    def index() -> HTMLResponse:
        return HTMLResponse((STATIC_DIR / "index.html").read_text(encoding="utf-8"))

    @app.get("/health")
    def health() -> JSONResponse:
        """200 while the server takes requests; 503 while it drains or once its scheduler stopped."""
        status = "draining" if scheduler.draining else "ok" if scheduler.alive else "down"
        return JSONResponse({"status": status, "model": settings.model_name, "running": scheduler.num_running,
                             "waiting": scheduler.num_waiting}, status_code=200 if status == "ok" else 503)

    @app.get("/metrics")
    def prometheus_metrics() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    def models(request: Request) -> dict:
        check_key(request)
        return {"object": "list", "data": [{"id": settings.model_name, "object": "model", "created": 0,
                                            "owned_by": "vlmkit"}]}

    @app.post(CHAT_PATH)
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        check_key(request)
        answer = await until_disconnected(request, serving.create(body))
        return ClosingStream(answer) if isinstance(answer, EventStream) else answer

    routes.update(route.path for route in app.routes)
    return app


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError):
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(ClientGone)
    async def client_gone(request: Request, exc: ClientGone):
        return Response(status_code=CLIENT_CLOSED_REQUEST)  # nobody reads it; counted in the metrics

    @app.exception_handler(RequestValidationError)
    async def schema_error(request: Request, exc: RequestValidationError):
        errors = exc.errors()
        first = errors[0] if errors else {}
        loc = [str(p) for p in first.get("loc", ()) if p != "body"]
        param = ".".join(loc) or None
        if first.get("type") == "json_invalid":
            message = f"the request body is not valid JSON: {first.get('msg', '')}"
        else:
            message = "; ".join(f"{'.'.join(str(p) for p in e.get('loc', ()) if p != 'body') or 'body'}: "
                                f"{e.get('msg', 'invalid')}" for e in errors[:SCHEMA_ERRORS_SHOWN])
        return JSONResponse(error_body(message, "invalid_request_error", param, "invalid_schema"), status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return JSONResponse(error_body(str(exc.detail), kind, None, None), status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception):
        log.exception("unhandled error on %s", request.url.path)
        return JSONResponse(error_body(f"internal error: {type(exc).__name__}", "server_error", None, None),
                            status_code=500)
