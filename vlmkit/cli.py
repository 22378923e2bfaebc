"""The `vlmkit` command. Each subcommand lives in its own module, which exposes

    add_arguments(parser: argparse.ArgumentParser) -> None
    run(args: argparse.Namespace) -> int            # the exit code

Only the chosen subcommand's module is imported, so `vlmkit --help` stays fast. Errors that
vlmkit raises on purpose (VlmkitError) print as one clear line, never as a stack trace.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from vlmkit import __version__
from vlmkit.errors import VlmkitError

# name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("vlmkit.train.demo", "the embedded default: synthetic world, tiny VLM trained on the CPU, evaluated"),
    "train": ("vlmkit.train.cli", "train a model through the stages of a YAML config"),
    "eval": ("vlmkit.eval.cli", "evaluate a checkpoint on a benchmark"),
    "chat": ("vlmkit.chat_cli", "chat with a checkpoint in the terminal"),
    "serve": ("vlmkit.serve.cli", "OpenAI-compatible HTTP server with a web chat page"),
    "export": ("vlmkit.export_cli", "export a checkpoint to another format (hf-llava)"),
    "build": ("vlmkit.build_cli", "assemble a VLM from local HF vision and LLM checkpoints"),
    "data": ("vlmkit.data.cli", "generate the synthetic world, inspect data files"),
}


def _top_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vlmkit",
                                     description="Build, train, evaluate and serve vision-language models.")
    parser.add_argument("--version", action="version", version=f"vlmkit {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, help_) in COMMANDS.items():
        sub.add_parser(name, help=help_, add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in COMMANDS:
        _top_parser().parse_args(argv or ["--help"])
        return 2
    name, rest = argv[0], argv[1:]
    module_name, help_ = COMMANDS[name]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name and e.name.startswith("vlmkit"):
            print(f"vlmkit {name}: not available in this build ({e.name} is missing)", file=sys.stderr)
            return 2
        raise
    parser = argparse.ArgumentParser(prog=f"vlmkit {name}", description=help_)
    module.add_arguments(parser)
    args = parser.parse_args(rest)
    try:
        return int(module.run(args) or 0)
    except VlmkitError as e:
        print(f"vlmkit {name}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"vlmkit {name}: interrupted", file=sys.stderr)
        return 130
