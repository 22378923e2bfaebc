"""InternVL training throughput on the CPU: vlmkit (packed) against transformers'
InternVLForConditionalGeneration (padded batches), the same weights, the same samples.

Model (both sides): a small InternVL built from a transformers config with random weights
(InternViT 4 x 128 on 112 px tiles, patch 14, pixel shuffle by 2 -> 16 tokens per tile; Qwen2
decoder 6 x 256, vocab 4096), saved with its image processor's settings (GotOcr2: up to 6 tiles
and a thumbnail) and loaded into vlmkit with `VLM.from_hf`. Samples, built once: one image each,
sides drawn in 64..256 px (1 to 6 tiles, plus the thumbnail past one), as `<img>`, its
`<IMG_CONTEXT>` tokens and `</img>`, then a text of log-uniform length in 16..512 tokens,
supervised on the text. Each step takes the next `--batch` samples: transformers gets them
right-padded to the longest, with its image processor's tiles; vlmkit gets them as one pack
(`collate` + `VLM.pack_loss`, tiles from `VLM.image_processor`) whose budget is the padded batch's
slots. AdamW, fp32.

    .venv/bin/python bench/family_train_throughput.py [--steps 6] [--repeats 3] [--batch 8] [--threads 2]

Prints non-pad training tokens/s of each side (best of the repeats, which interleave the sides so
that a change of load on a shared machine reaches both alike) and the ratio vlmkit / transformers.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import torch
import transformers
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from train_comparison import (OURS, THEIRS, WARMUP_STEPS, Side, measure, parse_args, random_examples,  # noqa: E402
                              report_rates, right_padded, step_slices, timed_token_counts)
from vlmkit.api import VLM  # noqa: E402
from vlmkit.constants import IGNORE_INDEX  # noqa: E402
from vlmkit.data.packing import collate  # noqa: E402
from vlmkit.data.prompt import encode_images  # noqa: E402
from vlmkit.data.types import Sample  # noqa: E402

VOCAB = 4096
IMAGE_TOKEN, IMAGE_START, IMAGE_END = VOCAB - 3, VOCAB - 2, VOCAB - 1  # <IMG_CONTEXT>, <img>, </img>
TEXT_IDS = VOCAB - 3  # text tokens are drawn below the special ones
TILE, PATCH, MAX_TILES = 112, 14, 6
TOKENS_PER_TILE = (TILE // PATCH) ** 2 // 4  # pixel shuffle by 2
MIN_SIDE, MAX_SIDE = 64, 256  # image sides in pixels, drawn independently (so aspect ratios vary)
IMAGENET = dict(image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225])
TILE_ATOL = 1e-5  # both processors resize the same way; their tiles agree to float rounding


def build_internvl(path: Path) -> transformers.InternVLForConditionalGeneration:
    """A random small InternVL, saved (weights and image processor settings) under `path`."""
    vision = dict(hidden_size=128, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
                  image_size=TILE, patch_size=PATCH, attention_bias=True, norm_type="layer_norm")
    text = dict(model_type="qwen2", vocab_size=VOCAB, hidden_size=256, intermediate_size=1024, num_hidden_layers=6,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                bos_token_id=None, eos_token_id=None)  # the default Qwen ids lie outside this vocabulary
    config = transformers.InternVLConfig(vision_config=vision, text_config=text, image_token_id=IMAGE_TOKEN,
                                         image_seq_length=TOKENS_PER_TILE)
    torch.manual_seed(0)
    model = transformers.InternVLForConditionalGeneration(config)
    model.save_pretrained(path)
    image_processor().save_pretrained(path)
    return model


def image_processor() -> transformers.GotOcr2ImageProcessorPil:
    return transformers.GotOcr2ImageProcessorPil(size=dict(height=TILE, width=TILE), crop_to_patches=True,
                                                 max_patches=MAX_TILES, **IMAGENET)


def make_samples(n: int, ours: VLM, seed: int) -> tuple[list[Image.Image], list[Sample]]:
    """n (image, vlmkit Sample) pairs: <img>, the image's <IMG_CONTEXT> tokens, </img>, text."""
    processor, images, samples = ours.image_processor(), [], []
    for i, (image, text) in enumerate(random_examples(n, seed, MIN_SIDE, MAX_SIDE, TEXT_IDS)):
        visual = encode_images([image], processor, ours.config.tokens_per_tile)
        visual_ids = [IMAGE_START] + [IMAGE_TOKEN] * visual.visual_tokens[0] + [IMAGE_END]
        samples.append(visual.sample(str(i), "bench", visual_ids + text, [IGNORE_INDEX] * len(visual_ids) + text))
        images.append(image)
    return images, samples


def padded_batch(images: list[Image.Image], samples: list[Sample]) -> dict:
    """transformers' inputs for these samples: right-padded ids, mask, labels, its processor's tiles."""
    pixels = image_processor()(images=images, return_tensors="pt")
    tiles = torch.cat([s.pixel_values for s in samples])
    if pixels["num_patches"].tolist() != [n for s in samples for n in s.tiles_per_image] or not torch.allclose(
            pixels["pixel_values"], tiles, rtol=0, atol=TILE_ATOL):
        raise RuntimeError("transformers' image processor and vlmkit's tiled the images differently")
    return dict(**right_padded(samples), pixel_values=pixels["pixel_values"])


def main() -> int:
    args = parse_args(__doc__.splitlines()[0])
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        hf = build_internvl(Path(tmp))
        ours = VLM.from_hf(tmp)
    steps = WARMUP_STEPS + args.steps
    images, samples = make_samples(args.batch * steps, ours, seed=1)
    chunks = step_slices(args.batch, steps)
    padded = [padded_batch(images[c], samples[c]) for c in chunks]
    packed = [collate(samples[c], budget=b["input_ids"].numel()) for c, b in zip(chunks, padded)]
    timed_tokens, slots = timed_token_counts(padded)

    sides = {THEIRS: Side(hf, lambda m, b: m(**b).loss, padded),
             OURS: Side(ours, lambda m, b: m.pack_loss(b).loss, packed)}
    measure(sides, args.steps, args.repeats)

    timed = samples[args.batch * WARMUP_STEPS:]
    visual = sum(s.input_ids.count(IMAGE_TOKEN) for s in timed)
    tiles = sum(n for s in timed for n in s.tiles_per_image)
    print(f"InternVL vision 4x128 + decoder 6x256, {sum(p.numel() for p in hf.parameters()) / 1e6:.1f}M params; "
          f"threads {torch.get_num_threads()}; {args.repeats} x {args.steps} timed steps of {args.batch} samples "
          f"({MIN_SIDE}..{MAX_SIDE} px images, {tiles} tiles of {TILE} px, text log-uniform 16..512); "
          f"{timed_tokens} tokens per repeat ({visual} visual), padding {100 * (1 - timed_tokens / slots):.1f}% of "
          f"transformers' slots")
    report_rates(sides, timed_tokens)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
