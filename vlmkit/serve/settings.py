"""The server's settings and limits, with their defaults: the one place they are written.

`vlmkit serve`'s flags (serve/cli.py), the scheduler (serve/scheduler.py) and the app
(serve/app.py) read their defaults from here. Kept free of torch and the web framework so that
`vlmkit serve --help` stays fast.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

MiB = 1024 * 1024


@dataclass
class ImageLimits:
    """What a request's images and videos may be (serve/images.py and serve/videos.py check them)."""

    max_bytes: int = 8 * MiB
    """Largest encoded image (after base64 decoding) a request may carry."""
    max_pixels: int = 4096 * 4096
    """Largest width * height accepted (checked from the header, before decoding)."""
    max_images: int = 8
    """Most images in one request."""
    max_videos: int = 2
    """Most video_url parts in one request (native-resolution models only)."""
    max_video_bytes: int = 64 * MiB
    """Largest video: a file, an inline data URL, or a directory's frame files together."""
    max_video_frames: int = 2048
    """Most frames a video may hold before sampling (decoding reads up to the last sampled one)."""
    allow_dir: Path | None = None
    """file:// URLs (images, videos, frame directories) must point inside this directory; None refuses them."""


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
    max_body_bytes: int = 32 * MiB
    """Largest request body."""
    max_tokens_cap: int = 2048
    """Largest max_tokens a request may ask for."""
    request_timeout_s: float = 600.0
    """A request still waiting or decoding this long after it arrived ends with a 504 (or, streamed,
    an error event)."""
    drain_timeout_s: float = 30.0
    """On SIGTERM: how long requests already taken may run to their end before they are cut."""
    retry_after_s: int = 1
    """The Retry-After (seconds) of a 429 (server busy) or a 503 (shutting down)."""
    log_prompts: bool = False
    """Log each request's message text (off by default: prompts may be private; the per-request
    log lines carry ids, token counts and outcomes only)."""
    images: ImageLimits = field(default_factory=ImageLimits)
