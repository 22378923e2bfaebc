"""The data pipeline's types, in the order data flows through them (docs/architecture.md, "Data flow"):

    Record  (formats.py: one per line / row / shard member, images not yet decoded)
      -> Sample  (template.py + images.py: token ids, labels, decoded image tiles)
        -> PackedBatch  (packing.py: many samples in one flat sequence, no padding)

PackedBatch is the contract with the model (VLM.compute_loss) and the training loop.
Shape suffixes: T = total tokens of a pack, S = samples in a pack, N = image tiles in a pack;
for native-resolution models (data/native_images.py) P = patch rows, D = values per patch row,
I = images, V = videos.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:  # tensors appear in annotations only: the readers (formats.py) load without torch
    import torch

Modality = Literal["image", "text"]
RecordKind = Literal["chat", "caption", "text"]


@dataclass
class ImageRef:
    """Where an image's bytes are: a resolved path or the bytes themselves (parquet, tar, base64)."""

    path: Path | None = None
    data: bytes | None = None

    def describe(self) -> str:
        return str(self.path) if self.path is not None else f"<{len(self.data or b'')} bytes>"


VideoRef = ImageRef | list[ImageRef]
"""A video before decoding: a video file or a directory of frames (an ImageRef with a path), or
its frames in order."""


@dataclass
class Message:
    """One chat turn. `content` is text in which IMAGE_PLACEHOLDER marks where each image goes and
    VIDEO_PLACEHOLDER where each video goes."""

    role: Literal["system", "user", "assistant"]
    content: str


@dataclass
class Record:
    """A data record as read from disk, before tokenisation.

    kind decides supervision (data/template.py): chat -> assistant turns only; caption -> the
    caption (the assistant turn after the image); text -> every token of `text`.
    """

    id: str
    source: str
    kind: RecordKind
    messages: list[Message] = field(default_factory=list)
    images: list[ImageRef] = field(default_factory=list)
    text: str = ""
    meta: dict = field(default_factory=dict)
    videos: list[VideoRef] = field(default_factory=list)
    """One per VIDEO_PLACEHOLDER, in reading order."""

    @property
    def modality(self) -> Modality:
        return "image" if self.images or self.videos else "text"


@dataclass
class Sample:
    """One tokenised sample. input_ids already hold the expanded visual tokens (image_token_id
    repeated tokens_per_image per tile), so len(input_ids) is the sample's real cost.

    labels are aligned with input_ids (labels[i] is the target *at* position i, unshifted, as in
    transformers); the loss shifts inside each sample. IGNORE_INDEX marks unsupervised tokens.
    """

    id: str
    source: str
    input_ids: list[int]
    labels: list[int]
    pixel_values: torch.Tensor | None = None  # (N, 3, H, W) tiles of all images, in order; native: (P, D)
    tiles_per_image: list[int] = field(default_factory=list)
    # Native-resolution models only (None otherwise): each image's and video's grid, the videos' pixels.
    image_grid_thw: torch.Tensor | None = None  # (I, 3) int64 (1, patch rows, patch columns) per image
    pixel_values_videos: torch.Tensor | None = None  # (P, D) every video's patch rows, in order
    video_grid_thw: torch.Tensor | None = None  # (V, 3) int64 (temporal groups, rows, columns) per video
    second_per_grid_ts: list[float] = field(default_factory=list)
    """Seconds one temporal group of each video spans (Qwen2.5-VL's temporal positions)."""

    @property
    def modality(self) -> Modality:
        visual = self.tiles_per_image or self.image_grid_thw is not None or self.video_grid_thw is not None
        return "image" if visual else "text"

    def __len__(self) -> int:
        return len(self.input_ids)


@dataclass
class PackedBatch:
    """Samples concatenated into one flat sequence; attention never crosses `cu_seqlens`."""

    input_ids: torch.Tensor  # (T,) long
    labels: torch.Tensor  # (T,) long, unshifted, IGNORE_INDEX where unsupervised
    position_ids: torch.Tensor  # (T,) long, restarts at 0 for each sample
    cu_seqlens: torch.Tensor  # (S+1,) int32, cumulative sample lengths, starts at 0, ends at T
    pixel_values: torch.Tensor | None  # (N, 3, H, W) float, every tile of every image in order
    tiles_per_image: list[int]
    sample_ids: list[str]
    sources: list[str]  # one per sample, for per-source loss logging
    budget: int  # token budget of the pack: T / budget is the packing efficiency
    # Native-resolution models only, concatenated in sample order (None / empty otherwise).
    image_grid_thw: torch.Tensor | None = None  # (I, 3) int64
    pixel_values_videos: torch.Tensor | None = None  # (P, D)
    video_grid_thw: torch.Tensor | None = None  # (V, 3) int64
    second_per_grid_ts: list[float] = field(default_factory=list)  # one per video

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.numel())

    @property
    def num_samples(self) -> int:
        return len(self.sample_ids)

    @property
    def max_seqlen(self) -> int:
        return int((self.cu_seqlens[1:] - self.cu_seqlens[:-1]).max()) if self.num_samples else 0

    @property
    def modality(self) -> Modality:
        return "image" if self.pixel_values is not None or self.pixel_values_videos is not None else "text"
