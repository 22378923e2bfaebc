"""`vlmkit export`: write a vlmkit checkpoint in another format.

    vlmkit export --model DIR --to hf OUT
    vlmkit export --model DIR --to hf-llava OUT
    vlmkit export --model DIR --adapter RUN/adapters/STAGE --to hf OUT    (the adapter merged first)

hf: the transformers directory of whatever the model is (`VLM.export_hf`): a native-resolution
model as its Qwen2-VL / Qwen2.5-VL / Qwen3-VL family (models/hf/qwen_vl.py), one with an InternViT
tower as InternVL (models/hf/internvl.py), any other as llava-hf. hf-llava: a directory
transformers' LlavaForConditionalGeneration loads (models/hf/llava.py). Each says which models it
can express and refuses the others with the reason.
"""

from __future__ import annotations

import argparse

FORMATS = ("hf", "hf-llava")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="a vlmkit checkpoint or a transformers VLM directory (VLM.load)")
    parser.add_argument("--adapter", default=None,
                        help="a LoRA adapter directory (peft's format, e.g. RUN/adapters/STAGE) to merge into --model")
    parser.add_argument("--to", required=True, choices=FORMATS,
                        help="target format: hf (the model's own transformers family) or hf-llava")
    parser.add_argument("out", help="directory to write")


def run(args: argparse.Namespace) -> int:
    # Imported here, not at the top, to keep torch out of `vlmkit --help`.
    from vlmkit.api import VLM
    from vlmkit.models.hf.llava import check_llava_exportable

    model = VLM.load(args.model, adapter=args.adapter)
    if args.to == "hf":
        out = model.export_hf(args.out)
    else:
        check_llava_exportable(model.config)
        out = model.export_hf_llava(args.out)
    print(f"wrote {out} ({args.to})")
    return 0
