"""`vlmkit train CONFIG [--out DIR] [--resume] [--set key=value ...]`

CONFIG is a YAML path or the name of a ready config (`tiny`, `demo`, `llava15`, `deepseek_vl`).
Every setting lives in the config (vlmkit/config.py); `--set` overrides any of them by its dotted
path, so there is no second copy of defaults here. Under torchrun each rank runs this same
command; FSDP2 shards the model over the ranks.

Exit codes: 0 the run finished (DIR/final written); 2 an error vlmkit names (a config, data or
checkpoint problem, too many non-finite steps, a checkpoint that could not be written);
PREEMPTED_EXIT_CODE (75) the run was stopped by SIGTERM or SIGUSR1 after writing a checkpoint,
and `--resume` continues it exactly (docs/reliability.md).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

PREEMPTED_EXIT_CODE = 75
"""Exit code of a run stopped by a preemption signal with its checkpoint written: sysexits.h's
EX_TEMPFAIL ("try again later"), which a job script can test to requeue the run with --resume."""


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
    from vlmkit.train.loop import Preempted, train

    cfg = load_config(args.config, args.overrides)
    out = Path(args.out) if args.out else Path("runs") / find_config(args.config).stem
    try:
        final = train(cfg, out, resume=args.resume)
    except Preempted as e:
        print(f"vlmkit train: {e}", file=sys.stderr)
        return PREEMPTED_EXIT_CODE
    print(f"vlmkit train: final checkpoint in {final}")
    return 0
