"""The web chat page in headless Chromium (Playwright): attach an image, ask, see the streamed answer.

Needs Debian's `chromium` at /usr/bin/chromium; the test skips without it. A screenshot is kept
under artifacts/ (gitignored).
"""

import os
from pathlib import Path

import pytest

from tests.serving_support import build_checkpoint, live_server, png_bytes
from vlmkit.api import VLM
from vlmkit.infer.engine import Engine
from vlmkit.serve.app import create_app
from vlmkit.serve.settings import ServerSettings

CHROMIUM = "/usr/bin/chromium"
ARTIFACTS = Path(__file__).resolve().parents[1] / "artifacts"

pytestmark = pytest.mark.skipif(not os.path.exists(CHROMIUM),
                                reason=f"{CHROMIUM} is absent (Debian package `chromium`); the web page test needs it")


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    model = VLM.from_pretrained(build_checkpoint(tmp_path_factory.mktemp("web") / "model"))
    with live_server(create_app(Engine(model), ServerSettings(model_name="tiny-vlm"))) as url:
        yield url, model


def test_ask_about_an_image_and_see_the_streamed_answer(served, tmp_path):
    sync_api = pytest.importorskip("playwright.sync_api")
    url, model = served
    image = tmp_path / "picture.png"
    image.write_bytes(png_bytes(5, size=64))
    expected = model.generate([{"role": "user", "content": [{"type": "image", "image": str(image)},
                                                            {"type": "text", "text": "What is in the picture?"}]}],
                              max_new_tokens=40)
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=[
            "--no-sandbox", "--headless", "--disable-gpu", "--disable-background-networking",
            "--disable-component-update", "--no-first-run"])
        try:
            page = browser.new_page(viewport={"width": 1000, "height": 640})
            external = []
            page.on("request", lambda r: external.append(r.url) if not r.url.startswith(url) else None)
            page.goto(url + "/")
            page.wait_for_function("document.getElementById('model-name').textContent === 'tiny-vlm'")
            page.fill("#max-tokens", "40")
            page.set_input_files("#image", str(image))
            page.wait_for_selector("#attachment img")
            page.fill("#prompt", "What is in the picture?")
            page.click("#send")
            answer = page.wait_for_selector(".msg.assistant[data-state=done]", timeout=60_000)
            assert answer.query_selector(".text").text_content() == expected
            assert page.locator(".msg.user img").count() == 1
            assert not [u for u in external if not u.startswith("data:")]  # nothing fetched from elsewhere
            ARTIFACTS.mkdir(exist_ok=True)
            page.screenshot(path=str(ARTIFACTS / "webchat.png"))
            # a second turn continues the conversation; an error shows in the page
            page.fill("#max-tokens", "100000")
            page.fill("#prompt", "And then?")
            page.click("#send")
            error = page.wait_for_selector(".msg.error[data-state=error]", timeout=60_000)
            assert "max_tokens" in error.inner_text()
        finally:
            browser.close()
