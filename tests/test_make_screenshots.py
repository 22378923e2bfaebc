"""docs/make_screenshots.py: the web page screenshot made through a real `vlmkit serve` and the page
in headless Chromium, on a tiny random checkpoint beside a hand-written world benchmark.

Needs Debian's `chromium` at /usr/bin/chromium; the test skips without it (as test_webpage.py)."""

import importlib.util
import json
import os
import sys
from pathlib import Path

import pytest

from tests.serving_support import build_checkpoint, png_bytes
from vlmkit.api import VLM
from vlmkit.errors import ConfigError

SCRIPT = Path(__file__).resolve().parents[1] / "docs" / "make_screenshots.py"
CHROMIUM = "/usr/bin/chromium"
MAX_TOKENS = 12
PNG_MAGIC = b"\x89PNG"

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not os.path.exists(CHROMIUM),
                                 reason=f"{CHROMIUM} is absent (Debian package `chromium`); the script needs it")]


def load_script():
    """The script as a module (it is not in a package); registered first, as dataclasses needs."""
    spec = importlib.util.spec_from_file_location("make_screenshots", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def write_world(world: Path) -> Path:
    """A benchmark as the synthetic world writes it: two images, questions of several categories."""
    (world / "images").mkdir(parents=True)
    rows = []
    for index in range(2):
        name = f"images/test_{index:06d}.png"
        (world / name).write_bytes(png_bytes(index, size=32))
        rows += [{"id": f"{index}-shape", "images": [name], "question": "What shape is the red object?",
                  "answer": "cross", "category": "shape"},
                 {"id": f"{index}-color", "images": [name], "question": "What color is the shape in the top left?",
                  "answer": f"blue{index}", "category": "color"},
                 {"id": f"{index}-count", "images": [name], "question": "How many shapes are there?",
                  "answer": str(index + 3), "category": "count"}]
    (world / "synth.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    return world / "images" / "test_000000.png"


def test_screenshot_of_a_conversation_with_a_follow_up(tmp_path, capsys):
    pytest.importorskip("playwright.sync_api")
    model_dir = build_checkpoint(tmp_path / "run" / "final")
    image = write_world(tmp_path / "run" / "world")
    out = tmp_path / "shot.png"

    answers = load_script().main(["--model", str(model_dir), "--max-tokens", str(MAX_TOKENS), "--out", str(out)])

    assert out.read_bytes().startswith(PNG_MAGIC)
    # the first image's count question, then its color question, each answered as the model answers
    # that conversation: the page's answers, the second one continuing the first turn
    count_q, color_q = "How many shapes are there?", "What color is the shape in the top left?"
    model = VLM.from_pretrained(model_dir)
    first_turn = {"role": "user", "content": [{"type": "image", "image": str(image)},
                                              {"type": "text", "text": count_q}]}
    first = model.generate([first_turn], max_new_tokens=MAX_TOKENS)
    second = model.generate([first_turn, {"role": "assistant", "content": first},
                             {"role": "user", "content": [{"type": "text", "text": color_q}]}],
                            max_new_tokens=MAX_TOKENS)
    assert answers == [first, second]
    printed = capsys.readouterr().out
    assert f"{count_q!r} -> {first!r} (expected '3')" in printed
    assert f"{color_q!r} -> {second!r} (expected 'blue0')" in printed


def test_a_missing_model_or_image_is_refused(tmp_path):
    script = load_script()
    with pytest.raises(ConfigError, match="not a checkpoint directory"):
        script.main(["--model", str(tmp_path / "absent"), "--out", str(tmp_path / "shot.png")])
    model_dir = build_checkpoint(tmp_path / "final")
    with pytest.raises(ConfigError, match="does not exist"):
        script.main(["--model", str(model_dir), "--image", str(tmp_path / "absent.png"),
                     "--out", str(tmp_path / "shot.png")])
    assert not (tmp_path / "shot.png").exists()
