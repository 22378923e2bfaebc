"""Templates: what is supervised (decoded back to text), image placeholder expansion, bad-record
reasons, and parity of the rendered text and ids with transformers' apply_chat_template; the
Qwen-VL format's prompts equal to transformers' Qwen2-VL / Qwen2.5-VL / Qwen3-VL processors."""

import json
from dataclasses import replace
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import (AutoTokenizer, PreTrainedTokenizerFast, Qwen2_5_VLProcessor, Qwen2VLImageProcessorPil,
                          Qwen2VLProcessor, Qwen3VLProcessor)
from transformers.video_utils import VideoMetadata

from tests.tokenizer_support import (CHATML_TEMPLATE, LLAMA31_TEMPLATE, QWEN2_VL_TEMPLATE, QWEN3_VL_TEMPLATE,
                                     QWEN_VL_SPECIALS, builtin_tokenizer, chatml_dir, hf_dir, llama3_dir,
                                     qwen_vl_dir)
from vlmkit.constants import (IGNORE_INDEX, IM_END, IMAGE_PAD, VIDEO_PAD, VIDEO_PLACEHOLDER,
                              VISION_START)
from vlmkit.data.messages import keep_image
from vlmkit.data.native_images import FAMILIES, NativeImageProcessor
from vlmkit.data.prompt import build_prompt
from vlmkit.data.template import VideoTokens, encode_prompt, encode_record, render
from vlmkit.data.tokenizer import Tokenizer
from vlmkit.data.types import Message, Record
from vlmkit.errors import BadRecordError


@pytest.fixture(scope="module")
def tok():
    return builtin_tokenizer()


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("tokenizers")
    builtin = builtin_tokenizer().save(root / "builtin")
    return {"builtin": builtin, "chatml": chatml_dir(root / "chatml"), "llama3": llama3_dir(root / "llama3"),
            "llama31": llama3_dir(root / "llama31", LLAMA31_TEMPLATE)}


def chat(*turns, kind="chat", rid="r1"):
    return Record(id=rid, source="test", kind=kind, messages=[Message(role, text) for role, text in turns])


def supervised(labels):
    """Runs of supervised labels (maximal stretches that are not IGNORE_INDEX)."""
    runs, current = [], []
    for label in labels:
        if label == IGNORE_INDEX:
            if current:
                runs.append(current)
            current = []
        else:
            current.append(label)
    return runs + ([current] if current else [])


def test_chat_supervises_assistant_turns_only(tok):
    record = chat(("system", "Be brief."), ("user", "<image>\nWhat color is the circle?"), ("assistant", "red"),
                  ("user", "How many shapes are there?"), ("assistant", "3"))
    ids, labels = encode_record(record, tok, [9])
    assert len(ids) == len(labels)
    assert [tok.decode(run, skip_special=False) for run in supervised(labels)] == ["red<|im_end|>", "3<|im_end|>"]
    assert all(label in (IGNORE_INDEX, i) for label, i in zip(labels, ids))


def test_caption_supervises_the_caption_after_the_image(tok):
    record = chat(("user", "<image>\nDescribe the image."), ("assistant", "A small red circle in the center."),
                  kind="caption")
    ids, labels = encode_record(record, tok, [9])
    assert ids[:9] == [tok.image_token_id] * 9
    assert [tok.decode(run, skip_special=False) for run in supervised(labels)] == \
        ["A small red circle in the center.<|endoftext|>"]
    assert "Describe" not in tok.decode(ids)  # LLaVA "plain": the instruction is dropped


def test_text_supervises_every_token(tok):
    text = "The assert statement is a convenient way to insert debugging assertions."
    ids, labels = encode_record(Record(id="t", source="s", kind="text", text=text), tok, [])
    assert labels == ids and ids[-1] == tok.eos_id
    assert tok.decode(ids) == text


def test_text_keeps_a_literal_image_string_as_text(tok):
    ids, _ = encode_record(Record(id="t", source="s", kind="text", text="an <image> tag in HTML"), tok, [])
    assert tok.image_token_id not in ids and tok.decode(ids) == "an <image> tag in HTML"


