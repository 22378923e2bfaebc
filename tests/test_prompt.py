"""Conversations -> prompts, the one home: data/messages.py (content parts, roles) and
data/prompt.py (images -> tiles and visual-token counts, prompt ids). A data file, a server request
and a Python-API conversation with the same content become the same prompt."""

import io
import json
from dataclasses import replace

import pytest
import torch
from PIL import Image

from tests.serving_support import build_checkpoint, data_url, png_bytes
from tests.tokenizer_support import builtin_tokenizer
from vlmkit.api import VLM
from vlmkit.constants import IMAGE_PLACEHOLDER, VIDEO_PLACEHOLDER
from vlmkit.data.formats import read_records
from vlmkit.data.images import ImageProcessor
from vlmkit.data.messages import keep_image, parse_content, read_conversation, to_messages, user_content
from vlmkit.data.native_images import FAMILIES, NativeImageProcessor
from vlmkit.data.prompt import build_prompt, encode_images
from vlmkit.data.template import VideoTokens, encode_prompt
from vlmkit.data.types import Message
from vlmkit.errors import BadRecordError
from vlmkit.infer.engine import Engine
from vlmkit.infer.generate import prompt_for
from vlmkit.serve.protocol import APIError, ChatCompletionRequest
from vlmkit.serve.scheduler import Scheduler
from vlmkit.serve.serving import ChatServing
from vlmkit.serve.settings import ServerSettings

TOKENS_PER_TILE = 4
MEAN = STD = (0.5, 0.5, 0.5)


@pytest.fixture(scope="module")
def tok():
    return builtin_tokenizer()


def picture(width: int, height: int, seed: int = 0) -> Image.Image:
    return Image.open(io.BytesIO(png_bytes(seed, size=16))).resize((width, height))


# ---- content parts and roles (data/messages.py) -------------------------------------------------

@pytest.mark.parametrize("messages, where, reason", [
    ([], "messages must be a non-empty list", "malformed_record"),
    ("hello", "messages must be a non-empty list", "malformed_record"),
    ([{"content": "hi"}], r"messages\[0\] must be an object", "malformed_record"),
    ([{"role": "user", "content": "hi"}, {"role": "robot", "content": "hi"}], r"messages\[1\]\.role", "unknown_role"),
    ([{"role": "user", "content": {"text": "hi"}}], r"messages\[0\]\.content must be a string or a list",
     "malformed_record"),
    ([{"role": "user", "content": "hi"},
      {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "audio"}]}],
     r"messages\[1\]\.content\[1\] must be a part of type", "malformed_record"),
    ([{"role": "user", "content": [{"type": "video", "video": ["a.png", "b.png"]}]}],
     r"messages\[0\]\.content\[0\] is a video; this input takes images only", "unexpected_video"),
    ([{"role": "user", "content": [{"type": "video", "video": []}]}], r"messages\[0\]\.content\[0\] has no video",
     "malformed_record"),
    ([{"role": "user", "content": ["plain string part"]}], r"messages\[0\]\.content\[0\] must be a part",
     "malformed_record"),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": ""}}]}],
     r"messages\[0\]\.content\[0\] has no image", "malformed_record"),
])
def test_bad_conversations_name_the_message_and_part(messages, where, reason):
    with pytest.raises(BadRecordError, match=where) as caught:
        to_messages(messages)
    assert caught.value.reason == reason


def test_roles_and_parts_become_template_messages():
    image = object()
    messages, images = to_messages([
        {"role": "developer", "content": "be brief"},
        {"role": "human", "content": [{"type": "image", "image": image}, {"type": "text", "text": ""},
                                      {"type": "text", "text": "what is it?"}]},
        {"role": "gpt", "content": None},
        {"role": "user", "content": [{"type": "text", "text": "and"},
                                     {"type": "image_url", "image_url": {"url": "data:x"}},
                                     {"type": "image_url", "image_url": "b.png"}]},
    ])
    assert messages == [Message("system", "be brief"),
                        Message("user", f"{IMAGE_PLACEHOLDER}\nwhat is it?"),  # empty text parts are dropped
                        Message("assistant", ""),
                        Message("user", f"and\n{IMAGE_PLACEHOLDER}\n{IMAGE_PLACEHOLDER}")]
    assert images == [image, "data:x", "b.png"]  # the default resolver keeps values as given


