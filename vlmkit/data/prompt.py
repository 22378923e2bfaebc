"""A conversation -> prompt ids + pixel tensors: the one home of prompt building.

    encode_images(images, processor, tokens_per_tile, videos)   images (and videos) -> VisualInputs
                                                                (pixels, grids, token counts)
    build_prompt(messages, tokenizer, processor, tokens_per_tile, resolve_image, resolve_video)
                                                                -> Prompt ready for generation
                                                                (infer/engine.py)
    visuals_first(messages)                                     each message's image and video parts
                                                                before its text (LLaVA-OneVision's
                                                                template's order)

Generation (infer/generate.py: `VLM.generate`, the chat command), the server (serve/serving.py)
and both evaluation modes (eval/) build their prompts here, and the training pipeline
(data/pipeline.py) counts visual tokens with the same `encode_images`, so a conversation becomes
the same tokens wherever it comes from. Messages are read by data/messages.py, templated by
data/template.py; images decoded and tiled by data/images.py (`ImageProcessor`), split into tiles
and the whole image by data/split_images.py (`SplitImageProcessor`: Idefics3, SmolVLM), or, for
native-resolution models, patchified at their own size by data/native_images.py
(`NativeImageProcessor`, which also takes videos).

Shape suffixes: N = image tiles, S = the encoder's image size; native: P = patch rows, D = values
per row, I = images, V = videos.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from vlmkit.data.anyres import AnyResImageProcessor
from vlmkit.data.images import ImageProcessor
from vlmkit.data.messages import VISUAL_PARTS, ImageResolver, VideoResolver, keep_image, read_conversation
from vlmkit.data.native_images import NativeImageProcessor, stack_videos
from vlmkit.data.padded_images import PaddedImageProcessor
from vlmkit.data.split_images import SplitImageProcessor
from vlmkit.data.template import ImageTiles, ImageTokens, VideoTokens, encode_prompt
from vlmkit.data.types import ImageRef, Sample
from vlmkit.errors import BadRecordError


@dataclass
class VisualInputs:
    """The model-side form of a conversation's images (and, for native models, videos)."""

    pixel_values: torch.Tensor | None  # (N, 3, S, S) tiles, a hybrid model's (N, R) rows (data/padded_images.py),
    # or native (P, D) patch rows; None without images
    tiles_per_image: list[int] = field(default_factory=list)
    visual_tokens: list[ImageTokens] = field(default_factory=list)
    """Visual tokens each image takes in the text: its tiles x tokens per tile, or its grid's tokens;
    for a split image its `ImageTiles` (the prompt writes where each tile sits)."""
    grid_thw: torch.Tensor | None = None  # native: (I, 3) int64 per image; anyres: each image's layout
    pixel_values_videos: torch.Tensor | None = None  # native: (P, D) every video's rows, in order
    video_grid_thw: torch.Tensor | None = None  # native: (V, 3) int64 per video
    second_per_grid_ts: list[float] = field(default_factory=list)
    """Seconds one temporal group of each video spans."""
    video_tokens: list[VideoTokens] = field(default_factory=list)
    """How each video is written in the text (data/template.py)."""

    def sample(self, id: str, source: str, input_ids: list[int], labels: list[int]) -> Sample:
        """A tokenised sample carrying these images and videos (training and likelihood scoring)."""
        return Sample(id, source, input_ids, labels, self.pixel_values, self.tiles_per_image, self.grid_thw,
                      self.pixel_values_videos, self.video_grid_thw, self.second_per_grid_ts)


ImageProcessors = (ImageProcessor | SplitImageProcessor | PaddedImageProcessor | AnyResImageProcessor
                   | NativeImageProcessor)
"""What prepares a model's images (the model's `image_processor()`)."""


def encode_images(images: list, processor: ImageProcessors, tokens_per_tile: int, videos: list = ()
                  ) -> VisualInputs:
    """Decode (with the processor's pixel limit), check and tile each image; count its visual tokens.
    A NativeImageProcessor patchifies images at their own size and takes videos too
    (`tokens_per_tile` is unused then: a grid sets its own count).

    images: anything data/images.py's `load_image` reads (ImageRef, path, bytes, PIL image).
    videos: anything data/native_images.py's `open_video` reads, or a VideoRef (data/types.py).
    Raises BadRecordError (missing_image, not_an_image, image_too_large, unexpected_video, ...)."""
    if isinstance(processor, NativeImageProcessor):
        return _encode_native(images, videos, processor)
    if videos:
        raise BadRecordError("unexpected_video", f"{len(videos)} video(s), but this model's image processor "
                             "takes images only")
    loaded = [processor.load(image) for image in images]
    if isinstance(processor, AnyResImageProcessor):
        return _encode_anyres(loaded, processor)
    tiles = [processor(image) for image in loaded]  # each (N_i, 3, S, S)
    tiles_per_image = [t.shape[0] for t in tiles]
    visual_tokens: list[ImageTokens] = [n * tokens_per_tile for n in tiles_per_image]
    if isinstance(processor, SplitImageProcessor):
        visual_tokens = [ImageTiles(*processor.grid(*image.size), tokens_per_tile) for image in loaded]
    return VisualInputs(pixel_values=torch.cat(tiles) if tiles else None, tiles_per_image=tiles_per_image,
                        visual_tokens=visual_tokens)