def test_placeholders_expand_in_order(tok):
    record = chat(("user", "<image> and <image>, which is bigger?"), ("assistant", "the first"))
    ids, _ = encode_record(record, tok, [9, 18])
    runs, start = [], None
    for i, t in enumerate(ids + [-1]):
        if t == tok.image_token_id and start is None:
            start = i
        elif t != tok.image_token_id and start is not None:
            runs.append(i - start)
            start = None
    assert runs == [9, 18]
    prompt = encode_prompt([Message("user", "<image> and <image>, which is bigger?")], tok, [9, 18])
    assert prompt.count(tok.image_token_id) == 27


@pytest.mark.parametrize("record, visual, reason", [
    (chat(("user", "<image>\nWhat?"), ("assistant", "red")), [], "placeholder_mismatch"),
    (chat(("user", "What?"), ("assistant", "red")), [9], "placeholder_mismatch"),
    (chat(("user", "<image><image>"), ("assistant", "red")), [9], "placeholder_mismatch"),
    (chat(("human", "What?"), ("assistant", "red")), [], "unknown_role"),
    (chat(("user", "<image>\nWhat?")), [9], "no_assistant_turn"),
    (chat(("user", "<image>"), kind="caption"), [9], "no_assistant_turn"),
    (Record(id="r1", source="s", kind="text", text=""), [], "no_supervised_tokens"),
    (Record(id="r1", source="s", kind="text", text="words"), [9], "placeholder_mismatch"),
])
def test_bad_records_raise_with_reason(tok, record, visual, reason):
    with pytest.raises(BadRecordError) as err:
        encode_record(record, tok, visual)
    assert err.value.reason == reason and err.value.record_id == "r1"
    assert "r1" in str(err.value)


def test_unknown_role_in_prompt(tok):
    with pytest.raises(BadRecordError, match="unknown_role"):
        encode_prompt([Message("bot", "hi")], tok, [])


def test_prompt_is_a_prefix_of_the_record(tok):
    question = [Message("user", "<image>\nWhat shape is in the center?")]
    prompt = encode_prompt(question, tok, [9])
    ids, labels = encode_record(Record(id="p", source="s", kind="chat",
                                       messages=question + [Message("assistant", "circle")]), tok, [9])
    assert ids[:len(prompt)] == prompt
    assert labels[len(prompt)] == ids[len(prompt)]  # the first generated token is the first supervised one


CONVERSATIONS = [
    [("user", "Hello, how are you today?"), ("assistant", "I am fine, thank you.")],
    [("system", "Be brief."), ("user", "What color is the circle?"), ("assistant", "red"),
     ("user", "How many shapes are there?"), ("assistant", " three ")],
]


@pytest.mark.parametrize("kind", ["builtin", "chatml", "llama3", "llama31"])
@pytest.mark.parametrize("turns", CONVERSATIONS)
def test_parity_with_apply_chat_template(dirs, kind, turns):
    tok = Tokenizer.load(dirs[kind])
    hf = AutoTokenizer.from_pretrained(dirs[kind])
    messages = [{"role": r, "content": c} for r, c in turns]
    ours = [Message(r, c) for r, c in turns]

    full = hf.apply_chat_template(messages, tokenize=False)
    assert render(ours, tok) == full
    ids, _ = encode_record(Record(id="x", source="s", kind="chat", messages=ours), tok, [])
    assert ids == hf(full, add_special_tokens=False)["input_ids"]

    prompt = hf.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True)
    assert render(ours[:-1], tok, add_generation_prompt=True) == prompt
    assert encode_prompt(ours[:-1], tok, []) == hf(prompt, add_special_tokens=False)["input_ids"]


def test_builtin_template_renders_image_parts_like_the_engine(dirs):
    hf = AutoTokenizer.from_pretrained(dirs["builtin"])
    tok = Tokenizer.load(dirs["builtin"])
    parts = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]}]
    assert hf.apply_chat_template(parts, tokenize=False, add_generation_prompt=True) == \
        render([Message("user", "<image>\nWhat is it?")], tok, add_generation_prompt=True)


