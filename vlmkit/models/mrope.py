"""Multimodal rotary positions (M-RoPE, Qwen2-VL): three position axes per token.

A token of a native-resolution VLM (Qwen2-VL, Qwen2.5-VL, Qwen3-VL) has a temporal, a height and
a width position. Text tokens have all three equal and count up by one, as in 1-D RoPE; the
visual tokens of an image or video grid (t, h, w) after the vision tower's spatial merge start at
the position `p` reached by the text before them and take

    temporal  p + floor(frame * interval)   (interval: 1, or Qwen2.5-VL's seconds-based spacing)
    height    p + row
    width     p + column

after which the text goes on at `p + max(h, w)` (the grid's larger side, whatever its length in
time). A row's `rope_delta` is its largest position + 1 minus its number of tokens: when decoding,
the next token's position is its index + rope_delta (`continue_positions`), all three axes equal.

The decoder rotates each rotary frequency by one of the three axes (`frequency_axes`): the
frequencies are split into `mrope_section` chunks, contiguous (Qwen2-VL, Qwen2.5-VL) or
interleaved t, h, w, t, h, w, ... (Qwen3-VL). With equal axes that is plain 1-D RoPE, so text-only
input and decode steps after the prompt need no 3-axis positions at all.

Shape suffixes: B batch rows, T tokens, S packed samples, Dh head dim.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from vlmkit.models.config import MROPE_AXES

TEXT, IMAGE, VIDEO = 0, 1, 2
"""Token kinds, in the reference's numbering (its `mm_token_type_ids`)."""
TEMPORAL, HEIGHT, WIDTH = range(MROPE_AXES)
"""The position axes, in the order of the position ids' first dimension."""


def frequency_axes(mrope_section: Sequence[int], interleaved: bool) -> torch.Tensor:
    """The axis (TEMPORAL, HEIGHT, WIDTH) that rotates each of the sum(mrope_section) = Dh / 2
    rotary frequencies, as a (Dh / 2,) long tensor.

    Contiguous (Qwen2-VL, Qwen2.5-VL): the first mrope_section[0] frequencies follow the temporal
    position, the next mrope_section[1] the height, the last the width. Interleaved (Qwen3-VL):
    frequency j follows the height when j % 3 == 1 and j < 3 * mrope_section[1], the width when
    j % 3 == 2 and j < 3 * mrope_section[2], the temporal position otherwise, so that every axis
    spans low and high frequencies."""
    half = sum(mrope_section)
    if not interleaved:
        return torch.repeat_interleave(torch.arange(MROPE_AXES), torch.tensor(list(mrope_section)))
    j = torch.arange(half)
    axes = torch.full((half,), TEMPORAL, dtype=torch.long)
    for axis in (HEIGHT, WIDTH):
        axes[(j % MROPE_AXES == axis) & (j < MROPE_AXES * mrope_section[axis])] = axis
    return axes


@dataclass(frozen=True)
class MRopeLayout:
    """What position ids need to know of a model's prompts: which tokens stand for visual ones, the
    vision tower's spatial merge, and how each family spaces video frames.

    Qwen2-VL: `MRopeLayout(image_token_id, video_token_id, spatial_merge_size)`;
    Qwen2.5-VL: add `tokens_per_second` (frame k of a video then sits at
    floor(k * tokens_per_second * seconds per grid) on the temporal axis);
    Qwen3-VL: `video_frames_apart=True` (each frame is a block of its own, its timestamp text in
    between, so a video grid (t, h, w) is laid out as t grids (1, h, w))."""

    image_token_id: int
    video_token_id: int
    spatial_merge_size: int
    tokens_per_second: float | None = None
    video_frames_apart: bool = False

    def token_kinds(self, input_ids: torch.Tensor) -> torch.Tensor:
        """input_ids (...) -> the same shape of TEXT, IMAGE or VIDEO."""
        kinds = torch.full_like(input_ids, TEXT)
        kinds[input_ids == self.image_token_id] = IMAGE
        kinds[input_ids == self.video_token_id] = VIDEO
        return kinds


