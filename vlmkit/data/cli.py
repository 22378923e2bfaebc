"""`vlmkit data synth` (write the synthetic world) and `vlmkit data inspect` (look at data files).

synth writes the world of data/world.py: `--layout fixed` (the demo's scenes) or `native` (grids
for native-resolution models), with `--clips` motion clips per split (WorldSpec's n_*_clips), each
record's image first or after its question (`--prompt-layout`, WorldSpec's prompt_layout). inspect reports what
data/inspection.py counts: records by modality, bad records by reason, token lengths (exact with
`--tokenizer DIR`, byte-level without), packing efficiency at `--budget`.
"""

from __future__ import annotations

import argparse
import json
import sys

from vlmkit.data.formats import FORMATS
from vlmkit.data.synth import DEFAULT_PROMPT_LAYOUT, IMAGE_SIZE, LAYOUTS, PROMPT_LAYOUTS
from vlmkit.data.world import generate

SPLITS = ("train", "val", "test")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    synth = sub.add_parser("synth", help="write the synthetic visual world (images, LLaVA JSON, messages, text)")
    synth.add_argument("--out", required=True, help="output directory")
    synth.add_argument("--scenes", type=int, default=20000,
                       help="training scenes (validation gets 1/40 of that, test 1/20)")
    synth.add_argument("--image-size", type=int, default=IMAGE_SIZE, help="image side in pixels")
    synth.add_argument("--layout", choices=LAYOUTS, default="fixed",
                       help="fixed: the demo's 3x3 scenes; native: grids of several shapes and cell sizes")
    synth.add_argument("--clips", type=clip_counts, default=(0, 0, 0), metavar="N | TRAIN,VAL,TEST",
                       help="motion clips: N in each split, or one count per split (default: none)")
    synth.add_argument("--prompt-layout", choices=PROMPT_LAYOUTS, default=DEFAULT_PROMPT_LAYOUT,
                       help="where each record's image goes in its first user turn: before the question "
                            f"(LLaVA's layout) or after it (default: {DEFAULT_PROMPT_LAYOUT})")
    synth.add_argument("--seed", type=int, default=0)
    inspect = sub.add_parser("inspect", help="count records, bad records by reason, lengths, packing efficiency")
    inspect.add_argument("paths", nargs="+", metavar="PATH", help="data files or directories")
    inspect.add_argument("--format", default="auto", choices=("auto", *FORMATS))
    inspect.add_argument("--root", default=None, help="image root (default: each file's directory)")
    inspect.add_argument("--tokenizer", default=None, help="tokenizer directory (default: byte-level lengths)")
    inspect.add_argument("--budget", type=int, default=4096, help="packing token budget")
    inspect.add_argument("--tokens-per-image", type=int, default=64, help="visual tokens per image tile")
    inspect.add_argument("--image-size", type=int, default=384, help="vision encoder input size")
    inspect.add_argument("--max-tiles", type=int, default=1, help="dynamic tiling: most tiles per image")
    inspect.add_argument("--json", action="store_true", help="print one JSON object instead of a report")


def clip_counts(text: str) -> tuple[int, int, int]:
    """`--clips`: "N" (N clips in each split) or "TRAIN,VAL,TEST" -> (train, val, test)."""
    try:
        counts = [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected N or TRAIN,VAL,TEST (whole numbers), got {text!r}") from None
    if len(counts) == 1:
        counts *= len(SPLITS)
    if len(counts) != len(SPLITS) or min(counts) < 0:
        raise argparse.ArgumentTypeError(f"expected N or TRAIN,VAL,TEST (counts >= 0), got {text!r}")
    return tuple(counts)


def run(args: argparse.Namespace) -> int:
    if args.action == "synth":
        return _synth(args)
    # Imported here to keep torch (the pipeline, packing and image decoding it runs) out of
    # `vlmkit data --help`.
    from vlmkit.data.inspection import format_report, inspect_paths

    report = inspect_paths(args.paths, fmt=args.format, root=args.root, tokenizer_dir=args.tokenizer,
                           budget=args.budget, tokens_per_image=args.tokens_per_image,
                           image_size=args.image_size, max_tiles=args.max_tiles)
    print(json.dumps(report, indent=1) if args.json else format_report(report))
    return 0


def _synth(args: argparse.Namespace) -> int:
    n = args.scenes
    n_train_clips, n_val_clips, n_test_clips = args.clips
    result = generate(args.out, n_train=n, n_val=max(1, n // 40), n_test=max(1, n // 20),
                      image_size=args.image_size, seed=args.seed, layout=args.layout, n_train_clips=n_train_clips,
                      n_val_clips=n_val_clips, n_test_clips=n_test_clips, prompt_layout=args.prompt_layout,
                      progress=sys.stderr.isatty())
    print(json.dumps(result, indent=1, default=str))
    return 0


def main(argv: list[str] | None = None) -> int:  # `python -m vlmkit.data.cli`
    parser = argparse.ArgumentParser(prog="vlmkit data")
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
