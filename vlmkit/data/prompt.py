"""A conversation -> prompt ids + pixel tensors: the one home of prompt building.

    encode_images(images, processor, tokens_per_tile)      images -> VisualInputs (pixels, counts)
    build_prompt(messages, tokenizer, processor, tokens_per_tile, resolve_image) -> Prompt
                                                           ready for generation (infer/engine.py)

Generation (infer/generate.py: `VLM.generate`, the chat command), the server (serve/serving.py)
and both evaluation modes (eval/) build their prompts here, and the training pipeline
(data/pipeline.py) counts visual tokens with the same `encode_images`, so a conversation becomes
the same tokens wherever it comes from. Messages are read by data/messages.py, templated by
data/template.py; images decoded and tiled by data/images.py.

Shape suffixes: N = image tiles, S = the encoder's image size.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from vlmkit.data.images import ImageProcessor
from vlmkit.data.messages import ImageResolver, keep_image, to_messages
from vlmkit.data.template import encode_prompt


@dataclass
class VisualInputs:
    """The model-side form of a conversation's images."""

    pixel_values: torch.Tensor | None  # (N, 3, S, S): every tile of every image, in order; None without images
    tiles_per_image: list[int] = field(default_factory=list)
    visual_tokens: list[int] = field(default_factory=list)
    """Visual tokens each image takes in the text: its tiles x tokens per tile."""


def encode_images(images: list, processor: ImageProcessor, tokens_per_tile: int) -> VisualInputs:
    """Decode (with the processor's pixel limit), check and tile each image; count its visual tokens.

    images: anything data/images.py's `load_image` reads (ImageRef, path, bytes, PIL image).
    Raises BadRecordError (missing_image, not_an_image, image_too_large, ...)."""
    tiles = [processor(processor.load(image)) for image in images]  # each (N_i, 3, S, S)
    tiles_per_image = [t.shape[0] for t in tiles]
    return VisualInputs(pixel_values=torch.cat(tiles) if tiles else None, tiles_per_image=tiles_per_image,
                        visual_tokens=[n * tokens_per_tile for n in tiles_per_image])


@dataclass
class Prompt:
    """A tokenised conversation ready for prefill."""

    input_ids: list[int]
    pixel_values: torch.Tensor | None = None  # (N, 3, S, S) tiles of all images, in order


def build_prompt(messages: list[dict], tokenizer, processor: ImageProcessor, tokens_per_tile: int,
                 resolve_image: ImageResolver = keep_image) -> Prompt:
    """An OpenAI-style conversation -> prompt ids ending with the assistant header, and its pixels.

    resolve_image: what an image part's value becomes before decoding (data/messages.py); the
    default keeps it as given. Raises BadRecordError (bad structure, unreadable image, ...)."""
    msgs, images = to_messages(messages, resolve_image)
    visual = encode_images(images, processor, tokens_per_tile)
    return Prompt(encode_prompt(msgs, tokenizer, visual.visual_tokens), visual.pixel_values)
