"""Make docs/img/webchat.png: `vlmkit serve`'s web chat page with a trained demo model answering a
question about a world image, then a follow-up question in the same conversation.

    python docs/make_screenshots.py --model runs/demo/final [--image PATH] [--question Q ...]
                                    [--benchmark JSONL] [--max-tokens N] [--out PNG]

It starts the real server (`vlmkit serve --model DIR` on a free local port), drives the page in
headless Chromium (Playwright on Debian's /usr/bin/chromium) as a user would: attach the image, ask,
wait for the answer, ask the follow-up, wait, screenshot. It prints each answer beside the expected
one from the world's benchmark file, so a reader sees whether the screenshot shows right answers.

By default the image and questions come from the world beside the model (`DIR/../world/synth.jsonl`,
as `vlmkit demo` lays out its run): the first test image, and its count then its color question,
in their training wording. The page sends an attached image before the text (the layout the demo
trains); it has no option for the other order.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from vlmkit.errors import ConfigError, VlmkitError
from vlmkit.eval.benchmarks import BenchItem, read_benchmark
from vlmkit.eval.prompts import PLAIN_PROMPTS, question_text

DEFAULT_OUT = Path(__file__).resolve().parent / "img" / "webchat.png"
DEFAULT_CATEGORIES = ("count", "color")
"""The default questions: the image's question of each category, in this order."""

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--headless", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--no-first-run"]
VIEWPORT = {"width": 1000, "height": 640}

SERVER_START_TIMEOUT_S = 300
"""Loading torch and the model on a busy machine can take minutes."""
SERVER_STOP_TIMEOUT_S = 60
HEALTH_POLL_S = 0.2
ANSWER_TIMEOUT_MS = 300_000
"""One answer, decoded on the CPU of a busy machine."""


@dataclass
class Turn:
    question: str
    expected: str | None
    """The benchmark's answer to this question about the image; None when it does not hold it."""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, required=True, metavar="DIR",
                        help="a trained checkpoint, e.g. runs/demo/final")
    parser.add_argument("--image", type=Path, default=None, metavar="PATH",
                        help="the image to attach (default: the benchmark's first image)")
    parser.add_argument("--question", action="append", default=[], dest="questions", metavar="TEXT",
                        help="a question to ask, repeated for each turn (default: the image's "
                             + " then ".join(DEFAULT_CATEGORIES) + " questions from the benchmark)")
    parser.add_argument("--benchmark", type=Path, default=None, metavar="JSONL",
                        help="the world's benchmark file (default: MODEL/../world/synth.jsonl)")
    parser.add_argument("--max-tokens", type=int, default=None, metavar="N",
                        help="the page's max tokens (default: the page's)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, metavar="PNG",
                        help=f"the PNG to write (default {DEFAULT_OUT})")
    return parser.parse_args(argv)


def plan_turns(benchmark: Path, image: Path | None, questions: list[str]) -> tuple[Path, list[Turn]]:
    """The image to attach and the questions to ask, each with its expected answer when known."""
    if image is not None and not image.is_file():
        raise ConfigError(f"image {image} does not exist")
    if not benchmark.is_file():
        if image is None or not questions:
            raise ConfigError(f"no benchmark file {benchmark} to pick the image and questions from; "
                              "pass --benchmark, or --image and --question")
        return image, [Turn(q, None) for q in questions]
    items = [it for it in read_benchmark(benchmark).items if it.images and it.images[0].path is not None]
    if image is None:
        if not items:
            raise ConfigError(f"{benchmark} has no question about an image file")
        image = items[0].images[0].path
    about_image = [it for it in items if it.images[0].path == image.resolve()]
    if questions:
        answers = {trained_wording(it): it.answer for it in about_image}
        return image, [Turn(q, answers.get(q)) for q in questions]
    return image, [Turn(trained_wording(it), it.answer) for it in default_items(about_image, benchmark, image)]


def trained_wording(item: BenchItem) -> str:
    """The question as the world's training data asks it: options listed, no added instruction."""
    return question_text(item, PLAIN_PROMPTS, list_options=True)


def default_items(about_image: list[BenchItem], benchmark: Path, image: Path) -> list[BenchItem]:
    """The image's first question of each of DEFAULT_CATEGORIES."""
    chosen = []
    for category in DEFAULT_CATEGORIES:
        of_category = [it for it in about_image if it.category == category]
        if not of_category:
            raise ConfigError(f"{benchmark} has no {category} question about {image}; pass --question")
        chosen.append(of_category[0])
    return chosen


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def is_healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(url + "/health", timeout=1) as response:
            return response.status == 200
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return False


