"""Templates: what is supervised (decoded back to text), image placeholder expansion, bad-record
reasons, and parity of the rendered text and ids with transformers' apply_chat_template."""

import pytest
from transformers import AutoTokenizer

from tests.tokenizer_support import LLAMA31_TEMPLATE, builtin_tokenizer, chatml_dir, llama3_dir
from vlmkit.constants import IGNORE_INDEX
from vlmkit.data.template import encode_prompt, encode_record, render
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