def _encode_anyres(images: list, processor: AnyResImageProcessor) -> VisualInputs:
    """Any-resolution tiles: an image is tiled only when it is its conversation's one image, as
    LLaVA-OneVision's processor does; its layout row goes with its tiles (data/anyres.py)."""
    tiled = len(images) == 1
    tiles = [processor(image, tiled) for image in images]  # each (N_i, 3, S, S)
    layouts = [processor.layout_row(image, t) for image, t in zip(images, tiles)]
    return VisualInputs(pixel_values=torch.cat(tiles) if tiles else None, tiles_per_image=[t.shape[0] for t in tiles],
                        visual_tokens=[processor.tokens(image, tiled) for image in images],
                        grid_thw=torch.tensor(layouts, dtype=torch.long) if tiles else None)


def _encode_native(images: list, videos: list, processor: NativeImageProcessor) -> VisualInputs:
    encoded = processor.images(images)
    clips = [processor.video(_video_source(video)) for video in videos]
    pixel_values_videos, video_grid_thw = stack_videos(clips)
    with_times = processor.config.timestamps_in_prompt
    return VisualInputs(
        pixel_values=encoded.pixel_values, visual_tokens=encoded.visual_tokens,
        grid_thw=encoded.grid_thw if images else None, pixel_values_videos=pixel_values_videos,
        video_grid_thw=video_grid_thw if clips else None,
        second_per_grid_ts=[clip.seconds_per_group for clip in clips],
        video_tokens=[VideoTokens(clip.grid_thw[0], clip.tokens_per_group,
                                  tuple(clip.group_times) if with_times else None) for clip in clips])


def _video_source(video):
    """A VideoRef's path (a video file or frame directory); anything else as given."""
    return video.path if isinstance(video, ImageRef) and video.path is not None else video


@dataclass
class Prompt:
    """A tokenised conversation ready for prefill."""

    input_ids: list[int]
    pixel_values: torch.Tensor | None = None  # (N, 3, S, S) tiles of all images, in order; native: (P, D)
    # Native-resolution models only (None / empty otherwise), as VisualInputs; anyres models' image
    # layouts travel in image_grid_thw too.
    image_grid_thw: torch.Tensor | None = None  # (I, 3) int64
    pixel_values_videos: torch.Tensor | None = None  # (P, D)
    video_grid_thw: torch.Tensor | None = None  # (V, 3) int64
    second_per_grid_ts: list[float] = field(default_factory=list)


def build_prompt(messages: list[dict], tokenizer, processor: ImageProcessors, tokens_per_tile: int,
                 resolve_image: ImageResolver = keep_image, resolve_video: VideoResolver | None = None) -> Prompt:
    """An OpenAI-style conversation -> prompt ids ending with the assistant header, and its pixels.

    resolve_image: what an image part's value becomes before decoding (data/messages.py); the
    default keeps it as given. resolve_video: the same for video parts; None (the default) refuses
    them (unexpected_video), so a caller takes videos only by saying how. Raises BadRecordError
    (bad structure, unreadable image, ...). A tokenizer whose template writes a message's images
    before its text (`Tokenizer.visuals_first`) gets each message's visual parts first."""
    if tokenizer.visuals_first:
        messages = visuals_first(messages)
    conversation = read_conversation(messages, resolve_image, resolve_video, tokenizer.part_separator,
                                     tokenizer.image_part)
    visual = encode_images(conversation.images, processor, tokens_per_tile, conversation.videos)
    ids = encode_prompt(conversation.messages, tokenizer, visual.visual_tokens, visual.video_tokens)
    return Prompt(ids, visual.pixel_values, visual.grid_thw, visual.pixel_values_videos, visual.video_grid_thw,
                  visual.second_per_grid_ts)


def visuals_first(messages: list[dict]) -> list[dict]:
    """Each message's image and video parts moved before its text parts (both kept in their order),
    as a template that writes visuals first renders them; anything malformed is left as it is for
    read_conversation's checks."""
    if not isinstance(messages, list):
        return messages
    return [{**m, "content": sorted(m["content"], key=lambda part: not _is_visual(part))}
            if isinstance(m, dict) and isinstance(m.get("content"), list) else m for m in messages]


def _is_visual(part) -> bool:
    return isinstance(part, dict) and part.get("type") in VISUAL_PARTS
