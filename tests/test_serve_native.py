"""The server on a native-resolution model (a tiny random Qwen2-VL with its tokenizer and processor
config), driven by the official `openai` client: images of any size through the model's own
processor, videos as `video_url` parts (frame directories, animated images, data URLs), streaming,
and the refusals, each naming its part while the server keeps answering."""

import io
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest
from PIL import Image

from tests.serving_support import (NATIVE_MAX_PIXELS, build_checkpoint, build_qwen2_vl_dir, data_url, live_server,
                                   png_bytes)
from vlmkit.api import VLM
from vlmkit.data.prompt import Prompt, build_prompt
from vlmkit.infer.engine import Engine
from vlmkit.infer.generate import prompt_for
from vlmkit.infer.sampling import SamplingParams
from vlmkit.serve.app import create_app
from vlmkit.serve.settings import ImageLimits, ServerSettings

pytest.importorskip("transformers")

NEW_TOKENS = 6
MAX_VIDEOS = 1
MAX_FRAMES = 6
FRAME_SIZE = (16, 16)
CLIP_FRAMES = 4
MP4_FPS = 4
SMALL, LARGE = (20, 36), (90, 60)  # (height, width): within and far beyond the processor's max_pixels


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return VLM.from_hf(build_qwen2_vl_dir(tmp_path_factory.mktemp("native") / "qwen2_vl"))


def _frame(seed: int) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (*FRAME_SIZE, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def _write_mp4(path: Path, frames: list[Image.Image]) -> None:
    av = pytest.importorskip("av")
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=MP4_FPS)
        stream.width, stream.height, stream.pix_fmt = *frames[0].size, "yuv420p"
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_image(frame)))
        container.mux(stream.encode())


def _gif_bytes(frames: list[Image.Image]) -> bytes:
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:], duration=250, loop=0)
    return buf.getvalue()


@pytest.fixture(scope="module")
def allowed(tmp_path_factory):
    """A directory the server may read: a clip as frame files, the same clip as a GIF, a long
    clip, a corrupt video file and directories with a corrupt first or second frame."""
    root = tmp_path_factory.mktemp("allowed")
    frames = [_frame(seed) for seed in range(CLIP_FRAMES)]
    (root / "clip").mkdir()
    for i, frame in enumerate(frames):
        frame.save(root / "clip" / f"{i:03d}.png")
    (root / "clip.gif").write_bytes(_gif_bytes(frames))
    (root / "long").mkdir()
    for i in range(MAX_FRAMES + 1):
        _frame(i).save(root / "long" / f"{i:03d}.png")
    (root / "broken.mp4").write_bytes(np.random.default_rng(0).bytes(4096))
    (root / "bad_frames").mkdir()
    (root / "bad_frames" / "000.png").write_bytes(b"not a png at all")
    (root / "bad_later_frame").mkdir()
    frames[0].save(root / "bad_later_frame" / "000.png")
    (root / "bad_later_frame" / "001.png").write_bytes(b"not a png at all")
    return root


def _settings(allowed: Path) -> ServerSettings:
    return ServerSettings(model_name="tiny", max_batch=4, max_tokens_cap=64,
                          images=ImageLimits(max_bytes=200_000, max_pixels=300 * 300, max_images=3,
                                             max_videos=MAX_VIDEOS, max_video_bytes=200_000,
                                             max_video_frames=MAX_FRAMES, allow_dir=allowed))


@pytest.fixture(scope="module")
def server(model, allowed):
    with live_server(create_app(Engine(model), _settings(allowed))) as url:
        yield url


@pytest.fixture(scope="module")
def llava_server(tmp_path_factory, allowed):
    """A LLaVA-shaped model (fixed-size tiles): it takes images only."""
    llava = VLM.from_pretrained(build_checkpoint(tmp_path_factory.mktemp("llava") / "model"))
    with live_server(create_app(Engine(llava), _settings(allowed))) as url:
        yield url


