"""`vlmkit train CONFIG [--out DIR] [--resume] [--set key=value ...]`

CONFIG is a YAML path or the name of a ready config (`tiny`, `demo`, `llava15`, `deepseek_vl`).
Every setting lives in the config (vlmkit/config.py); `--set` overrides any of them by its dotted
path, so there is no second copy of defaults here. Under torchrun each rank runs this same
command; FSDP2 shards the model over the ranks.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="YAML config path, or a ready config name (tiny, demo, llava15, deepseek_vl)")
    parser.add_argument("--out", default=None, help="output directory (default: runs/<config name>)")
    parser.add_argument("--resume", action="store_true",
                        help="continue from the newest checkpoint in --out (exactly where it stopped)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config field by dotted path, e.g. stages.0.steps=20 (repeatable)")


def run(args: argparse.Namespace) -> int:
    # Deferred: the trainer imports torch, which `vlmkit train --help` does without.
    from vlmkit.config import find_config, load_config
    from vlmkit.train.loop import train

    cfg = load_config(args.config, args.overrides)
    out = Path(args.out) if args.out else Path("runs") / find_config(args.config).stem
    final = train(cfg, out, resume=args.resume)
    print(f"vlmkit train: final checkpoint in {final}")
    return 0
