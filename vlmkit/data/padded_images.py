"""DeepSeek-VL's image preparation: the image resized whole, then padded to a square.

`PaddedImageProcessor` makes one tile per image as transformers' DeepSeek-VL image processors do
(`DeepseekVLImageProcessor`, `DeepseekVLHybridImageProcessor`):

- resize (bicubic) so the longer side is the tile's side, each side rounded and at least
  `MIN_SIDE` pixels;
- centre the result on a square canvas of the normalisation mean's colour (each channel
  `int(mean * 255)`), the odd pixel of padding at the bottom or right;
- rescale by 1/255 and normalise with the mean and std.

A hybrid model (DeepSeek-VL's SigLIP + SAM towers, models/sam.py) sees each image at two
resolutions: the padded high-resolution square is made first, and the low-resolution tile is that
square resized (bicubic), as the reference does. Its tile is one row: the high-resolution pixels,
then the low-resolution ones, each channels-first and flattened (models/sam.py's
`split_hybrid_rows` reads it back), so prompts and packs carry it as any other tile.

Shape suffixes: S = the tile's side (S_hi, S_lo: the two resolutions), R = values of one hybrid row.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from vlmkit.constants import RESCALE_FACTOR
from vlmkit.data.images import DEFAULT_MAX_PIXELS, ImageSource, load_image, to_rgb

MIN_SIDE = 14
"""The shortest side a resized image keeps (the reference processors' `min_size`)."""
MAX_CHANNEL = 255
"""8-bit pixels: the padding colour is each channel's mean times this, truncated."""


@dataclass(frozen=True)
class Resolution:
    """One tile size and its normalisation."""

    size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def pad_colour(self) -> tuple[int, ...]:
        return tuple(int(m * MAX_CHANNEL) for m in self.mean)

    def normalise(self, image: Image.Image) -> torch.Tensor:
        """(3, S, S) float: rescaled by 1/255, then (x - mean) / std."""
        pixels = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1)
        mean = torch.tensor(self.mean, dtype=torch.float32).view(-1, 1, 1)
        std = torch.tensor(self.std, dtype=torch.float32).view(-1, 1, 1)
        return (pixels.float() * RESCALE_FACTOR - mean) / std


def resize_and_pad(image: Image.Image, resolution: Resolution) -> Image.Image:
    """`image` resized so its longer side is the tile's, centred on a square of the pad colour."""
    width, height = image.size
    scale = resolution.size / max(width, height)
    new_w, new_h = max(round(width * scale), MIN_SIDE), max(round(height * scale), MIN_SIDE)
    resized = image.resize((new_w, new_h), Image.Resampling.BICUBIC)
    if new_w == new_h:
        return resized
    side = max(new_w, new_h)
    canvas = Image.new("RGB", (side, side), resolution.pad_colour())
    canvas.paste(resized, ((side - new_w) // 2, (side - new_h) // 2))
    return canvas


class PaddedImageProcessor:
    """PIL image -> (1, 3, S, S) normalised tile, or for a hybrid model (`high_res` given) one
    (1, R) row of both resolutions (module docstring)."""

    def __init__(self, image_size: int, mean, std, high_res: Resolution | None = None,
                 max_pixels: int = DEFAULT_MAX_PIXELS):
        self.low_res = Resolution(image_size, tuple(mean), tuple(std))
        self.high_res = high_res
        self.max_pixels = max_pixels

    def load(self, src: ImageSource) -> Image.Image:
        return load_image(src, self.max_pixels)

    def __call__(self, image: Image.Image) -> torch.Tensor:
        image = to_rgb(image)
        if self.high_res is None:
            return self.low_res.normalise(resize_and_pad(image, self.low_res))[None]  # (1, 3, S, S)
        high = resize_and_pad(image, self.high_res)  # a square: resizing it gives a square
        low = high.resize((self.low_res.size, self.low_res.size), Image.Resampling.BICUBIC)
        row = torch.cat([self.high_res.normalise(high).flatten(), self.low_res.normalise(low).flatten()])
        return row[None]  # (1, R)
