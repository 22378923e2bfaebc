"""Any-resolution tiling (LLaVA-NeXT, Liu et al. 2024; LLaVA-OneVision, Li et al. 2024), the
model's half: where an image's tiles lie and how their features become its visual tokens.

An image of any size is tiled on the canvas among `grid_pinpoints` that keeps most of its pixels
and wastes least (`best_canvas`, transformers' `select_best_resolution`): resized to fit the canvas
with its aspect ratio kept, centred, padded, and cut row-major into rows x cols tiles of the
tower's size; the whole image resized to one tile comes first (the base tile). Its features are
the base tile's patches, then the tiles' patch grids joined into one (rows * g) x (cols * g) grid
(g patches per tile side), with the rows or columns that only saw padding cut off (`unpadded`),
pooled bilinearly when that grid holds more than 1.1 x `anyres_max_tiles` tiles' patches
(`pooled`), and a learned newline embedding closing each row. An image in a conversation with
several images is not tiled: its base tile alone, then one newline (the processor pads it to a
square instead). transformers' modeling_llava_onevision.py (`pack_image_features`) and
processing_llava_onevision.py (`_get_number_of_features`) compute the same, the first on tensors,
the second as counts; here one geometry serves both (the data side, data/anyres.py, is handed it by
api.py, so the counts a prompt is built with are the tensors' own).

A model's images travel as their tiles plus one layout row per image (`IMAGE_LAYOUT_FIELDS`: its
tile count and its size in pixels), in the slot native models use for their grids
(`image_grid_thw`), so prompts, samples and packs carry them unchanged.

Shape suffixes: N tiles, P patches per tile, D LLM width, I images.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from vlmkit.models.adapter import MLPAdapter, init_adapter_weights
from vlmkit.models.config import AdapterConfig, VLMConfig

POOL_SLACK = 1.1
"""Features are pooled only past this multiple of the `anyres_max_tiles` budget (the reference's)."""
UNPAD_DIGITS = 7
"""The reference rounds the scaled side to this many digits before truncating it."""
IMAGE_LAYOUT_FIELDS = ("tiles", "height", "width")
"""One image's layout row: its tile count (1: the base tile alone), its height and width in pixels."""


def best_canvas(height: int, width: int, canvases: tuple[tuple[int, int], ...]) -> tuple[int, int]:
    """The (height, width) canvas that keeps most of a height x width image's pixels once it is
    resized to fit, and of those the one that wastes least (transformers' `select_best_resolution`)."""
    best, most_kept, least_wasted = canvases[0], 0, float("inf")
    for canvas_h, canvas_w in canvases:
        scale = min(canvas_w / width, canvas_h / height)
        kept = min(int(width * scale) * int(height * scale), width * height)
        wasted = canvas_h * canvas_w - kept
        if kept > most_kept or (kept == most_kept and wasted < least_wasted):
            best, most_kept, least_wasted = (canvas_h, canvas_w), kept, wasted
    return best


@dataclass(frozen=True)
class AnyResGeometry:
    """Where an anyres model's image tiles lie and how many tokens an image gives (module docstring)."""

    tile: int
    """The tower's image size in pixels."""
    grid: int
    """Patches per tile side."""
    canvases: tuple[tuple[int, int], ...]
    max_tiles: int
    """The pooling budget in tiles (`VLMConfig.anyres_max_tiles`)."""

    @classmethod
    def of(cls, cfg: VLMConfig) -> "AnyResGeometry":
        return cls(cfg.vision.image_size, cfg.vision.grid_size, cfg.grid_pinpoints, cfg.anyres_max_tiles)

    def canvas(self, height: int, width: int) -> tuple[int, int]:
        return best_canvas(height, width, self.canvases)

    def tile_grid(self, height: int, width: int) -> tuple[int, int]:
        """(rows, cols) of tiles an image of this size is cut into."""
        canvas_h, canvas_w = self.canvas(height, width)
        return canvas_h // self.tile, canvas_w // self.tile

    def tiles(self, height: int, width: int, tiled: bool = True) -> int:
        """Tiles of an image: the base tile, then its canvas' tiles when it is tiled."""
        rows, cols = self.tile_grid(height, width)
        return 1 + rows * cols if tiled else 1

    def unpadded(self, height: int, width: int) -> tuple[int, int, int, int]:
        """(top, bottom, left, right) of the joined tiles' patch grid that saw the image, not its
        padding (transformers' `unpad_image`)."""
        rows, cols = self.tile_grid(height, width)
        grid_h, grid_w = rows * self.grid, cols * self.grid
        if width / height > grid_w / grid_h:  # padded above and below
            kept = int(round(height * (grid_w / width), UNPAD_DIGITS))
            pad = (grid_h - kept) // 2
            return pad, grid_h - pad, 0, grid_w
        kept = int(round(width * (grid_h / height), UNPAD_DIGITS))
        pad = (grid_w - kept) // 2
        return 0, grid_h, pad, grid_w - pad

    def pooled(self, grid_h: int, grid_w: int) -> tuple[int, int]:
        """The size an unpadded grid is pooled to (itself when within the budget)."""
        ratio = math.sqrt(grid_h * grid_w / (self.max_tiles * self.grid ** 2))
        if ratio <= POOL_SLACK:
            return grid_h, grid_w
        return int(grid_h // ratio), int(grid_w // ratio)

    def tokens(self, height: int, width: int, tiled: bool = True) -> int:
        """Visual tokens of an image: the base tile's patches, then (tiled) the unpadded, pooled grid
        with a newline closing each row, or (not tiled) one newline."""
        if not tiled:
            return self.grid ** 2 + 1
        top, bottom, left, right = self.unpadded(height, width)
        rows, cols = self.pooled(bottom - top, right - left)
        return self.grid ** 2 + rows * (cols + 1)

    def image_tokens(self, features: torch.Tensor, height: int, width: int, newline: torch.Tensor) -> torch.Tensor:
        """One image's visual tokens (tokens, D) from its tiles' features (N, P, D), base tile first."""
        base = features[0]  # (P, D)
        if features.shape[0] == 1:
            return torch.cat([base, newline[None].to(base.dtype)])
        rows, cols = self.tile_grid(height, width)
        g, D = self.grid, features.shape[-1]
        joined = features[1:].view(rows, cols, g, g, D).permute(4, 0, 2, 1, 3).reshape(D, rows * g, cols * g)
        top, bottom, left, right = self.unpadded(height, width)
        joined = joined[:, top:bottom, left:right]
        size = self.pooled(bottom - top, right - left)
        if size != (bottom - top, right - left):
            joined = F.interpolate(joined[None], list(size), mode="bilinear")[0]
        closed = torch.cat([joined, newline[:, None, None].expand(D, size[0], 1).to(joined.dtype)], dim=-1)
        return torch.cat([base, closed.flatten(1).T])  # (P + rows * (cols + 1), D)

    def check_layouts(self, layouts: torch.Tensor, num_tiles: int) -> None:
        """ValueError unless `layouts` (I, 3) are image layouts (IMAGE_LAYOUT_FIELDS) whose tiles
        are `num_tiles` in all, each image tiled as its size says or its base tile alone."""
        if layouts.dim() != 2 or layouts.shape[1] != len(IMAGE_LAYOUT_FIELDS):
            raise ValueError(f"an anyres model takes one layout row {IMAGE_LAYOUT_FIELDS} per image, got a tensor "
                             f"of shape {tuple(layouts.shape)}")
        for i, (tiles, height, width) in enumerate(layouts.tolist()):
            if tiles not in (1, self.tiles(height, width)):
                raise ValueError(f"image {i} ({height}x{width}) has {tiles} tile(s); its canvas "
                                 f"{self.canvas(height, width)} gives {self.tiles(height, width)} (or 1: the base "
                                 "tile alone)")
        given = int(layouts[:, 0].sum())
        if given != num_tiles:
            raise ValueError(f"the image layouts give {given} tile(s) but pixel_values holds {num_tiles}")

    def visual_tokens(self, features: torch.Tensor, layouts: torch.Tensor, newline: torch.Tensor) -> torch.Tensor:
        """Every image's visual tokens in order, (M, D), from all tiles' features (N, P, D)."""
        self.check_layouts(layouts, features.shape[0])
        per_image = torch.split(features, layouts[:, 0].tolist())
        return torch.cat([self.image_tokens(f, h, w, newline)
                          for f, (_, h, w) in zip(per_image, layouts.tolist())])

    def hf_inputs(self, pixel_values: torch.Tensor, image_sizes: torch.Tensor,
                  batch_num_images: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """transformers' OneVision processor tensors -> (tiles (N, 3, S, S), layouts (I, 3)):
        pixel_values (I, max tiles, 3, S, S) padded with empty tiles (or the tiles (N, 3, S, S)),
        image_sizes (I, 2) as (height, width), batch_num_images (B,) images per row (a row with
        several images has them untiled; None: every image tiled)."""
        counts = [1] * len(image_sizes) if batch_num_images is None else batch_num_images.tolist()
        tiled = [n == 1 for n in counts for _ in range(n)]
        layouts = torch.tensor([[self.tiles(h, w, t), h, w] for (h, w), t in zip(image_sizes.tolist(), tiled)],
                               dtype=torch.long)
        if pixel_values.dim() == 5:
            pixel_values = torch.cat([image[:n] for image, n in zip(pixel_values, layouts[:, 0].tolist())])
        return pixel_values, layouts


class AnyResAdapter(MLPAdapter):
    """LLaVA's MLP adapter plus the newline embedding that closes each row of an image's tokens
    (LLaVA-OneVision's `image_newline`); it sits in the adapter, so it trains and freezes with it."""

    def __init__(self, cfg: AdapterConfig, vision_dim: int, llm_dim: int):
        super().__init__(cfg, vision_dim, llm_dim)
        self.image_newline = nn.Parameter(torch.empty(llm_dim))
        init_adapter_weights(self)
        with torch.no_grad():  # the reference's init: the scale of a unit-norm embedding
            self.image_newline.normal_(0.0, 1.0 / math.sqrt(llm_dim))