@dataclass(frozen=True)
class _Grid:
    """One image, video or video frame as laid out in the decoder: t x h x w tokens after the
    spatial merge, frame k on the temporal axis at floor(k * interval)."""

    t: int
    h: int
    w: int
    interval: torch.Tensor | float = 1

    @property
    def tokens(self) -> int:
        return self.t * self.h * self.w

    def positions(self, start: int, device: torch.device) -> torch.Tensor:
        """(3, t * h * w): the grid's tokens in raster order (frame, row, column) from `start`."""
        frame = (torch.arange(self.t, device=device) * self.interval).long()
        t, h, w = torch.meshgrid(frame, torch.arange(self.h, device=device), torch.arange(self.w, device=device),
                                 indexing="ij")
        return torch.stack([t, h, w]).reshape(MROPE_AXES, -1) + start


class _Grids:
    """The grids of a batch's images and videos, handed out in the order their tokens appear."""

    def __init__(self, layout: MRopeLayout, image_grid_thw: torch.Tensor | None,
                 video_grid_thw: torch.Tensor | None, video_seconds_per_grid: torch.Tensor | Sequence[float] | None):
        merge = layout.spatial_merge_size
        self.images = iter([_Grid(t, h // merge, w // merge) for t, h, w in _rows(image_grid_thw)])
        videos = _rows(video_grid_thw)
        if layout.tokens_per_second is None:
            intervals = [1] * len(videos)
        else:  # in float32, as transformers computes it, so that flooring lands on the same frames
            seconds = (torch.ones(len(videos)) if video_seconds_per_grid is None
                       else torch.as_tensor(video_seconds_per_grid, dtype=torch.float32).cpu())
            intervals = [layout.tokens_per_second * s for s in seconds]
        grids = []
        for (t, h, w), interval in zip(videos, intervals):
            count, frame_t = (t, 1) if layout.video_frames_apart else (1, t)
            grids += [_Grid(frame_t, h // merge, w // merge, interval)] * count
        self.videos = iter(grids)

    def next(self, kind: int) -> _Grid:
        grid = next(self.images if kind == IMAGE else self.videos, None)
        if grid is None:
            name = "image" if kind == IMAGE else "video"
            raise ValueError(f"more {name} tokens than {name}_grid_thw accounts for")
        return grid

    def check_all_used(self) -> None:
        for name, grids in (("image", self.images), ("video", self.videos)):
            if next(grids, None) is not None:
                raise ValueError(f"{name}_grid_thw has grids left after the last {name} token")


def _rows(grid_thw: torch.Tensor | None) -> list[tuple[int, int, int]]:
    return [] if grid_thw is None else [tuple(row) for row in grid_thw.tolist()]


def _runs(kinds: list[int]) -> Iterator[tuple[int, int]]:
    """(kind, length) of each run of equal kinds."""
    start = 0
    for i in range(1, len(kinds) + 1):
        if i == len(kinds) or kinds[i] != kinds[start]:
            yield kinds[start], i - start
            start = i


def _sequence_positions(kinds: torch.Tensor, grids: _Grids) -> torch.Tensor:
    """kinds (T,) of one sequence -> positions (3, T), taking its grids from `grids` in order."""
    device = kinds.device
    pieces, position = [], 0
    for kind, length in _runs(kinds.tolist()):
        if kind == TEXT:
            pieces.append(torch.arange(position, position + length, device=device).expand(MROPE_AXES, -1))
            position += length
            continue
        while length > 0:  # a run of visual tokens may hold several grids back to back
            grid = grids.next(kind)
            if grid.tokens > length:
                raise ValueError(f"a run of {length} visual tokens is shorter than its grid "
                                 f"{grid.t}x{grid.h}x{grid.w} ({grid.tokens} tokens)")
            pieces.append(grid.positions(position, device))
            position += max(grid.h, grid.w)
            length -= grid.tokens
    return torch.cat(pieces, dim=1) if pieces else torch.zeros(MROPE_AXES, 0, dtype=torch.long, device=device)


def rope_positions(input_ids: torch.Tensor, layout: MRopeLayout, *, image_grid_thw: torch.Tensor | None = None,
                   video_grid_thw: torch.Tensor | None = None,
                   video_seconds_per_grid: torch.Tensor | Sequence[float] | None = None,
                   attention_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """M-RoPE position ids of a padded batch, as transformers' `get_rope_index` gives them.

    input_ids (B, T); image_grid_thw / video_grid_thw (N, 3): the vision tower's patch grid of each
    image / video, in the order their tokens appear in the batch (row by row); video_seconds_per_grid
    (one per video, Qwen2.5-VL's `second_per_grid_ts`; default 1); attention_mask (B, T), 1 = real
    token, left or right padding.

    Returns positions (3, B, T) (temporal, height, width; 0 at pads) and rope_deltas (B, 1): the
    largest position of each row + 1 minus its number of real tokens (0 for text-only rows).
    Each run of visual tokens must hold whole grids, in order; every grid must be used."""
    B, T = input_ids.shape
    kinds = layout.token_kinds(input_ids)
    real = attention_mask.bool() if attention_mask is not None else torch.ones_like(input_ids, dtype=torch.bool)
    grids = _Grids(layout, image_grid_thw, video_grid_thw, video_seconds_per_grid)
    positions = torch.zeros(MROPE_AXES, B, T, dtype=torch.long, device=input_ids.device)
    deltas = []
    for row in range(B):
        row_positions = _sequence_positions(kinds[row][real[row]], grids)
        positions[:, row, real[row]] = row_positions
        deltas.append(int(row_positions.max()) + 1 - row_positions.shape[1] if row_positions.numel() else 0)
    grids.check_all_used()
    return positions, torch.tensor(deltas, dtype=torch.long, device=input_ids.device)[:, None]


def packed_rope_positions(input_ids: torch.Tensor, cu_seqlens: torch.Tensor, layout: MRopeLayout, *,
                          image_grid_thw: torch.Tensor | None = None, video_grid_thw: torch.Tensor | None = None,
                          video_seconds_per_grid: torch.Tensor | Sequence[float] | None = None) -> torch.Tensor:
    """M-RoPE position ids of a pack (several samples in one flat sequence, the layout of
    `AttnSpec.packed(cu_seqlens)`): input_ids (T,), cu_seqlens (S + 1,) -> positions (3, T),
    restarting at 0 in every sample; the grids are those of the pack's images / videos in order.
    Each sample's positions are what `rope_positions` gives it alone."""
    kinds = layout.token_kinds(input_ids)
    grids = _Grids(layout, image_grid_thw, video_grid_thw, video_seconds_per_grid)
    bounds = cu_seqlens.tolist()
    pieces = [_sequence_positions(kinds[start:end], grids) for start, end in zip(bounds[:-1], bounds[1:])]
    grids.check_all_used()
    return torch.cat(pieces, dim=1) if pieces else torch.zeros(MROPE_AXES, 0, dtype=torch.long, device=input_ids.device)


def continue_positions(token_positions: torch.Tensor, rope_deltas: torch.Tensor) -> torch.Tensor:
    """Positions of text tokens after a prompt, the decoding rule: each token's index in its row
    (token_positions (B, T), e.g. `KVCache.position_ids`) + the row's rope delta (B, 1) from
    `rope_positions`. The first generated token thus sits at the prompt's largest position + 1.

    The result is (B, T), one position for all three axes: `LLM.decode` takes it as it is, and
    with equal axes M-RoPE is plain RoPE, so decode steps keep the 1-D path."""
    return token_positions + rope_deltas.to(token_positions.device)