@pytest.fixture()
def client(server):
    return openai.OpenAI(base_url=server + "/v1", api_key="unused", max_retries=0, timeout=60)


def ask(client, content, **kw):
    return client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": content}],
                                          temperature=0, max_tokens=NEW_TOKENS, extra_body={"ignore_eos": True},
                                          **kw)


def post(url, content):
    return httpx.post(url + "/v1/chat/completions", timeout=60,
                      json={"messages": [{"role": "user", "content": content}], "max_tokens": 2})


def image_part(url):
    return {"type": "image_url", "image_url": {"url": url}}


def video_part(url):
    return {"type": "video_url", "video_url": {"url": url}}


def text_part(text):
    return {"type": "text", "text": text}


def greedy_answer(model, prompt: Prompt) -> str:
    """What the engine decodes greedily for `prompt`, as text."""
    params = SamplingParams(max_new_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True)
    return "".join(delta for _, delta in Engine(model).run([prompt], params))


def video_prompt(model, video, text: str) -> Prompt:
    """The prompt of a user turn with one video (a path) and a question, built as the Python side does."""
    messages = [{"role": "user", "content": [{"type": "video", "video": video}, text_part(text)]}]
    return build_prompt(messages, model.tokenizer, model.image_processor(), model.config.tokens_per_tile,
                        resolve_video=lambda value, where, role: value)


def test_two_images_of_different_sizes_answer_as_the_engine_does(client, model):
    small, large = png_bytes(1, SMALL), png_bytes(2, LARGE)
    got = ask(client, [image_part(data_url(small)), image_part(data_url(large)), text_part("Compare them.")])

    messages = [{"role": "user", "content": [{"type": "image", "image": Image.open(io.BytesIO(small))},
                                             {"type": "image", "image": Image.open(io.BytesIO(large))},
                                             text_part("Compare them.")]}]
    prompt = prompt_for(model, messages)
    grids = prompt.image_grid_thw.tolist()
    assert grids[0] != grids[1]  # each image at its own size
    assert all(h * w * 4 ** 2 <= NATIVE_MAX_PIXELS for _, h, w in grids)  # the large one sized down, not refused
    assert got.usage.prompt_tokens == len(prompt.input_ids)
    assert got.choices[0].message.content == greedy_answer(model, prompt)