@contextlib.contextmanager
def served(model: Path) -> Iterator[str]:
    """`vlmkit serve --model MODEL` on a free local port, as a subprocess; yields its base URL once
    /health answers 200, and stops it (SIGTERM, as a user's Ctrl-C) afterwards."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryFile() as log:
        server = subprocess.Popen([sys.executable, "-m", "vlmkit", "serve", "--model", str(model),
                                   "--port", str(port)], stdout=log, stderr=subprocess.STDOUT)
        try:
            wait_until_healthy(server, url, log)
            yield url
        finally:
            server.terminate()
            try:
                server.wait(timeout=SERVER_STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()


def wait_until_healthy(server: subprocess.Popen, url: str, log) -> None:
    deadline = time.monotonic() + SERVER_START_TIMEOUT_S
    while not is_healthy(url):
        if server.poll() is not None:
            log.seek(0)
            last_line = (log.read().decode(errors="replace").strip().splitlines() or ["(no output)"])[-1]
            raise ConfigError(f"vlmkit serve exited with code {server.returncode}: {last_line}")
        if time.monotonic() > deadline:
            raise ConfigError(f"vlmkit serve did not answer {url}/health within {SERVER_START_TIMEOUT_S} s")
        time.sleep(HEALTH_POLL_S)


def ask(page, question: str, turn: int) -> str:
    """Send `question` and wait for the page to finish the reply of this turn; its text."""
    page.fill("#prompt", question)
    page.click("#send")
    page.wait_for_function(
        "n => document.querySelectorAll('.msg[data-state=done], .msg[data-state=error]').length >= n",
        arg=turn + 1, timeout=ANSWER_TIMEOUT_MS)
    reply = page.locator(".msg:not(.user)").nth(turn)
    text = reply.locator(".text").text_content()
    if reply.get_attribute("data-state") == "error":
        raise ConfigError(f"the page shows an error for {question!r}: {text}")
    return text


def fit_conversation(page) -> None:
    """Make the viewport tall enough for the whole conversation: a full-page screenshot would leave
    the page's fixed composer over the last answer."""
    height = page.evaluate("document.documentElement.scrollHeight")
    if height > VIEWPORT["height"]:
        page.set_viewport_size({"width": VIEWPORT["width"], "height": height})


def screenshot_chat(url: str, image: Path, questions: list[str], out: Path, max_tokens: int | None) -> list[str]:
    """In headless Chromium: attach `image`, ask each question in turn, screenshot into `out`;
    the answers as the page shows them."""
    # Deferred: Playwright is only in the test extra; `--help` and the input checks work without it.
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport=VIEWPORT)
            page.goto(url + "/")
            page.wait_for_function("document.getElementById('model-name').textContent !== ''")
            if max_tokens is not None:
                page.fill("#max-tokens", str(max_tokens))
            page.set_input_files("#image", str(image))
            page.wait_for_selector("#attachment img")
            answers = [ask(page, question, turn) for turn, question in enumerate(questions)]
            out.parent.mkdir(parents=True, exist_ok=True)
            fit_conversation(page)
            page.screenshot(path=str(out))
        finally:
            browser.close()
    return answers


def main(argv: list[str] | None = None) -> list[str]:
    """Make the screenshot; print and return the page's answers."""
    args = parse_args(argv)
    if not (args.model / "config.json").is_file():
        raise ConfigError(f"--model {args.model} is not a checkpoint directory (no config.json)")
    if not os.path.exists(CHROMIUM):
        raise ConfigError(f"{CHROMIUM} is absent (Debian package `chromium`)")
    benchmark = args.benchmark or args.model.resolve().parent / "world" / "synth.jsonl"
    image, turns = plan_turns(benchmark, args.image, args.questions)
    with served(args.model) as url:
        answers = screenshot_chat(url, image, [t.question for t in turns], args.out, args.max_tokens)
    print(f"image: {image}")
    for turn, answer in zip(turns, answers):
        expected = "unknown" if turn.expected is None else repr(turn.expected)
        print(f"{turn.question!r} -> {answer!r} (expected {expected})")
    print(f"screenshot: {args.out}")
    return answers


if __name__ == "__main__":
    try:
        main()
    except VlmkitError as e:
        print(f"make_screenshots: error: {e}", file=sys.stderr)
        sys.exit(2)
