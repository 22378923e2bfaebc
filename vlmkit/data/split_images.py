"""Idefics3's image splitting (Idefics3, SmolVLM): an image -> its tiles, then the whole image.

Equal to transformers' Idefics3ImageProcessor / SmolVLMImageProcessor with image splitting on (the
setting their checkpoints ship with). The image is resized (LANCZOS) so that its longer side spans
`tiles_per_side` tiles and its shorter side keeps the aspect ratio (rounded up to an even size),
then each side is resized up to a whole number of tiles; that image is cut row-major into rows x
cols tiles of `image_size`, and the whole image resized to one tile follows them. An image that
fits in one tile is that tile alone (rows = cols = 0). Each resize reads the 8-bit image the one
before it wrote and the pixels are rescaled in float64 and normalised in float32, as the
reference does, so the tensors are its tensors. How the prompt writes the tiles (each one's row
and column, then the whole image) is data/template.py's (`ImageTiles`).

Shape suffixes: N tiles of one image, S the tile side.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from PIL import Image

from vlmkit.constants import RESCALE_FACTOR
from vlmkit.data.images import DEFAULT_MAX_PIXELS, ImageSource, load_image, to_rgb

MAX_IMAGE_SIDE = 4096
"""The reference scales an image whose longer side would pass this back down to it."""


def _longest_side_size(width: int, height: int, longest: int) -> tuple[int, int]:
    """(width, height) with the longer side `longest` and the other one keeping the aspect ratio,
    rounded down and then up to an even size; then both within MAX_IMAGE_SIDE (the reference's
    arithmetic, float rounding included)."""
    aspect = width / height
    if width >= height:
        width, height = longest, int(longest / aspect)
        height += height % 2
    else:
        width, height = int(longest * aspect), longest
        width += width % 2
    width, height = max(width, 1), max(height, 1)
    aspect = width / height
    if width >= height and width > MAX_IMAGE_SIDE:
        width, height = MAX_IMAGE_SIDE, int(MAX_IMAGE_SIDE / aspect)
    elif height > width and height > MAX_IMAGE_SIDE:
        width, height = int(MAX_IMAGE_SIDE * aspect), MAX_IMAGE_SIDE
    return max(width, 1), max(height, 1)


def _whole_tiles_size(width: int, height: int, tile: int) -> tuple[int, int]:
    """(width, height) rounded up to whole tiles: the longer side first, the other from the aspect
    ratio (as the reference's `resize_for_vision_encoder` computes them)."""
    aspect = width / height
    if width >= height:
        width = math.ceil(width / tile) * tile
        height = math.ceil(int(width / aspect) / tile) * tile
    else:
        height = math.ceil(height / tile) * tile
        width = math.ceil(int(height * aspect) / tile) * tile
    return width, height


class SplitImageProcessor:
    """PIL image -> (N, 3, S, S) float tensor: its rows x cols tiles and the whole image, normalised
    for the vision encoder (see the module docstring)."""

    def __init__(self, image_size: int, mean, std, tiles_per_side: int, max_pixels: int = DEFAULT_MAX_PIXELS):
        if image_size <= 0 or tiles_per_side <= 0:
            raise ValueError(f"SplitImageProcessor: need image_size > 0 and tiles_per_side > 0, got "
                             f"image_size={image_size}, tiles_per_side={tiles_per_side}")
        self.image_size = image_size
        self.longest_edge = tiles_per_side * image_size
        """What the image's longer side is first resized to (the reference's `size["longest_edge"]`)."""
        self.mean = np.asarray(mean, dtype=np.float32)[:, None, None]  # (3, 1, 1)
        self.std = np.asarray(std, dtype=np.float32)[:, None, None]
        self.max_pixels = max_pixels

    def sizes(self, width: int, height: int) -> tuple[tuple[int, int], tuple[int, int]]:
        """The two (width, height) an image is resized to: its longer side to `longest_edge`, then
        up to whole tiles."""
        first = _longest_side_size(width, height, self.longest_edge)
        return first, _whole_tiles_size(*first, self.image_size)

    def grid(self, width: int, height: int) -> tuple[int, int]:
        """(rows, cols) of tiles a width x height image is cut into; (0, 0): it is one tile."""
        _, (width, height) = self.sizes(width, height)
        s = self.image_size
        if width <= s and height <= s:
            return 0, 0
        return height // s, width // s

    def num_tiles(self, width: int, height: int) -> int:
        """Tiles an image of this size becomes (grid + whole image), before decoding its pixels."""
        rows, cols = self.grid(width, height)
        return rows * cols + 1

    def load(self, src: ImageSource) -> Image.Image:
        return load_image(src, self.max_pixels)

    def __call__(self, image: Image.Image) -> torch.Tensor:
        image = to_rgb(image)
        first, whole = self.sizes(*image.size)
        resized = image.resize(first, Image.Resampling.LANCZOS).resize(whole, Image.Resampling.LANCZOS)
        rows, cols = self.grid(*image.size)
        s = self.image_size
        tiles = [resized.crop((c * s, r * s, (c + 1) * s, (r + 1) * s)) for r in range(rows) for c in range(cols)]
        tiles.append(resized.resize((s, s), Image.Resampling.LANCZOS) if tiles else resized)
        return torch.stack([self._normalise(tile) for tile in tiles])  # (N, 3, S, S)

    def _normalise(self, tile: Image.Image) -> torch.Tensor:
        pixels = np.asarray(tile, dtype=np.uint8).transpose(2, 0, 1)  # (3, S, S)
        scaled = (pixels.astype(np.float64) * RESCALE_FACTOR).astype(np.float32)
        return torch.from_numpy((scaled - self.mean) / self.std)
