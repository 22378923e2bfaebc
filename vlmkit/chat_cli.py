"""`vlmkit chat --model DIR [--image PATH] [PROMPT]`: talk to a checkpoint in the terminal.

With a PROMPT it answers once and exits. Without one it reads turns from stdin (a terminal or a
pipe) and keeps the conversation; answers stream as they are generated. Commands:

    /image PATH   attach an image to your next message
    /reset        forget the conversation (and attached images)
    /exit         quit (end of input does too)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TextIO

from vlmkit.errors import BadRecordError, VlmkitError

HELP = "commands: /image PATH (attach to your next message), /reset, /exit"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="a vlmkit checkpoint or a transformers VLM directory (VLM.load)")
    parser.add_argument("--adapter", default=None,
                        help="a LoRA adapter directory (peft's format, e.g. RUN/adapters/STAGE) to merge into --model")
    parser.add_argument("--image", action="append", default=[], help="image for the (first) message; repeatable")
    parser.add_argument("prompt", nargs="*", help="answer this once and exit; omit for an interactive session")
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--repetition-penalty", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--system", default=None, help="system message")
    parser.add_argument("--images-after-text", action="store_true",
                        help="put attached images after your text instead of before it (how `vlmkit demo`'s "
                             "world asks; LLaVA-style models expect the default)")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")


def run(args: argparse.Namespace) -> int:
    # Imported here, not at the top, to keep torch out of `vlmkit chat --help`.
    import torch

    from vlmkit.api import VLM

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = VLM.load(args.model, adapter=args.adapter).to(device).eval()
    sampling = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                    top_k=args.top_k, repetition_penalty=args.repetition_penalty, seed=args.seed)
    session = ChatSession(model, sampling, system=args.system, images_after_text=args.images_after_text)
    for path in args.image:
        session.attach(path)
    if args.prompt:
        session.ask(" ".join(args.prompt), sys.stdout)
        return 0
    return session.repl(sys.stdin, sys.stdout)


class ChatSession:
    """A multi-turn conversation with one model; images are checked when attached."""

    def __init__(self, model, sampling: dict, system: str | None = None, images_after_text: bool = False):
        self.model = model
        self.sampling = sampling
        self.system = system
        self.images_after_text = images_after_text
        self.messages: list[dict] = []
        self.pending_images: list = []

    def reset(self) -> None:
        self.messages, self.pending_images = [], []

    def attach(self, path: str) -> None:
        # Imported here, not at the top, to keep torch out of `vlmkit chat --help` (data/ imports it).
        from vlmkit.data.images import load_image

        self.pending_images.append(load_image(Path(path).expanduser()))

    def ask(self, text: str, out: TextIO) -> str:
        """Send one user turn, stream the answer to `out`, and keep both in the history."""
        # Imported here, not at the top, to keep torch out of `vlmkit chat --help`.
        from vlmkit.data.messages import user_content
        from vlmkit.infer.generate import stream_messages

        turn = {"role": "user",
                "content": user_content(text, self.pending_images, images_after_text=self.images_after_text)}
        history = ([{"role": "system", "content": self.system}] if self.system else []) + self.messages
        pieces = []
        for delta in stream_messages(self.model, history + [turn], **self.sampling):
            pieces.append(delta)
            out.write(delta)
            out.flush()
        out.write("\n")
        out.flush()
        answer = "".join(pieces)
        self.messages += [turn, {"role": "assistant", "content": answer}]
        self.pending_images = []
        return answer

    def repl(self, inp: TextIO, out: TextIO) -> int:
        """Read turns and commands from `inp` until /exit or the end of input."""
        interactive = inp.isatty()
        if interactive:
            out.write(f"vlmkit chat ({HELP})\n")
        while True:
            if interactive:
                out.write("> ")
                out.flush()
            line = inp.readline()
            if not line:
                return 0
            line = line.strip()
            if not line:
                continue
            if line.startswith("/"):
                if not self.command(line, out):
                    return 0
                continue
            try:
                self.ask(line, out)
            except VlmkitError as e:
                out.write(f"[error: {e}]\n")
                out.flush()

    def command(self, line: str, out: TextIO) -> bool:
        """Run one /command; False when it ends the session."""
        name, _, rest = line.partition(" ")
        path = rest.strip()
        if name == "/exit":
            return False
        if name == "/reset":
            self.reset()
            out.write("[conversation reset]\n")
        elif name == "/image" and path:
            try:
                self.attach(path)
                out.write(f"[image attached: {path}]\n")
            except BadRecordError as e:
                out.write(f"[cannot use image: {e}]\n")
        else:
            out.write(f"[unknown command {line!r}; {HELP}]\n")
        out.flush()
        return True
