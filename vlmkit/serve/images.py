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
from pathlib import Path

from PIL import Image

from vlmkit.data.images import load_image
from vlmkit.errors import BadRecordError
from vlmkit.serve.protocol import bad_request, too_large
from vlmkit.serve.settings import ImageLimits


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
        # Refuse a payload that is surely too large before decoding it: base64 holds 3 bytes per 4
        # characters, and this estimate counts its padding (at most 2 characters) as bytes too.
        decoded_size = len(payload) * 3 // 4
        if decoded_size > limits.max_bytes + 3:
            raise too_large(f"{param}: image is about {decoded_size} bytes; the limit is "
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