def test_video_as_frames_under_allow_dir(client, model, allowed):
    got = ask(client, [video_part((allowed / "clip").as_uri()), text_part("What moves?")])
    prompt = video_prompt(model, allowed / "clip", "What moves?")
    assert prompt.video_grid_thw.tolist() == [[CLIP_FRAMES // 2, 4, 4]]  # 16 x 16 frames, in pairs
    assert got.usage.prompt_tokens == len(prompt.input_ids)
    assert got.choices[0].message.content == greedy_answer(model, prompt)


def test_animated_image_as_file_or_data_url(client, model, allowed):
    by_file = ask(client, [video_part((allowed / "clip.gif").as_uri()), text_part("What moves?")])
    gif = (allowed / "clip.gif").read_bytes()
    by_data = ask(client, [video_part(data_url(gif, "image/gif")), text_part("What moves?")])
    expected = greedy_answer(model, video_prompt(model, allowed / "clip.gif", "What moves?"))
    assert by_file.choices[0].message.content == by_data.choices[0].message.content == expected


def test_video_file_as_file_or_data_url(client, model, allowed):
    path = allowed / "clip.mp4"
    _write_mp4(path, [_frame(seed) for seed in range(CLIP_FRAMES)])
    by_file = ask(client, [video_part(path.as_uri()), text_part("What moves?")])
    by_data = ask(client, [video_part(data_url(path.read_bytes(), "video/mp4")), text_part("What moves?")])
    expected = greedy_answer(model, video_prompt(model, path, "What moves?"))
    assert by_file.choices[0].message.content == by_data.choices[0].message.content == expected


def test_stream_equals_the_whole_answer(client, allowed):
    content = [image_part(data_url(png_bytes(3, LARGE))), video_part((allowed / "clip").as_uri()),
               text_part("Describe.")]
    whole = ask(client, content).choices[0].message.content
    chunks = list(ask(client, content, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == whole
    assert chunks[-1].choices[0].finish_reason == "length"


def local_video(name: str):
    """A video part naming `name` inside the allowed directory (made once the directory exists)."""
    return lambda root: video_part((root / name).as_uri())


def given(part: dict):
    return lambda root: part


BAD_VIDEOS = {  # case -> (parts, status, the part named, code)
    "outside the allowed dir": ([given(text_part("look")), given(video_part("file:///etc"))], 400,
                                "messages[0].content[1]", "file_url_refused"),
    "too many videos": ([local_video("clip"), local_video("clip")], 400, "messages[0].content[1]",
                        "too_many_videos"),
    "corrupt video file": ([local_video("broken.mp4")], 400, "messages[0].content[0]", "invalid_video"),
    "corrupt frame": ([local_video("bad_frames")], 400, "messages[0].content[0]", "invalid_video"),
    "corrupt later frame": ([given(text_part("look")), local_video("bad_later_frame")], 400,
                            "messages[0].content[1]", "invalid_video"),
    "corrupt data URL": ([given(video_part(data_url(b"\x00" * 64, "video/mp4")))], 400, "messages[0].content[0]",
                         "invalid_video"),
    "not a video type": ([given(video_part(data_url(b"GIF89a", "text/plain")))], 400, "messages[0].content[0]",
                         "invalid_video_url"),
    "too many frames": ([local_video("long")], 413, "messages[0].content[0]", "request_too_large"),
    "missing": ([local_video("missing")], 400, "messages[0].content[0]", "missing_video"),
    "remote URL": ([given(video_part("https://example.com/clip.mp4"))], 400, "messages[0].content[0]",
                   "remote_url_refused"),
}


@pytest.mark.parametrize("case", BAD_VIDEOS)
def test_bad_videos_are_refused_naming_the_part(server, client, allowed, case):
    parts, status, param, code = BAD_VIDEOS[case]
    r = post(server, [make(allowed) for make in parts])
    error = r.json()["error"]
    assert (r.status_code, error["param"], error["code"]) == (status, param, code), error
    assert param in error["message"]
    assert ask(client, [video_part((allowed / "clip").as_uri())]).choices[0].message.content  # still answering


def test_frames_linked_from_outside_allow_dir_are_refused(server, allowed, tmp_path):
    (tmp_path / "000.png").write_bytes(png_bytes(5, FRAME_SIZE))
    linked = allowed / "linked_frames"
    linked.mkdir()
    (linked / "000.png").symlink_to(tmp_path / "000.png")
    r = post(server, [video_part(linked.as_uri()), text_part("What moves?")])
    assert r.status_code == 400 and r.json()["error"]["code"] == "file_url_refused"
    assert "links outside the allowed directory" in r.json()["error"]["message"]


def test_videos_only_in_user_messages(server, allowed):
    r = httpx.post(server + "/v1/chat/completions", timeout=60, json={"messages": [
        {"role": "assistant", "content": [video_part((allowed / "clip").as_uri())]},
        {"role": "user", "content": "and?"}]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages[0].content[0]"


def test_a_llava_shaped_model_refuses_videos(llava_server, allowed):
    r = post(llava_server, [text_part("look"), video_part((allowed / "clip").as_uri())])
    error = r.json()["error"]
    assert r.status_code == 400 and error["param"] == "messages[0].content[1]"
    assert error["code"] == "unexpected_video" and "images only" in error["message"]
    assert post(llava_server, [image_part(data_url(png_bytes(1))), text_part("describe")]).status_code == 200
