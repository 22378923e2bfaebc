"""Turning a request's `image_url` into a decoded image, within the server's limits.

The server fetches nothing: an image arrives inline as a data URL (base64) or, when the server
was started with --allow-dir, as a file:// path inside that directory. Remote http(s) URLs are
refused with a message saying how to send the image instead. Byte size is checked before
decoding; data/images.py's `load_image` then checks the pixel count from the header before the
pixels are decompressed (decompression bombs), decodes and converts to RGB.
"""

from __future__ import annotations

import base64
import binascii
import urllib.parse
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from vlmkit.data.images import load_image
from vlmkit.errors import BadRecordError
from vlmkit.serve.schemas import bad_request, too_large


@dataclass
class ImageLimits:
    max_bytes: int = 8 * 1024 * 1024
    """Largest encoded image (after base64 decoding) a request may carry."""
    max_pixels: int = 4096 * 4096
    """Largest width * height accepted (checked from the header, before decoding)."""
    max_images: int = 8
    """Most images in one request."""
    allow_dir: Path | None = None
    """file:// URLs must point inside this directory; None refuses them."""


def resolve_image(url: str, limits: ImageLimits, param: str) -> Image.Image:
    """Decode one image_url; raise APIError (400 / 413) naming `param` (e.g. messages[0].content[1])."""
    raw = _read_bytes(url, limits, param)
    if len(raw) > limits.max_bytes:
        raise too_large(f"{param}: image is {len(raw)} bytes; the limit is {limits.max_bytes}", param)
    try:
        return load_image(raw, max_pixels=limits.max_pixels)
    except BadRecordError as e:
        if e.reason == "image_too_large":
            raise too_large(f"{param}: {e}", param) from None
        raise bad_request(f"{param}: {e}", param, "invalid_image") from None


def _read_bytes(url: str, limits: ImageLimits, param: str) -> bytes:
    scheme = url.split(":", 1)[0].lower() if ":" in url else ""
    if scheme == "data":
        header, sep, payload = url.partition(",")
        if not sep or ";base64" not in header:
            raise bad_request(f"{param}: data URLs must be base64, as data:image/png;base64,<data>", param,
                              "invalid_image_url")
        if len(payload) * 3 // 4 > limits.max_bytes + 3:
            raise too_large(f"{param}: image is about {len(payload) * 3 // 4} bytes; the limit is "
                            f"{limits.max_bytes}", param)
        try:
            return base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError):
            raise bad_request(f"{param}: the data URL's base64 payload is invalid", param,
                              "invalid_image_url") from None
    if scheme in ("http", "https"):
        raise bad_request(f"{param}: this server does not fetch remote URLs ({scheme}://...); send the image "
                          "inline as a data URL (data:image/png;base64,...)", param, "remote_url_refused")
    if scheme == "file":
        return _read_local(urllib.parse.unquote(urllib.parse.urlparse(url).path), limits, param)
    raise bad_request(f"{param}: unsupported image URL {url[:40]!r}; use a data URL or file:// under "
                      "the server's --allow-dir", param, "invalid_image_url")


def _read_local(path: str, limits: ImageLimits, param: str) -> bytes:
    if limits.allow_dir is None:
        raise bad_request(f"{param}: file:// URLs are refused; start the server with --allow-dir DIR to "
                          "allow images under DIR, or send a data URL", param, "file_url_refused")
    root = limits.allow_dir.resolve()
    target = Path(path).resolve()
    if not target.is_relative_to(root):
        raise bad_request(f"{param}: {path} is outside the allowed directory {root}", param,
                          "file_url_refused")
    if not target.is_file():
        raise bad_request(f"{param}: no such file {path}", param, "missing_image")
    size = target.stat().st_size
    if size > limits.max_bytes:
        raise too_large(f"{param}: image is {size} bytes; the limit is {limits.max_bytes}", param)
    return target.read_bytes()
