"""Images in: decode safely, convert to RGB, resize / normalise per the vision encoder, tile.

`load_image` turns an ImageRef, a path or a PIL image into an RGB PIL image, or raises
BadRecordError with a stable reason: missing_image, empty_image, not_an_image, truncated_image,
image_too_large. The pixel count is read from the header and checked *before* the pixels are
decompressed (decompression bombs). Palette, RGBA / LA (composited on white), CMYK, grayscale and
16-bit / float modes all become 8-bit RGB, and the EXIF orientation is applied.

`ImageProcessor` resizes (bicubic) and normalises with the encoder's mean / std. With
max_tiles > 1 it tiles as InternVL's `dynamic_preprocess` does (InternVL-Chat-V1.5, Chen et al.
2024): among all grids cols x rows with min_tiles <= cols*rows <= max_tiles it picks the one whose
aspect ratio is closest to the image's (on a tie, the larger grid when the image has enough pixels
to fill it), resizes the image to that grid, cuts it row-major into S x S tiles and appends a
global thumbnail when there is more than one tile. The number of visual tokens of an image is then
`num_tiles(w, h) * tokens_per_image`.

Shape suffixes: N = tiles of one image, S = the encoder's image size.
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from vlmkit.data.types import ImageRef
from vlmkit.errors import BadRecordError

DEFAULT_MAX_PIXELS = 8192 * 8192
"""Largest width * height decoded (checked from the header before decompression)."""

ImageSource = ImageRef | Path | str | bytes | Image.Image


def _open_bytes(src: ImageSource) -> tuple[io.BytesIO | Path, str]:
    """Where to read the image from and how to name it in errors; missing / empty checked here."""
    if isinstance(src, ImageRef):
        if src.data is not None:
            src = src.data
        elif src.path is not None:
            src = src.path
        else:
            raise BadRecordError("missing_image", "image reference has neither a path nor bytes")
    if isinstance(src, bytes):
        if not src:
            raise BadRecordError("empty_image", "image bytes are empty")
        return io.BytesIO(src), f"<{len(src)} bytes>"
    path = Path(src)
    if not path.is_file():
        raise BadRecordError("missing_image", f"image file {path} does not exist")
    if path.stat().st_size == 0:
        raise BadRecordError("empty_image", f"image file {path} is empty (0 bytes)")
    return path, str(path)


IMAGE_SIGNATURES = (b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"GIF87a", b"GIF89a", b"BM", b"II*\x00", b"MM\x00*")


def _has_image_signature(fp: io.BytesIO | Path) -> bool:
    if isinstance(fp, Path):
        with fp.open("rb") as f:
            head = f.read(12)
    else:
        head = fp.getvalue()[:12]
    return head.startswith(IMAGE_SIGNATURES) or (head[:4] == b"RIFF" and head[8:12] == b"WEBP")


def load_image(src: ImageSource, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Decode `src` into an 8-bit RGB PIL image with EXIF orientation applied."""
    if isinstance(src, Image.Image):
        return to_rgb(ImageOps.exif_transpose(src))
    fp, name = _open_bytes(src)
    with warnings.catch_warnings():
        # Pillow warns (and past 2x its own limit raises) on huge images; our limit is checked below.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            image = Image.open(fp)  # reads the header only
        except Image.DecompressionBombError as e:
            raise BadRecordError("image_too_large", f"{name}: {e}") from None
        except (UnidentifiedImageError, SyntaxError, ValueError, EOFError):
            if _has_image_signature(fp):  # an image's first bytes, cut off before the header ends
                raise BadRecordError("truncated_image", f"{name} is cut off inside its header") from None
            raise BadRecordError("not_an_image", f"{name} is not a readable image (PNG, JPEG, WebP, ...)") from None
        except OSError as e:
            raise BadRecordError("truncated_image", f"{name}: {e}") from None
        width, height = image.size
        if width * height > max_pixels:
            raise BadRecordError("image_too_large", f"{name} is {width}x{height} = {width * height} pixels; "
                                 f"the limit is {max_pixels}")
        if width == 0 or height == 0:
            raise BadRecordError("not_an_image", f"{name} has a zero-sized dimension ({width}x{height})")
        try:
            image.load()  # decompresses; a cut-off file fails here
        except (OSError, SyntaxError, ValueError) as e:
            raise BadRecordError("truncated_image", f"{name} cannot be fully decoded: {e}") from None
    return to_rgb(ImageOps.exif_transpose(image))


