"""Any-resolution tiling, the data half (LLaVA-OneVision): an image -> its base tile and its tiles.

Equal to transformers' LlavaOnevisionImageProcessor (its PIL backend). An image alone in its
conversation is tiled: the whole image resized (bicubic) to one tile comes first, then the image
resized to fit the canvas its size picks (with the aspect ratio kept, each side rounded up),
centred on that canvas with black padding (the left / top share rounded down), cut row-major into
tiles. An image among several in a conversation is not tiled: it is centred on a square of the
normalisation mean's colour and resized to one tile. Pixels are rescaled in float64 and
normalised in float32, as the reference does, so the tensors are its tensors.

Which canvas an image gets and how many visual tokens it then gives are the model's geometry
(models/anyres.py, `AnyResGeometry`), which api.py hands to this processor (data/ never imports
models/): `AnyResLayout` is what this module needs of it. Each image's layout row (its tile
count, height and width: `layout`) travels with its tiles to the model.

Shape suffixes: N tiles of one image, S the tile side.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np
import torch
from PIL import Image

from vlmkit.constants import RESCALE_FACTOR
from vlmkit.data.images import DEFAULT_MAX_PIXELS, ImageSource, load_image, to_rgb


class AnyResLayout(Protocol):
    """What the processor needs of a model's any-resolution geometry (models/anyres.py)."""

    def canvas(self, height: int, width: int) -> tuple[int, int]: ...

    def tokens(self, height: int, width: int, tiled: bool = True) -> int: ...


def fitted_size(height: int, width: int, canvas: tuple[int, int]) -> tuple[int, int]:
    """(height, width) of an image resized to fit `canvas` with its aspect ratio kept, the fitted
    side exact and the other rounded up (transformers' `get_patch_output_size`)."""
    canvas_h, canvas_w = canvas
    scale_w, scale_h = canvas_w / width, canvas_h / height
    if scale_w < scale_h:
        return min(int(np.ceil(height * scale_w)), canvas_h), canvas_w
    return canvas_h, min(int(np.ceil(width * scale_h)), canvas_w)


class AnyResImageProcessor:
    """PIL image -> (N, 3, S, S) float tensor: the base tile, then (tiled) the canvas' tiles,
    normalised for the vision encoder (see the module docstring)."""

    def __init__(self, layout: AnyResLayout, image_size: int, mean, std, max_pixels: int = DEFAULT_MAX_PIXELS):
        self.layout = layout
        self.image_size = image_size
        self.mean = np.asarray(mean, dtype=np.float32)[:, None, None]  # (3, 1, 1)
        self.std = np.asarray(std, dtype=np.float32)[:, None, None]
        self.background = tuple(int(m * 255) for m in mean)
        """The colour an untiled image is padded to a square with (the reference's)."""
        self.max_pixels = max_pixels

    def load(self, src: ImageSource) -> Image.Image:
        return load_image(src, self.max_pixels)

    def tokens(self, image: Image.Image, tiled: bool) -> int:
        """Visual tokens the image gives in the text."""
        return self.layout.tokens(image.height, image.width, tiled)

    def layout_row(self, image: Image.Image, tiles: torch.Tensor) -> list[int]:
        """The image's layout row as the model reads it: tile count, height, width."""
        return [tiles.shape[0], image.height, image.width]

    def __call__(self, image: Image.Image, tiled: bool = True) -> torch.Tensor:
        image = to_rgb(image)
        s = self.image_size
        if not tiled:
            return self._normalise(self._square(image).resize((s, s), Image.Resampling.BICUBIC))[None]
        canvas_h, canvas_w = self.layout.canvas(image.height, image.width)
        fitted_h, fitted_w = fitted_size(image.height, image.width, (canvas_h, canvas_w))
        padded = Image.new("RGB", (canvas_w, canvas_h))  # black
        padded.paste(image.resize((fitted_w, fitted_h), Image.Resampling.BICUBIC),
                     ((canvas_w - fitted_w) // 2, (canvas_h - fitted_h) // 2))
        tiles = [padded.crop((x, y, x + s, y + s)) for y in range(0, canvas_h, s) for x in range(0, canvas_w, s)]
        base = image.resize((s, s), Image.Resampling.BICUBIC)
        return torch.stack([self._normalise(tile) for tile in [base, *tiles]])  # (N, 3, S, S)

    def _square(self, image: Image.Image) -> Image.Image:
        """The image centred on a square of the background colour (the left / top share rounded down)."""
        side = max(image.size)
        square = Image.new("RGB", (side, side), self.background)
        square.paste(image, ((side - image.width) // 2, (side - image.height) // 2))
        return square

    def _normalise(self, tile: Image.Image) -> torch.Tensor:
        pixels = np.asarray(tile, dtype=np.uint8).transpose(2, 0, 1)  # (3, S, S)
        scaled = (pixels.astype(np.float64) * RESCALE_FACTOR).astype(np.float32)
        return torch.from_numpy((scaled - self.mean) / self.std)
