"""Native-resolution training throughput on the CPU: vlmkit (packed) against transformers'
Qwen2VLForConditionalGeneration (padded batches), the same weights, the same samples.

Model (both sides): a small Qwen2-VL built from a transformers config with random weights (vision
4 x 128, patch 14, 2 x 2 merge; decoder 6 x 256, vocab 4096), saved and loaded into vlmkit with
`VLM.from_hf`. Samples, built once: one image each, sides drawn in 64..256 px (a mix of sizes and
aspect ratios), then a text of log-uniform length in 16..512 tokens, supervised on the text.
Each step takes the next `--batch` samples: transformers gets them right-padded to the longest,
with its image processor's tensors; vlmkit gets them as one pack (`collate` + `VLM.pack_loss`,
NativeImageProcessor's patch rows) whose budget is the padded batch's slots. AdamW, fp32.

    .venv/bin/python bench/native_train_throughput.py [--steps 6] [--repeats 3] [--batch 8] [--threads 2]

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
from vlmkit.data.native_images import NativeImageProcessor, processor_config_from_dir  # noqa: E402
from vlmkit.data.packing import collate  # noqa: E402
from vlmkit.data.types import Sample  # noqa: E402

VOCAB = 4096
IMAGE_TOKEN, VIDEO_TOKEN, VISION_START, VISION_END = VOCAB - 4, VOCAB - 3, VOCAB - 2, VOCAB - 1
TEXT_IDS = VOCAB - 4  # text tokens are drawn below the special ones
PATCH, MERGE, TEMPORAL = 14, 2, 2
MIN_SIDE, MAX_SIDE = 64, 256  # image sides in pixels, drawn independently (so aspect ratios vary)
MIN_PIXELS, MAX_PIXELS = 56 * 56, 256 * 256


def build_qwen2_vl(path: Path) -> transformers.Qwen2VLForConditionalGeneration:
    """A random small Qwen2-VL, saved (weights and image processor settings) under `path`."""
    text = dict(vocab_size=VOCAB, hidden_size=256, intermediate_size=1024, num_hidden_layers=6,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                bos_token_id=None, eos_token_id=None,  # the default Qwen ids lie outside this vocabulary
                rope_parameters=dict(rope_type="default", rope_theta=10000.0, mrope_section=[8, 12, 12]))
    vision = dict(depth=4, embed_dim=128, hidden_size=256, mlp_ratio=4, num_heads=4, patch_size=PATCH,
                  spatial_merge_size=MERGE, temporal_patch_size=TEMPORAL)
    config = transformers.Qwen2VLConfig(text_config=text, vision_config=vision, image_token_id=IMAGE_TOKEN,
                                        video_token_id=VIDEO_TOKEN, vision_start_token_id=VISION_START,
                                        vision_end_token_id=VISION_END)
    torch.manual_seed(0)
    model = transformers.Qwen2VLForConditionalGeneration(config)
    model.save_pretrained(path)
    image_processor().save_pretrained(path)
    return model


def image_processor() -> transformers.Qwen2VLImageProcessorPil:
    return transformers.Qwen2VLImageProcessorPil(patch_size=PATCH, merge_size=MERGE, temporal_patch_size=TEMPORAL,
                                              min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS)


def make_samples(n: int, processor: NativeImageProcessor, seed: int) -> tuple[list[Image.Image], list[Sample]]:
    """n (image, vlmkit Sample) pairs: vision start, the image's merged tokens, vision end, text."""
    images, samples = [], []
    for i, (image, text) in enumerate(random_examples(n, seed, MIN_SIDE, MAX_SIDE, TEXT_IDS)):
        visual = processor.images([image])
        visual_ids = [VISION_START] + [IMAGE_TOKEN] * visual.visual_tokens[0] + [VISION_END]
        samples.append(Sample(id=str(i), source="bench", input_ids=visual_ids + text,
                              labels=[IGNORE_INDEX] * len(visual_ids) + text, pixel_values=visual.pixel_values,
                              image_grid_thw=visual.grid_thw))
        images.append(image)
    return images, samples


def padded_batch(images: list[Image.Image], samples: list[Sample]) -> dict:
    """transformers' inputs for these samples: right-padded ids, mask, labels, processor tensors."""
    text = right_padded(samples)
    pixels = image_processor()(images=images, return_tensors="pt")
    grids = torch.cat([s.image_grid_thw for s in samples])
    if not torch.equal(pixels["image_grid_thw"], grids):
        raise RuntimeError("transformers' processor and NativeImageProcessor sized the images differently")
    return dict(**text, pixel_values=pixels["pixel_values"], image_grid_thw=pixels["image_grid_thw"],
                mm_token_type_ids=(text["input_ids"] == IMAGE_TOKEN).long())


def main() -> int:
    args = parse_args(__doc__.splitlines()[0])
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        hf = build_qwen2_vl(Path(tmp))
        ours = VLM.from_hf(tmp)
        processor = NativeImageProcessor(processor_config_from_dir(tmp))
    steps = WARMUP_STEPS + args.steps
    images, samples = make_samples(args.batch * steps, processor, seed=1)
    chunks = step_slices(args.batch, steps)
    padded = [padded_batch(images[c], samples[c]) for c in chunks]
    packed = [collate(samples[c], budget=b["input_ids"].numel()) for c, b in zip(chunks, padded)]
    timed_tokens, slots = timed_token_counts(padded)

    sides = {THEIRS: Side(hf, lambda m, b: m(**b).loss, padded),
             OURS: Side(ours, lambda m, b: m.pack_loss(b).loss, packed)}
    measure(sides, args.steps, args.repeats)

    visual = sum(s.input_ids.count(IMAGE_TOKEN) for s in samples[args.batch * WARMUP_STEPS:])
    print(f"Qwen2-VL vision 4x128 + decoder 6x256, {sum(p.numel() for p in hf.parameters()) / 1e6:.1f}M params; "
          f"threads {torch.get_num_threads()}; {args.repeats} x {args.steps} timed steps of {args.batch} samples "
          f"({MIN_SIDE}..{MAX_SIDE} px images, text log-uniform 16..512); {timed_tokens} tokens per repeat "
          f"({visual} visual), padding {100 * (1 - timed_tokens / slots):.1f}% of transformers' slots")
    report_rates(sides, timed_tokens)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