def test_the_resolver_sees_each_image_with_where_and_role():
    seen = []

    def resolve(value, where, role):
        seen.append((value, where, role))
        return value.upper()

    content = [{"type": "text", "text": "look"}, {"type": "image", "image": "a.png"}]
    assert parse_content(content, "turn", resolve) == (f"look\n{IMAGE_PLACEHOLDER}", ["A.PNG"])
    _, images = to_messages([{"role": "system", "content": "s"},
                             {"role": "assistant", "content": [{"type": "image_url", "image_url": {"url": "b"}}]}],
                            resolve)
    assert images == ["B"]
    assert seen[-1] == ("b", "messages[1].content[0]", "assistant")


def test_user_content_orders_images_and_text():
    assert [p["type"] for p in user_content("q", ["a", "b"])] == ["image", "image", "text"]
    assert [p["type"] for p in user_content("q", ["a"], images_after_text=True)] == ["text", "image"]


# ---- images and prompt ids (data/prompt.py) -----------------------------------------------------

def test_encode_images_counts_tiles_and_visual_tokens():
    processor = ImageProcessor(image_size=16, mean=MEAN, std=STD, max_tiles=4)
    images = [picture(64, 16), picture(16, 16, seed=1), picture(32, 32, seed=2)]
    visual = encode_images(images, processor, TOKENS_PER_TILE)
    expected_tiles = [processor.num_tiles(*im.size) for im in images]
    assert expected_tiles[0] > 1 and expected_tiles[1] == 1  # a wide image is tiled (+ a thumbnail)
    assert visual.tiles_per_image == expected_tiles
    assert visual.visual_tokens == [n * TOKENS_PER_TILE for n in expected_tiles]
    assert visual.pixel_values.shape == (sum(expected_tiles), 3, 16, 16)
    assert encode_images([], processor, TOKENS_PER_TILE).pixel_values is None


def test_build_prompt_gives_the_template_ids(tok):
    processor = ImageProcessor(image_size=16, mean=MEAN, std=STD, max_tiles=4)
    wide, square = picture(64, 16), picture(16, 16, seed=1)
    conversation = [{"role": "system", "content": "answer briefly"},
                    {"role": "user", "content": user_content("What color is the circle?", [wide])},
                    {"role": "assistant", "content": "red"},
                    {"role": "user", "content": user_content("And here?", [square], images_after_text=True)}]
    prompt = build_prompt(conversation, tok, processor, TOKENS_PER_TILE)
    messages = [Message("system", "answer briefly"), Message("user", f"{IMAGE_PLACEHOLDER}\nWhat color is the circle?"),
                Message("assistant", "red"), Message("user", f"And here?\n{IMAGE_PLACEHOLDER}")]
    tiles = [processor.num_tiles(64, 16), 1]
    assert prompt.input_ids == encode_prompt(messages, tok, [n * TOKENS_PER_TILE for n in tiles])
    assert prompt.input_ids.count(tok.image_token_id) == sum(tiles) * TOKENS_PER_TILE
    assert torch.equal(prompt.pixel_values, torch.cat([processor(wide), processor(square)]))


# ---- one conversation, three doors --------------------------------------------------------------

@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return VLM.from_pretrained(build_checkpoint(tmp_path_factory.mktemp("prompt") / "model"))


def test_data_file_server_and_python_api_build_the_same_prompt(model, tmp_path):
    raw = png_bytes(7, size=24)
    (tmp_path / "a.png").write_bytes(raw)
    system = {"role": "system", "content": "answer briefly"}
    question = {"type": "text", "text": "what colour is the circle?"}

    record_file = tmp_path / "chat.jsonl"
    record_file.write_text(json.dumps({"messages": [system, {"role": "user", "content": [
        {"type": "image", "image": "a.png"}, question]}]}) + "\n")
    [record] = list(read_records(record_file))
    visual = encode_images(record.images, model.image_processor(), model.config.tokens_per_image)
    from_file = (encode_prompt(record.messages, model.tokenizer, visual.visual_tokens), visual.pixel_values)

    engine = Engine(model)
    serving = ChatServing(engine, Scheduler(engine), ServerSettings())  # the scheduler is never started
    request = ChatCompletionRequest(messages=[system, {"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": data_url(raw)}}, question]}])
    served, _ = serving.prepare(request)

    python = prompt_for(model, [system, {"role": "user", "content": [
        {"type": "image", "image": Image.open(io.BytesIO(raw))}, question]}])

    assert from_file[0] == served.input_ids == python.input_ids
    assert model.tokenizer.image_token_id in python.input_ids
    assert torch.equal(from_file[1], served.pixel_values) and torch.equal(served.pixel_values, python.pixel_values)