# ---- the Qwen-VL format (Qwen2-VL, Qwen2.5-VL, Qwen3-VL) against transformers' processors -------

QWEN_FAMILIES = {  # model_type: (chat template, transformers' processor class); small pixel budgets
    "qwen2_vl": (QWEN2_VL_TEMPLATE, Qwen2VLProcessor),
    "qwen2_5_vl": (QWEN2_VL_TEMPLATE, Qwen2_5_VLProcessor),
    "qwen3_vl": (QWEN3_VL_TEMPLATE, Qwen3VLProcessor),
}


def picture(width, height, seed=0):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


def small_config(family):
    return replace(FAMILIES[family], min_pixels=32 * 32, max_pixels=128 * 128, video_min_pixels=32 * 32,
                   video_max_pixels=4 * 64 * 64)


def reference_processor(family, tokenizer_dir):
    """transformers' processor of the family with its PIL image processor. Its argument class check
    needs torchvision for the video processor, which this environment lacks; the video side only
    needs merge_size for the text, so a stand-in with it is passed and the check is skipped."""
    template, processor_class = QWEN_FAMILIES[family]
    config = small_config(family)

    class Reference(processor_class):
        def check_argument_for_proper_class(self, argument_name, argument):
            return type(argument)

    image_processor = Qwen2VLImageProcessorPil(
        min_pixels=config.min_pixels, max_pixels=config.max_pixels, patch_size=config.patch_size,
        image_mean=list(config.mean), image_std=list(config.std), merge_size=config.merge_size,
        temporal_patch_size=config.temporal_patch_size)
    video_processor = SimpleNamespace(merge_size=config.merge_size, temporal_patch_size=config.temporal_patch_size)
    return Reference(image_processor=image_processor, tokenizer=PreTrainedTokenizerFast.from_pretrained(tokenizer_dir),
                     video_processor=video_processor, chat_template=template)


@pytest.fixture(scope="module", params=sorted(QWEN_FAMILIES))
def qwen(request, tmp_path_factory):
    family = request.param
    directory = qwen_vl_dir(tmp_path_factory.mktemp(family) / "tok", QWEN_FAMILIES[family][0])
    return SimpleNamespace(family=family, tok=Tokenizer.load(directory),
                           reference=reference_processor(family, directory),
                           processor=NativeImageProcessor(small_config(family)))


def test_qwen_vl_tokenizers_are_detected_by_their_template(qwen, tmp_path):
    assert qwen.tok.template == "qwen_vl" and qwen.tok.part_separator == ""
    assert qwen.tok.image_token == IMAGE_PAD and qwen.tok.video_token_id == qwen.tok.token_id(VIDEO_PAD)
    assert qwen.tok.default_system == ("You are a helpful assistant." if qwen.family != "qwen3_vl" else None)
    # The same vocabulary with a text-only ChatML template (Qwen2.5's text models) stays chatml.
    assert Tokenizer.load(qwen_vl_dir(tmp_path / "text", CHATML_TEMPLATE)).template == "chatml"
    # Multimodal checkpoints may keep the template in the processor's chat_template.json.
    directory = hf_dir(tmp_path / "processor", QWEN_VL_SPECIALS, {"eos_token": IM_END})
    (directory / "chat_template.json").write_text(json.dumps({"chat_template": QWEN_FAMILIES[qwen.family][0]}))
    assert Tokenizer.load(directory).template == "qwen_vl"