def to_rgb(image: Image.Image) -> Image.Image:
    """Any Pillow mode -> 8-bit RGB; transparency is composited on white (as a viewer shows it)."""
    if image.mode == "RGB":
        return image
    if image.mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        image = _wide_to_l(image)
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")  # L, 1, CMYK, YCbCr, LAB, HSV


def _wide_to_l(image: Image.Image) -> Image.Image:
    """16-bit / 32-bit integer or float grayscale -> 8-bit L, scaled by the mode's range."""
    array = np.asarray(image, dtype=np.float64)
    if image.mode == "F":
        lo, hi = float(array.min()), float(array.max())
        array = (array - lo) / (hi - lo or 1.0) * 255.0
    elif image.mode.startswith("I;16") or array.max() > 255:
        array = array / 257.0  # 16-bit range onto 8-bit
    return Image.fromarray(np.clip(array, 0, 255).astype(np.uint8))  # 2-D uint8 -> mode L


def tile_grid(width: int, height: int, image_size: int, max_tiles: int, min_tiles: int = 1) -> tuple[int, int]:
    """(cols, rows) of the InternVL grid for a width x height image."""
    aspect = width / height
    grids = sorted({(c, r) for n in range(min_tiles, max_tiles + 1) for c in range(1, n + 1)
                    for r in range(1, n + 1) if min_tiles <= c * r <= max_tiles}, key=lambda g: g[0] * g[1])
    best, best_diff = (1, 1), float("inf")
    for cols, rows in grids:
        diff = abs(aspect - cols / rows)
        if diff < best_diff:
            best, best_diff = (cols, rows), diff
        elif diff == best_diff and width * height > 0.5 * image_size * image_size * cols * rows:
            best = (cols, rows)  # same shape, more tiles: only when the image has the pixels for them
    return best


class ImageProcessor:
    """PIL image -> (N, 3, S, S) float tensor normalised for the vision encoder."""

    def __init__(self, image_size: int, mean, std, max_tiles: int = 1, use_thumbnail: bool = True,
                 max_pixels: int = DEFAULT_MAX_PIXELS, min_tiles: int = 1):
        if image_size <= 0 or not 1 <= min_tiles <= max_tiles:
            raise ValueError(f"ImageProcessor: need image_size > 0 and 1 <= min_tiles <= max_tiles, got "
                             f"image_size={image_size}, min_tiles={min_tiles}, max_tiles={max_tiles}")
        self.image_size = image_size
        self.mean = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)  # (3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)
        self.max_tiles, self.min_tiles = max_tiles, min_tiles
        self.use_thumbnail = use_thumbnail
        self.max_pixels = max_pixels

    def grid(self, width: int, height: int) -> tuple[int, int]:
        if self.max_tiles == 1:
            return (1, 1)
        return tile_grid(width, height, self.image_size, self.max_tiles, self.min_tiles)

    def num_tiles(self, width: int, height: int) -> int:
        """Tiles an image of this size becomes (grid + thumbnail), before decoding its pixels."""
        cols, rows = self.grid(width, height)
        n = cols * rows
        return n + 1 if n > 1 and self.use_thumbnail else n

    def load(self, src: ImageSource) -> Image.Image:
        return load_image(src, self.max_pixels)

    def __call__(self, image: Image.Image) -> torch.Tensor:
        image = to_rgb(image)
        s = self.image_size
        cols, rows = self.grid(*image.size)
        resized = image.resize((s * cols, s * rows), Image.Resampling.BICUBIC)
        tiles = [resized.crop((c * s, r * s, (c + 1) * s, (r + 1) * s)) for r in range(rows) for c in range(cols)]
        if len(tiles) > 1 and self.use_thumbnail:
            tiles.append(image.resize((s, s), Image.Resampling.BICUBIC))
        return torch.stack([self._normalise(t) for t in tiles])  # (N, 3, S, S)

    def _normalise(self, tile: Image.Image) -> torch.Tensor:
        pixels = torch.from_numpy(np.asarray(tile, dtype=np.uint8).copy()).permute(2, 0, 1)  # (3, S, S)
        return (pixels.float() / 255.0 - self.mean) / self.std
