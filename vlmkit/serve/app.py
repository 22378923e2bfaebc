"""The OpenAI-compatible HTTP app: /v1/chat/completions, /v1/models, /health and the chat page.

This module is the HTTP side: routes, the API key, the request-body limit and the error handlers.
What a chat completion does (request -> prompt -> scheduler -> answer) is serve/serving.py's; the
request and response shapes are serve/protocol.py's; the limits and their defaults
serve/settings.py's.

Every error is OpenAI's JSON shape `{"error": {"message", "type", "param", "code"}}`: 400 bad
input, 401 missing or wrong API key, 404 unknown path, 413 body or image too large, 422 schema
violation, 429 queue full, 500 a failure inside generation. A bad request affects only itself.
"""

from __future__ import annotations

import json
import logging
import secrets
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from vlmkit.infer.engine import Engine
from vlmkit.serve.protocol import APIError, ChatCompletionRequest, error_body
from vlmkit.serve.scheduler import Scheduler
from vlmkit.serve.serving import ChatServing
from vlmkit.serve.settings import ServerSettings

log = logging.getLogger("vlmkit.serve")
STATIC_DIR = Path(__file__).parent / "static"
BEARER = "bearer "
"""The Authorization scheme of API keys, lower-cased (the scheme is case-insensitive)."""
SCHEMA_ERRORS_SHOWN = 5
"""Schema violations a 422's message lists (the first one also names the `param`)."""


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


async def _send_json(send, status: int, body: dict) -> None:
    data = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]})
    await send({"type": "http.response.body", "body": data})


def create_app(engine: Engine, settings: ServerSettings | None = None) -> FastAPI:
    """The app around a ready engine. The scheduler thread starts with the app and stops with it."""
    settings = settings or ServerSettings()
    scheduler = Scheduler(engine, max_batch=settings.max_batch, max_queue=settings.max_queue)
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
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_body_bytes)
    _install_error_handlers(app)

    def check_key(request: Request) -> None:
        if settings.api_key is None:
            return
        auth = request.headers.get("authorization", "")
        given = auth[len(BEARER):].strip() if auth.lower().startswith(BEARER) else ""
        if not given:
            raise APIError(401, "missing API key: send the header 'Authorization: Bearer <key>'",
                           "invalid_request_error", None, "invalid_api_key")
        if not secrets.compare_digest(given.encode(), settings.api_key.encode()):
            raise APIError(401, "incorrect API key", "invalid_request_error", None, "invalid_api_key")

    @app.get("/", response_class=HTMLResponse)
    def index() -> HTMLResponse:
        return HTMLResponse((STATIC_DIR / "index.html").read_text(encoding="utf-8"))

    @app.get("/health")
    def health() -> dict:
        return {"status": "ok", "model": settings.model_name, "running": scheduler.num_running,
                "waiting": scheduler.num_waiting}

    @app.get("/v1/models")
    def models(request: Request) -> dict:
        check_key(request)
        return {"object": "list", "data": [{"id": settings.model_name, "object": "model", "created": 0,
                                            "owned_by": "vlmkit"}]}

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        check_key(request)
        answer = await serving.create(body)
        if body.stream:
            return StreamingResponse(answer, media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        return answer

    return app


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError):
        return JSONResponse(exc.body(), status_code=exc.status)

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