def test_server_images_only_from_users_and_within_the_count(model):
    engine = Engine(model)
    settings = ServerSettings()
    settings.images.max_images = 1
    serving = ChatServing(engine, Scheduler(engine), settings)
    image = {"type": "image_url", "image_url": {"url": data_url(png_bytes(1))}}
    with pytest.raises(APIError) as caught:
        serving.prepare(ChatCompletionRequest(messages=[{"role": "user", "content": [image, image]}]))
    assert (caught.value.status, caught.value.param, caught.value.code) == (400, "messages[0].content[1]",
                                                                            "too_many_images")
    with pytest.raises(APIError, match="user messages only") as caught:
        serving.prepare(ChatCompletionRequest(messages=[{"role": "system", "content": [image]},
                                                        {"role": "user", "content": "hi"}]))
    assert caught.value.param == "messages[0].content[0]"


# ---- video parts ---------------------------------------------------------------------------------

def test_video_parts_become_video_placeholders_with_their_resolver():
    seen = []

    def resolve_video(value, where, role):
        seen.append((where, role))
        return ("video", value)

    frames = ["f0.png", "f1.png"]
    conversation = read_conversation([
        {"role": "user", "content": [{"type": "video", "video": frames}, {"type": "image", "image": "a.png"},
                                     {"type": "text", "text": "which moves?"},
                                     {"type": "video_url", "video_url": {"url": "file:///clips/c.mp4"}},
                                     {"type": "video_url", "video_url": "clip_dir"}]}], resolve_video=resolve_video)
    assert conversation.messages == [Message("user", f"{VIDEO_PLACEHOLDER}\n{IMAGE_PLACEHOLDER}\nwhich moves?\n"
                                                     f"{VIDEO_PLACEHOLDER}\n{VIDEO_PLACEHOLDER}")]
    assert conversation.images == ["a.png"]
    assert conversation.videos == [("video", frames), ("video", "file:///clips/c.mp4"), ("video", "clip_dir")]
    assert seen == [("messages[0].content[0]", "user"), ("messages[0].content[3]", "user"),
                    ("messages[0].content[4]", "user")]
    side_by_side = read_conversation([{"role": "user", "content": [{"type": "video", "video": frames},
                                                                   {"type": "text", "text": "q"}]}], separator="")
    assert side_by_side.messages[0].content == f"{VIDEO_PLACEHOLDER}q"


def test_videos_are_refused_where_they_cannot_go(tok):
    processor = ImageProcessor(image_size=16, mean=MEAN, std=STD)
    video = [{"role": "user", "content": [{"type": "video", "video": [picture(16, 16)] * 2}]}]
    with pytest.raises(BadRecordError) as caught:  # build_prompt takes videos only with a resolver
        build_prompt(video, tok, processor, TOKENS_PER_TILE)
    assert caught.value.reason == "unexpected_video"
    with pytest.raises(BadRecordError) as caught:  # a tiling processor takes images only
        build_prompt(video, tok, processor, TOKENS_PER_TILE, resolve_video=keep_image)
    assert caught.value.reason == "unexpected_video"


def test_native_images_and_videos_give_grids_and_token_counts():
    processor = NativeImageProcessor(replace(FAMILIES["qwen3_vl"], min_pixels=32 * 32, max_pixels=64 * 64,
                                             video_min_pixels=32 * 32, video_max_pixels=4 * 64 * 64))
    images, frames = [picture(64, 32), picture(20, 40, seed=1)], [picture(40, 40, seed=s) for s in range(5)]
    visual = encode_images(images, processor, TOKENS_PER_TILE, [frames])
    expected = processor.images(images)
    video = processor.video(frames)
    assert torch.equal(visual.grid_thw, expected.grid_thw) and visual.visual_tokens == expected.visual_tokens
    assert torch.equal(visual.pixel_values, expected.pixel_values) and visual.tiles_per_image == []
    assert visual.video_grid_thw.tolist() == [list(video.grid_thw)]
    assert visual.second_per_grid_ts == [video.seconds_per_group]
    assert visual.video_tokens == [VideoTokens(video.grid_thw[0], video.tokens_per_group, tuple(video.group_times))]
    assert encode_images([], processor, TOKENS_PER_TILE).grid_thw is None
