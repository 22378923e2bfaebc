"""`vlmkit build`: assemble a VLM from a local HF vision tower and a local HF decoder LLM.

    vlmkit build --vision DIR --llm DIR [--adapter mlp|pixel_shuffle|resampler] --out DIR

The vision tower and the LLM keep their pretrained weights; the adapter is new (train it first,
e.g. LLaVA's stage 1). The LLM directory's tokenizer is taken along; an image token is added when
its vocabulary lacks one. The result is a vlmkit checkpoint directory (VLM.from_pretrained).
An AIMv2 tower (Aimv2VisionModel or Aimv2Model) with a Qwen3 decoder is SAIL-VL2's shape.

With a whole Qwen2-VL / Qwen2.5-VL / Qwen3-VL(-MoE) directory as --vision, the result is a
native-resolution VLM: that directory's tower (its mergers kept when they map to the LLM's width,
else new; --adapter unused), its M-RoPE layout, token ids and video spacing, in front of the LLM
(an MoE one such as Qwen3-MoE included: Seed1.5-VL's shape).
"""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--vision", required=True,
                        help="HF SigLIP / CLIP / AIMv2 vision directory, or a whole Qwen-VL directory (its native tower)")
    parser.add_argument("--llm", required=True, help="HF Llama / Qwen2 / Qwen3 / Qwen3-MoE / Mistral directory")
    parser.add_argument("--adapter", default="mlp", choices=["mlp", "pixel_shuffle", "resampler"],
                        help="vision-to-LLM adapter kind (default: mlp, LLaVA-1.5)")
    parser.add_argument("--out", required=True, help="checkpoint directory to write")


def run(args: argparse.Namespace) -> int:
    # Imported here, not at the top, to keep torch out of `vlmkit --help`.
    from vlmkit.api import VLM

    model = VLM.from_hf(vision=args.vision, llm=args.llm, adapter=args.adapter)
    out = model.save_pretrained(args.out, meta={"built_from": {"vision": str(args.vision), "llm": str(args.llm)}})
    n = sum(p.numel() for p in model.parameters())
    visual = ("native-resolution images" if model.config.is_native
              else f"{model.config.tokens_per_image} visual tokens per image")
    print(f"wrote {out} ({n / 1e6:.1f}M parameters, {visual}, image token id {model.config.image_token_id})")
    return 0
