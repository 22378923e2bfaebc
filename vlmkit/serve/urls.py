"""Where a request's media come from: the URL rules shared by image_url and video_url parts.

The server fetches nothing: media arrive inline as base64 data URLs or, when the server was
started with --allow-dir, as file:// paths inside that directory. Remote http(s) URLs are refused
with a message saying how to send the media instead. Every refusal is an APIError (400 / 413)
naming the part, e.g. messages[0].content[1]; `what` ("image", "video") words the messages.
"""

from __future__ import annotations

import base64
import binascii
import urllib.parse
from pathlib import Path
from typing import NoReturn

from vlmkit.serve.protocol import bad_request, too_large

MAX_PADDING_CHARS = 3
"""Slack on the base64 size estimate: it counts the padding (at most 2 characters) as bytes."""


def url_scheme(url: str) -> str:
    """The URL's scheme, lower-cased ("" without one)."""
    return url.split(":", 1)[0].lower() if ":" in url else ""


def refuse_scheme(url: str, param: str, what: str) -> NoReturn:
    """Raise the 400 for a URL that is neither a data URL nor a file:// URL."""
    scheme = url_scheme(url)
    if scheme in ("http", "https"):
        raise bad_request(f"{param}: this server does not fetch remote URLs ({scheme}://...); send the {what} "
                          f"inline as a data URL (data:<mime type>;base64,...)", param, "remote_url_refused")
    raise bad_request(f"{param}: unsupported {what} URL {url[:40]!r}; use a data URL or file:// under "
                      "the server's --allow-dir", param, f"invalid_{what}_url")


def read_data_url(url: str, max_bytes: int, param: str, what: str) -> tuple[str, bytes]:
    """A base64 data URL -> (its mime type, lower-cased, its bytes); 413 over max_bytes."""
    header, sep, payload = url.partition(",")
    if not sep or ";base64" not in header:
        raise bad_request(f"{param}: data URLs must be base64, as data:<mime type>;base64,<data>", param,
                          f"invalid_{what}_url")
    # Refuse a payload that is surely too large before decoding it: base64 holds 3 bytes per 4 characters.
    decoded_size = len(payload) * 3 // 4
    if decoded_size > max_bytes + MAX_PADDING_CHARS:
        raise too_large(f"{param}: {what} is about {decoded_size} bytes; the limit is {max_bytes}", param)
    try:
        raw = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise bad_request(f"{param}: the data URL's base64 payload is invalid", param,
                          f"invalid_{what}_url") from None
    if len(raw) > max_bytes:
        raise too_large(f"{param}: {what} is {len(raw)} bytes; the limit is {max_bytes}", param)
    mime = header[len("data:"):].split(";", 1)[0].strip().lower()
    return mime, raw


def allowed_path(url: str, allow_dir: Path | None, param: str, what: str) -> Path:
    """A file:// URL -> the resolved path it names, which must lie inside `allow_dir` (None refuses
    every file:// URL). Whether it exists is the caller's check."""
    path = urllib.parse.unquote(urllib.parse.urlparse(url).path)
    if allow_dir is None:
        raise bad_request(f"{param}: file:// URLs are refused; start the server with --allow-dir DIR to "
                          f"allow {what}s under DIR, or send a data URL", param, "file_url_refused")
    root = allow_dir.resolve()
    target = Path(path).resolve()
    if not target.is_relative_to(root):
        raise bad_request(f"{param}: {path} is outside the allowed directory {root}", param, "file_url_refused")
    return target
