"""The OpenAI-compatible HTTP app: /v1/chat/completions, /v1/models, /health and the chat page.

Request handlers validate and tokenise (images decoded and checked here, in a worker thread),
then hand the prompt to the scheduler thread, which runs every request's decode steps in one
continuously changing batch (serve/scheduler.py). Answers go back as one JSON body or, with
`stream: true`, as server-sent events in OpenAI's `chat.completion.chunk` format ending with an
optional usage chunk (stream_options.include_usage) and `data: [DONE]`.

Every error is OpenAI's JSON shape `{"error": {"message", "type", "param", "code"}}`: 400 bad
input, 401 missing or wrong API key, 404 unknown path, 413 body or image too large, 422 schema
violation, 429 queue full, 500 a failure inside generation. A bad request affects only itself.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, AsyncIterator

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from vlmkit.errors import VlmkitError
from vlmkit.infer.engine import Engine, Prompt
from vlmkit.infer.sampling import SamplingParams
from vlmkit.serve.images import ImageLimits, resolve_image
from vlmkit.serve.scheduler import Event, QueueFullError, Scheduler
from vlmkit.serve.schemas import APIError, ChatCompletionRequest, bad_request, error_body

log = logging.getLogger("vlmkit.serve")
STATIC_DIR = Path(__file__).parent / "static"


@dataclass
class ServerSettings:
    model_name: str = "vlmkit"
    """The id /v1/models reports and responses carry."""
    api_key: str | None = None
    """When set, /v1/* needs `Authorization: Bearer <key>`."""
    max_batch: int = 8
    """Rows decoded together by the scheduler (1 = one request at a time)."""
    max_queue: int = 64
    """Requests waiting for a row; more get 429."""
    max_body_bytes: int = 32 * 1024 * 1024
    """Largest request body."""
    max_tokens_cap: int = 2048
    """Largest max_tokens a request may ask for."""
    images: ImageLimits = field(default_factory=ImageLimits)


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
        given = auth[7:].strip() if auth.lower().startswith("bearer ") else ""
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
        prompt, params = await run_in_threadpool(_prepare, engine, settings, body)
        events: asyncio.Queue[Event] = asyncio.Queue()
        loop = asyncio.get_running_loop()
        try:
            ticket = scheduler.submit(prompt, params, lambda e: loop.call_soon_threadsafe(events.put_nowait, e))
        except QueueFullError as e:
            raise APIError(429, str(e), "rate_limit_error", None, "queue_full") from None
        completion_id = f"chatcmpl-{uuid.uuid4().hex}"
        created = int(time.time())
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            chunks = _stream_chunks(events, completion_id, created, settings.model_name, include_usage)
            return StreamingResponse(_cancel_on_exit(chunks, scheduler, ticket), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        try:
            text, last = await _collect(events)
        finally:
            scheduler.cancel(ticket)
        return {"id": completion_id, "object": "chat.completion", "created": created, "model": settings.model_name,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                             "logprobs": None, "finish_reason": last.finish_reason}],
                "usage": _usage(last)}

    return app


def _prepare(engine: Engine, settings: ServerSettings, body: ChatCompletionRequest) -> tuple[Prompt, SamplingParams]:
    """Validate a request beyond its schema and tokenise it (runs in a worker thread)."""
    if body.n != 1:
        raise bad_request(f"n={body.n} is not supported; this server returns one choice (n=1)", "n")
    stop = body.stop_list()
    if len(stop) > 4 or any(not s for s in stop):
        raise bad_request("stop must be a string or a list of at most 4 non-empty strings", "stop")
    max_tokens = body.requested_max_tokens()
    if max_tokens is not None and max_tokens > settings.max_tokens_cap:
        raise bad_request(f"max_tokens {max_tokens} is over this server's limit of {settings.max_tokens_cap}",
                          "max_tokens")
    messages = _to_engine_messages(body, settings.images)
    try:
        prompt = engine.prepare(messages)
    except VlmkitError as e:
        raise bad_request(str(e), "messages") from None
    room = engine.max_positions - len(prompt.input_ids)
    if max_tokens is None:
        max_tokens = min(settings.max_tokens_cap, room)
    if room < 1 or max_tokens > room:
        raise bad_request(f"the prompt has {len(prompt.input_ids)} tokens; with max_tokens {max_tokens} it exceeds "
                          f"the model's context of {engine.max_positions} tokens", "messages",
                          "context_length_exceeded")
    params = SamplingParams(max_new_tokens=max_tokens, temperature=body.temperature, top_p=body.top_p,
                            top_k=body.top_k, repetition_penalty=body.repetition_penalty, seed=body.seed,
                            stop=stop, ignore_eos=body.ignore_eos)
    return prompt, params


def _to_engine_messages(body: ChatCompletionRequest, limits: ImageLimits) -> list[dict]:
    """OpenAI request messages -> the engine's message dicts, with images decoded."""
    out, n_images = [], 0
    for i, msg in enumerate(body.messages):
        if msg.content is None or isinstance(msg.content, str):
            out.append({"role": msg.role, "content": msg.content or ""})
            continue
        parts: list[dict[str, Any]] = []
        for j, part in enumerate(msg.content):
            param = f"messages[{i}].content[{j}]"
            if part.type == "text":
                parts.append({"type": "text", "text": part.text})
                continue
            n_images += 1
            if n_images > limits.max_images:
                raise bad_request(f"{param}: more than {limits.max_images} images in one request", param,
                                  "too_many_images")
            if msg.role != "user":
                raise bad_request(f"{param}: images are allowed in user messages only", param)
            parts.append({"type": "image", "image": resolve_image(part.image_url.url, limits, param)})
        out.append({"role": msg.role, "content": parts})
    return out


def _usage(event: Event) -> dict:
    return {"prompt_tokens": event.prompt_tokens, "completion_tokens": event.completion_tokens,
            "total_tokens": event.prompt_tokens + event.completion_tokens}


async def _collect(events: asyncio.Queue) -> tuple[str, Event]:
    pieces = []
    while True:
        event = await events.get()
        if event.error is not None:
            raise APIError(500, event.error, "server_error", None, "generation_failed")
        pieces.append(event.delta)
        if event.finish_reason is not None:
            return "".join(pieces), event


async def _stream_chunks(events: asyncio.Queue, completion_id: str, created: int, model: str,
                         include_usage: bool) -> AsyncIterator[str]:
    def chunk(delta: dict, finish_reason: str | None) -> str:
        body = {"id": completion_id, "object": "chat.completion.chunk", "created": created, "model": model,
                "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]}
        if include_usage:
            body["usage"] = None
        return f"data: {json.dumps(body)}\n\n"

    yield chunk({"role": "assistant", "content": ""}, None)
    while True:
        event = await events.get()
        if event.error is not None:
            yield f"data: {json.dumps(error_body(event.error, 'server_error', None, 'generation_failed'))}\n\n"
            break
        if event.delta:
            yield chunk({"content": event.delta}, None)
        if event.finish_reason is not None:
            yield chunk({}, event.finish_reason)
            if include_usage:
                usage = {"id": completion_id, "object": "chat.completion.chunk", "created": created, "model": model,
                         "choices": [], "usage": _usage(event)}
                yield f"data: {json.dumps(usage)}\n\n"
            break
    yield "data: [DONE]\n\n"


async def _cancel_on_exit(chunks: AsyncIterator[str], scheduler: Scheduler, ticket) -> AsyncIterator[str]:
    """Whatever ends the stream (done, client gone, server stopping) frees the request's row."""
    try:
        async for piece in chunks:
            yield piece
    finally:
        scheduler.cancel(ticket)


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
                                f"{e.get('msg', 'invalid')}" for e in errors[:5])
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
