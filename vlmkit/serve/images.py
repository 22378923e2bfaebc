"""Turning a request's `image_url` into a decoded image, within the server's limits.

An image arrives as a data URL or a file:// path under --allow-dir (serve/urls.py's rules). Byte
size is checked before decoding; data/images.py's `load_image` then checks the pixel count from
the header before the pixels are decompressed (decompression bombs), decodes and converts to RGB.
The model's own processor then sizes the image (tiles, or a native-resolution grid within its
max_pixels), so an image is refused only for being over these limits, never for its size alone.
"""

from __future__ import annotations

from PIL import Image

from vlmkit.data.images import load_image
from vlmkit.errors import BadRecordError
from vlmkit.serve.protocol import bad_request, too_large
from vlmkit.serve.settings import ImageLimits
from vlmkit.serve.urls import allowed_path, read_data_url, refuse_scheme, url_scheme


def resolve_image(url: str, limits: ImageLimits, param: str) -> Image.Image:
    """Decode one image_url; raise APIError (400 / 413) naming `param` (e.g. messages[0].content[1])."""
    raw = _read_bytes(url, limits, param)
    try:
        return load_image(raw, max_pixels=limits.max_pixels)
    except BadRecordError as e:
        if e.reason == "image_too_large":
            raise too_large(f"{param}: {e}", param) from None
        raise bad_request(f"{param}: {e}", param, "invalid_image") from None


def _read_bytes(url: str, limits: ImageLimits, param: str) -> bytes:
    scheme = url_scheme(url)
    if scheme == "data":
        return read_data_url(url, limits.max_bytes, param, "image")[1]
    if scheme != "file":
        refuse_scheme(url, param, "image")
    target = allowed_path(url, limits.allow_dir, param, "image")
    if not target.is_file():
        raise bad_request(f"{param}: no such file {target}", param, "missing_image")
    size = target.stat().st_size
    if size > limits.max_bytes:
        raise too_large(f"{param}: image is {size} bytes; the limit is {limits.max_bytes}", param)
    return target.read_bytes()
