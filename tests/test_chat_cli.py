"""`vlmkit chat`: one-shot and an interactive session fed through a pipe."""

import io
import subprocess
import sys

import pytest

from tests.serving_support import build_checkpoint, png_bytes
from vlmkit.api import VLM
from vlmkit.chat_cli import ChatSession
from vlmkit.cli import main


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_checkpoint(tmp_path_factory.mktemp("chat") / "model")


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    path = tmp_path_factory.mktemp("img") / "a.png"
    path.write_bytes(png_bytes(3))
    return path


@pytest.fixture(scope="module")
def model(model_dir):
    return VLM.from_pretrained(model_dir)


def chat(*args, stdin: str = "") -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vlmkit", "chat", *map(str, args)], input=stdin,
                          capture_output=True, text=True, timeout=300)


def test_one_shot_with_image_matches_generate(model_dir, image, model, capsys):
    code = main(["chat", "--model", str(model_dir), "--image", str(image), "--max-new-tokens", "16", "what", "is", "it?"])
    out = capsys.readouterr()
    assert code == 0, out.err
    expected = model.generate([{"role": "user", "content": [{"type": "image", "image": str(image)},
                                                            {"type": "text", "text": "what is it?"}]}],
                              max_new_tokens=16)
    assert out.out == expected + "\n"


def test_images_after_text_puts_the_image_after_the_question(model_dir, image, model, capsys):
    code = main(["chat", "--model", str(model_dir), "--image", str(image), "--images-after-text",
                 "--max-new-tokens", "16", "what", "is", "it?"])
    out = capsys.readouterr()
    assert code == 0, out.err
    after = model.generate([{"role": "user", "content": [{"type": "text", "text": "what is it?"},
                                                         {"type": "image", "image": str(image)}]}],
                           max_new_tokens=16)
    assert out.out == after + "\n"
    session = ChatSession(model, dict(max_new_tokens=2), images_after_text=True)
    session.attach(str(image))
    session.ask("what is it?", io.StringIO())
    assert [p["type"] for p in session.messages[0]["content"]] == ["text", "image"]


def test_interactive_session_through_a_pipe(model_dir, image, model):
    script = f"describe\n/image {image}\nwhat colour?\n/image /no/such.png\n/reset\ndescribe\n/bogus\n/exit\nnever\n"
    out = chat("--model", model_dir, "--max-new-tokens", "12", stdin=script)
    assert out.returncode == 0, out.stderr
    # the same turns through the session object, with its own output buffer
    session = ChatSession(model, dict(max_new_tokens=12))
    buf = io.StringIO()
    first = session.ask("describe", buf)
    session.attach(str(image))
    second = session.ask("what colour?", buf)
    assert len(session.messages) == 4  # two turns of history
    session.reset()
    third = session.ask("describe", buf)
    assert third == first  # /reset forgets the conversation
    head = f"{first}\n[image attached: {image}]\n{second}\n[cannot use image: "
    tail = f"[conversation reset]\n{third}\n[unknown command '/bogus'"
    assert out.stdout.startswith(head)
    bad_image_line, _, rest = out.stdout[len(head):].partition("\n")
    assert "/no/such.png" in bad_image_line
    assert rest.startswith(tail) and rest.count("\n") == tail.count("\n") + 1  # /exit stopped before "never"


def test_missing_model_is_a_clear_error(tmp_path, capsys):
    assert main(["chat", "--model", str(tmp_path / "nothing"), "hi"]) == 2
    assert "config.json" in capsys.readouterr().err
