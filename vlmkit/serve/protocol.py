"""The OpenAI chat completions protocol: typed requests, response and stream-chunk bodies, errors.

The request models follow the public OpenAI API reference (POST /v1/chat/completions): messages
whose content is a string or a list of `text` / `image_url` parts (and `video_url`, vLLM's form, for
native-resolution models), `max_tokens` (or its newer
name `max_completion_tokens`), `temperature`, `top_p`, `stop`, `seed`, `stream` and
`stream_options.include_usage`. `top_k`, `repetition_penalty` and `ignore_eos` are vlmkit extensions
(as in vLLM). Unknown fields are ignored, as OpenAI-compatible servers usually do, so newer clients
keep working. Pydantic checks types and ranges; a failure becomes a 422 with the field's path.

Responses: a `chat.completion` body, or with `stream: true` server-sent events carrying
`chat.completion.chunk` bodies, an optional usage chunk (stream_options.include_usage) and
`data: [DONE]`. Errors: `{"error": {"message", "type", "param", "code"}}`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Annotated, Literal, Union

from pydantic import BaseModel, ConfigDict, Field

MAX_STOP_STRINGS = 4
"""Most stop strings a request may send (OpenAI's limit)."""


class ImageURL(BaseModel):
    url: str = Field(min_length=1)
    """A data URL (data:image/png;base64,...) or file:///path under the server's --allow-dir."""
    detail: Literal["auto", "low", "high"] | None = None


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ImagePart(BaseModel):
    type: Literal["image_url"]
    image_url: ImageURL


class VideoURL(BaseModel):
    url: str = Field(min_length=1)
    """file:///path under the server's --allow-dir (a video file, a directory of frames, an animated
    image) or a data URL of a video or an animated image (data:video/mp4;base64,...)."""


class VideoPart(BaseModel):
    type: Literal["video_url"]
    video_url: VideoURL


ContentPart = Annotated[Union[TextPart, ImagePart, VideoPart], Field(discriminator="type")]


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant", "developer"]
    content: str | list[ContentPart] | None = None


class StreamOptions(BaseModel):
    include_usage: bool = False


class ChatCompletionRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    top_k: int = Field(default=0, ge=0)
    repetition_penalty: float = Field(default=1.0, gt=0.0)
    ignore_eos: bool = False
    stop: str | list[str] | None = None
    seed: int | None = None
    n: int = Field(default=1, ge=1)
    stream: bool = False
    stream_options: StreamOptions | None = None

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def transcript(self) -> str:
        """The messages' text, one `role: text` line each, media parts as [image_url] / [video_url]
        (what the server logs with --log-prompts)."""
        lines = []
        for message in self.messages:
            parts = message.content if isinstance(message.content, list) else [message.content or ""]
            text = " ".join(p if isinstance(p, str) else p.text if isinstance(p, TextPart) else f"[{p.type}]"
                            for p in parts)
            lines.append(f"{message.role}: {text}")
        return "\n".join(lines)


class APIError(Exception):
    """An error a client caused (or may retry), sent as OpenAI's `{"error": {...}}` body."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers
        """Sent with the error (e.g. Retry-After)."""

    def body(self) -> dict:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, "invalid_request_error", param, code)


def too_large(message: str, param: str | None = None) -> APIError:
    return APIError(413, message, "invalid_request_error", param, "request_too_large")


def busy(message: str, retry_after_s: int) -> APIError:
    """429: too many requests in flight; the client may retry after `retry_after_s` seconds."""
    return APIError(429, message, "rate_limit_error", None, "queue_full", {"Retry-After": str(retry_after_s)})


def shutting_down(message: str, retry_after_s: int) -> APIError:
    """503: the server is shutting down (a restarted or another replica may answer)."""
    return APIError(503, message, "server_error", None, "server_shutting_down", {"Retry-After": str(retry_after_s)})


# ---- responses ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Completion:
    """What every body of one answer repeats: its id, creation time and model."""

    id: str
    created: int
    model: str

    def header(self, object: str) -> dict:
        return {"id": self.id, "object": object, "created": self.created, "model": self.model}


def usage_body(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion_body(completion: Completion, text: str, finish_reason: str, usage: dict) -> dict:
    """The whole answer (`stream: false`)."""
    return {**completion.header("chat.completion"),
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                         "logprobs": None, "finish_reason": finish_reason}],
            "usage": usage}


def chunk_body(completion: Completion, delta: dict, finish_reason: str | None, include_usage: bool) -> dict:
    """One streamed piece of the answer; with include_usage every chunk carries `usage: null`."""
    body = {**completion.header("chat.completion.chunk"),
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]}
    if include_usage:
        body["usage"] = None
    return body


def usage_chunk_body(completion: Completion, usage: dict) -> dict:
    """The last chunk of a stream with include_usage: no choices, the usage."""
    return {**completion.header("chat.completion.chunk"), "choices": [], "usage": usage}


def sse_event(body: dict) -> str:
    """One server-sent event carrying a JSON body."""
    return f"data: {json.dumps(body)}\n\n"


SSE_DONE = "data: [DONE]\n\n"
"""The event that ends every stream."""
