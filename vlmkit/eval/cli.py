"""`vlmkit eval`: a checkpoint on a benchmark file (or the built-in `synth`), with a report.

    vlmkit eval --model runs/demo/final --bench synth
    vlmkit eval --model DIR --bench mmbench_dev_en.tsv --circular --batch-size 16 --out runs/mmb
    vlmkit eval --model DIR --bench pope_adversarial.jsonl --image-root coco/val2014 --json
    vlmkit eval --model DIR --bench sqa.jsonl --mode ppl --text heldout.jsonl

Writes DIR/eval.json, eval.md, eval.png and eval.predictions.jsonl (eval/report.py); prints the
Markdown table, or with --json the JSON object alone on stdout (the progress bar goes to stderr).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

from vlmkit.errors import VlmkitError
from vlmkit.eval.report import markdown_report, write_report


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="a vlmkit checkpoint or a transformers VLM directory (VLM.load)")
    parser.add_argument("--adapter", default=None,
                        help="a LoRA adapter directory (peft's format, e.g. RUN/adapters/STAGE) to merge into --model")
    parser.add_argument("--bench", help="benchmark file (.tsv MMBench, .jsonl / .json) or built-in name: synth")
    parser.add_argument("--mode", choices=("gen", "ppl"), default="gen",
                        help="gen: greedy generation + answer extraction; ppl: score each option's likelihood")
    parser.add_argument("--circular", action="store_true", help="CircularEval: right only under every option rotation")
    parser.add_argument("--limit", type=int, default=None, help="evaluate the first N questions only")
    parser.add_argument("--batch-size", type=int, default=8, help="questions per batch")
    parser.add_argument("--max-new-tokens", type=int, default=None,
                        help="gen mode: longest reply (default 16; 40 for synth, whose replies show their steps)")
    parser.add_argument("--blind", action="store_true",
                        help="blank every image and video frame (the image-free baseline)")
    parser.add_argument("--image-root", default=None,
                        help="folder image and video paths resolve under and must stay in "
                             "(default: the benchmark file's)")
    parser.add_argument("--text", default=None, help="also measure perplexity on this held-out text JSONL")
    parser.add_argument("--out", default=None, help="report folder (default: eval/<bench>-<mode> under the cwd)")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    parser.add_argument("--json", action="store_true", help="print the JSON report to stdout")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def _default_out(args: argparse.Namespace) -> Path:
    name = Path(args.bench).stem if args.bench else "text"
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", name)
    suffix = "".join(s for s, on in (("-circular", args.circular), ("-blind", args.blind)) if on)
    return Path("eval") / f"{name}-{args.mode}{suffix}"


def run(args: argparse.Namespace) -> int:
    # imported here, not at the top: they load torch, which `vlmkit eval --help` should not wait for
    import torch

    from vlmkit.api import VLM
    from vlmkit.eval.ppl import text_perplexity
    from vlmkit.eval.runner import evaluate

    if not args.bench and not args.text:
        raise VlmkitError("give --bench (a benchmark file or 'synth') and/or --text (held-out text JSONL)")
    out = Path(args.out) if args.out else _default_out(args)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model = VLM.load(args.model, adapter=args.adapter).to(device)
    progress = not args.no_progress
    report: dict = {"model": str(args.model)}
    rows: list[dict] = []
    if args.bench:
        result = evaluate(model, args.bench, mode=args.mode, circular=args.circular, limit=args.limit,
                          batch_size=args.batch_size, blind=args.blind, max_new_tokens=args.max_new_tokens,
                          image_root=args.image_root, cache_dir=out / "cache", progress=progress)
        report.update(result.to_dict())
        rows = [r.to_dict() for r in result.rows]
    if args.text:
        report["text_perplexity"] = text_perplexity(model, args.text, limit=args.limit, progress=progress)
    if args.bench:
        paths = write_report(report, rows, out)
        print(f"vlmkit eval: report in {paths['json']}", file=sys.stderr)
    else:
        out.mkdir(parents=True, exist_ok=True)
        (out / "eval.json").write_text(json.dumps(report, indent=2) + "\n")
    if args.json:
        print(json.dumps(report, indent=2))
    elif args.bench:
        print(markdown_report(report), end="")
        if args.text:
            print(f"\nHeld-out text perplexity: {report['text_perplexity']['perplexity']:.3f}")
    else:
        print(f"Held-out text perplexity: {report['text_perplexity']['perplexity']:.3f}")
    return 0