def test_qwen_vl_images_equal_the_processor(qwen):
    """Images of three sizes, end to end through transformers' processor call."""
    images = [picture(90, 40), picture(33, 70, seed=1), picture(64, 64, seed=2)]
    conversation = [
        {"role": "user", "content": [{"type": "image", "image": images[0]}, {"type": "text", "text": "What is it?"}]},
        {"role": "assistant", "content": "A red circle."},
        {"role": "user", "content": [{"type": "text", "text": "And these:"}, {"type": "image", "image": images[1]},
                                     {"type": "image", "image": images[2]}, {"type": "text", "text": "?"}]}]
    text = qwen.reference.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
    expected = qwen.reference(text=[text], images=images, return_tensors="pt")
    prompt = build_prompt(conversation, qwen.tok, qwen.processor, 0)
    assert prompt.input_ids == expected["input_ids"][0].tolist()
    assert torch.equal(prompt.image_grid_thw, expected["image_grid_thw"])
    assert len(set(prompt.image_grid_thw.prod(-1).tolist())) == 3  # three different grids
    torch.testing.assert_close(prompt.pixel_values, expected["pixel_values"], rtol=0, atol=0)


def test_qwen_vl_videos_equal_the_processor_text(qwen):
    """A video among images: the reference's own placeholder expansion (Qwen3-VL: a `<t seconds>`
    before each frame pair, tokenised with the text before it: " <" is one token here) on its rendered
    template, tokenised by its tokenizer. Its video processor needs torchvision, so the grid comes
    from ours (equal to it by tests/test_native_images.py)."""
    images, frames = [picture(90, 40), picture(33, 70, seed=1)], [picture(50, 40, seed=s) for s in range(2, 7)]
    conversation = [{"role": "user", "content": [
        {"type": "image", "image": images[0]}, {"type": "text", "text": "Compare: "},
        {"type": "video", "video": frames},
        {"type": "text", "text": "with"}, {"type": "image", "image": images[1]}]}]
    prompt = build_prompt(conversation, qwen.tok, qwen.processor, 0, resolve_video=keep_image)
    video = qwen.processor.video(frames)
    text = qwen.reference.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
    image_inputs = qwen.reference.image_processor(images=images, return_tensors="pt")
    video_inputs = {"video_grid_thw": torch.tensor([video.grid_thw]),
                    "video_metadata": [VideoMetadata(total_num_frames=len(frames), fps=None,
                                                     frames_indices=video.frame_indices)]}
    replacements = ([qwen.reference.replace_image_token(image_inputs, i) for i in range(len(images))],
                    [qwen.reference.replace_video_token(video_inputs, 0)])
    [expanded], _ = qwen.reference.get_text_with_replacements([text], *replacements)
    assert prompt.input_ids == qwen.reference.tokenizer(expanded, add_special_tokens=False)["input_ids"]
    assert ("seconds>" in expanded) == (qwen.family == "qwen3_vl")
    assert prompt.video_grid_thw.tolist() == [list(video.grid_thw)]
    assert torch.equal(prompt.pixel_values_videos, video.pixel_values)
    assert prompt.second_per_grid_ts == [video.seconds_per_group]


def test_qwen_vl_records_supervise_the_answer_and_wrap_the_visuals(qwen):
    record = Record("r", "test", "chat", [Message("user", f"{VIDEO_PLACEHOLDER}\nWhich shape moves?"),
                                          Message("assistant", "the red circle")])
    video = VideoTokens(groups=2, tokens_per_group=3, times=(0.5, 1.5))
    ids, labels = encode_record(record, qwen.tok, [], [video])
    assert [qwen.tok.decode(run, skip_special=False) for run in supervised(labels)] == \
        [f"the red circle{IM_END}"]
    assert ids.count(qwen.tok.video_token_id) == 6 and ids.count(qwen.tok.token_id(VISION_START)) == 2
    with pytest.raises(BadRecordError) as caught:
        encode_record(record, qwen.tok, [], [])
    assert caught.value.reason == "placeholder_mismatch"


def test_videos_need_a_video_token(tok):
    record = chat(("user", f"{VIDEO_PLACEHOLDER} what moves?"), ("assistant", "a circle"))
    with pytest.raises(BadRecordError) as caught:
        encode_record(record, tok, [], [VideoTokens(1, 4)])
    assert caught.value.reason == "no_video_token"
