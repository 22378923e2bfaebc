"""Benchmark items with a conversation history, and follow-up questions built from a finished
evaluation: the prompt is the conversation `vlmkit chat` would hold, the images go with the first
turn, ppl mode scores the last reply only, pairing stays within an image and uses the model's own
replies, bad histories are bad rows, and follow-ups evaluate end to end on a tiny model."""

import io

import pytest
from PIL import Image

import vlmkit.infer.generate
from vlmkit.chat_cli import ChatSession
from vlmkit.constants import IGNORE_INDEX
from vlmkit.data.template import encode_record
from vlmkit.data.types import Message, Record
from vlmkit.data.world import generate as generate_world
from vlmkit.eval.benchmarks import BenchItem, Turn, read_benchmark
from vlmkit.eval.follow_up import follow_up_benchmark, follow_up_items
from vlmkit.eval.metrics import RowResult
from vlmkit.eval.prompts import LLAVA_PROMPTS, PLAIN_PROMPTS, PromptFormat, chat_messages, question_text
from vlmkit.eval.runner import EvalResult, evaluate, evaluate_with_blind, reply_samples
from vlmkit.infer.generate import prompt_for
from tests.test_eval_runner import _visual_boost, tiny_vlm, tokenizer, write_bench  # noqa: F401 (tokenizer: a fixture)

HISTORY = [{"question": "What colour is it?", "reply": "red"}, {"question": "How many?", "reply": "two"}]
FOLLOW_UP_ROW = {"id": "f", "images": ["img/red.png"], "question": "Is there a circle?", "answer": "yes",
                 "category": "exist", "history": HISTORY}

# Three images with several questions each, one with a single question, one text-only pair.
ROWS = [
    {"id": "r-colour", "images": ["img/red.png"], "question": "What colour is it?", "answer": "red",
     "category": "colour"},
    {"id": "r-count", "images": ["img/red.png"], "question": "How many?", "answer": "two", "category": "count"},
    {"id": "r-exist", "images": ["img/red.png"], "question": "Is there a circle?", "answer": "yes",
     "category": "exist"},
    {"id": "b-colour", "images": ["img/blue.png"], "question": "What colour is it?",
     "choices": ["red", "blue", "green"], "answer": "B", "category": "colour"},
    {"id": "b-exist", "images": ["img/blue.png"], "question": "Is there a square?", "answer": "no",
     "category": "exist"},
    {"id": "g-count", "images": ["img/green.png"], "question": "How many?", "answer": "one", "category": "count"},
    {"id": "g-exist", "images": ["img/green.png"], "question": "Is there a circle?", "answer": "no",
     "category": "exist"},
    {"id": "w-alone", "images": ["img/white.png"], "question": "How many?", "answer": "three", "category": "count"},
    {"id": "t-1", "images": [], "question": "Which word?", "choices": ["one", "two"], "answer": "A",
     "category": "text"},
    {"id": "t-2", "images": [], "question": "Which word?", "choices": ["one", "two"], "answer": "B",
     "category": "text"},
]
PAIRED = {row["id"] for row in ROWS} - {"w-alone", "t-1", "t-2"}


def _red(tmp_path):
    return Image.open(tmp_path / "img" / "red.png").convert("RGB")


# --- items with a history ----------------------------------------------------------------------------

@pytest.mark.parametrize("fmt", [LLAVA_PROMPTS, PromptFormat(images_after_text=True)])
def test_a_history_item_is_asked_as_the_chat_command_holds_the_conversation(tmp_path, tokenizer, monkeypatch,
                                                                          fmt):
    model = tiny_vlm(tokenizer)
    [item] = read_benchmark(write_bench(tmp_path, [FOLLOW_UP_ROW])).items
    assert item.history == [Turn(**turn) for turn in HISTORY]
    image = _red(tmp_path)
    messages = chat_messages(item, [image], fmt, list_options=True)

    # `vlmkit chat`: the image attached, then one question per turn, each answered with the reply above.
    asked = []

    def scripted_stream(vlm, conversation, **kw):
        asked.append(conversation)
        yield HISTORY[len(asked) - 1]["reply"] if len(asked) <= len(HISTORY) else ""

    monkeypatch.setattr(vlmkit.infer.generate, "stream_messages", scripted_stream)
    session = ChatSession(model, {}, images_after_text=fmt.images_after_text)
    session.pending_images.append(image)
    for text in [turn["question"] for turn in HISTORY] + [question_text(item, fmt, list_options=True)]:
        session.ask(text, io.StringIO())
    assert prompt_for(model, messages).input_ids == prompt_for(model, asked[-1]).input_ids

    # The image goes with the first turn only; the later turns are text.
    assert [m["role"] for m in messages] == ["user", "assistant", "user", "assistant", "user"]
    parts = [[p["type"] for p in m["content"]] if isinstance(m["content"], list) else ["str"] for m in messages]
    assert parts[0] == (["text", "image"] if fmt.images_after_text else ["image", "text"])
    assert all(kinds in (["text"], ["str"]) for kinds in parts[1:])
    prompt = prompt_for(model, messages)
    assert prompt.input_ids.count(tokenizer.image_token_id) == model.config.tokens_per_image  # one image


def test_a_history_prompt_is_the_training_encoding_up_to_the_last_reply(tmp_path, tokenizer):
    """The prompt is the same tokens a trained conversation of these turns has before its last reply."""
    model = tiny_vlm(tokenizer)
    [item] = read_benchmark(write_bench(tmp_path, [FOLLOW_UP_ROW])).items
    prompt = prompt_for(model, chat_messages(item, [_red(tmp_path)], PLAIN_PROMPTS, list_options=True))
    record = Record(id="x", source="t", kind="chat", messages=[
        Message("user", "<image>\n" + HISTORY[0]["question"]), Message("assistant", HISTORY[0]["reply"]),
        Message("user", HISTORY[1]["question"]), Message("assistant", HISTORY[1]["reply"]),
        Message("user", item.question), Message("assistant", item.answer)])
    ids, labels = encode_record(record, tokenizer, [model.config.tokens_per_image])
    targets = [i for i, label in enumerate(labels) if label != IGNORE_INDEX]
    last_reply = next(i for i in reversed(targets) if i - 1 not in targets)  # the last supervised span's start
    assert prompt.input_ids == ids[:last_reply]


def test_ppl_scores_only_the_last_reply_of_a_conversation(tmp_path, tokenizer):
    model = tiny_vlm(tokenizer)
    [item] = read_benchmark(write_bench(tmp_path, [FOLLOW_UP_ROW])).items
    alone = BenchItem(id="a", question=item.question, answer="yes", kind="yesno")
    processor, image = model.image_processor(), _red(tmp_path)
    [with_history] = reply_samples(model, processor, chat_messages(item, [image], PLAIN_PROMPTS, list_options=False),
                                   ["yes"], "f")
    [without] = reply_samples(model, processor, chat_messages(alone, [image], PLAIN_PROMPTS, list_options=False),
                              ["yes"], "a")
    supervised = [t for t, label in zip(with_history.input_ids, with_history.labels) if label != IGNORE_INDEX]
    assert supervised == [t for t, label in zip(without.input_ids, without.labels) if label != IGNORE_INDEX]
    at = [i for i, label in enumerate(with_history.labels) if label != IGNORE_INDEX]
    assert at == list(range(at[0], at[0] + len(at)))  # one span: the earlier replies are not scored


@pytest.mark.parametrize("history, message", [
    ("red", "history must be a list of turns, got str"),
    (["red"], "history[0] must be an object with 'question' and 'reply', got str"),
    ([{"reply": "red"}], "history[0].question must be a non-empty string, got None"),
    ([{"question": "  ", "reply": "red"}], "history[0].question must be a non-empty string"),
    ([HISTORY[0], {"question": "How many?", "reply": 2}], "history[1].reply must be a string, got 2"),
])
def test_a_bad_history_is_a_bad_row_with_its_reason(tmp_path, tokenizer, history, message):
    rows = [FOLLOW_UP_ROW, {**FOLLOW_UP_ROW, "id": "bad", "history": history}]
    bench = read_benchmark(write_bench(tmp_path, rows))
    assert [item.id for item in bench.items] == ["f"]
    [bad] = bench.bad_rows
    assert (bad.index, bad.id, bad.reason) == (1, "bad", "bad_history") and message in bad.message
    result = evaluate(tiny_vlm(tokenizer), bench, mode="gen", max_new_tokens=2, progress=False)
    assert [r.id for r in result.rows] == ["f"] and [b.reason for b in result.bad_rows] == ["bad_history"]


# --- follow-up items from a finished evaluation -----------------------------------------------------------

def _items(tmp_path):
    return read_benchmark(write_bench(tmp_path, ROWS)).items


def _answered(items, mode="gen", fmt=PLAIN_PROMPTS, skip=()):
    """A finished evaluation whose reply to each item names the item, so that pairing is visible."""
    rows = [RowResult(id=item.id, source_id=item.id, category=item.category, kind=item.kind, answer=item.answer,
                      prediction=f"reply to {item.id}", parsed=None, correct=False)
            for item in items if item.id not in skip]
    return EvalResult(benchmark="bench", mode=mode, circular=False, blind=False, summary={}, rows=rows,
                      prompt_format=fmt)


def test_follow_ups_pair_questions_of_the_same_image_with_the_model_replies(tmp_path):
    items = _items(tmp_path)
    by_id = {item.id: item for item in items}
    follow_ups = follow_up_items(items, _answered(items), seed=0)
    assert [f.id for f in follow_ups] == [item.id for item in items if item.id in PAIRED]  # file order
    earlier_ids = []
    for follow_up in follow_ups:
        [turn] = follow_up.history
        earlier = by_id[turn.reply.removeprefix("reply to ")]
        earlier_ids.append(earlier.id)
        assert earlier.id != follow_up.id and earlier.images == follow_up.images
        assert turn.question == question_text(earlier, PLAIN_PROMPTS, list_options=True)
        assert (follow_up.question, follow_up.answer, follow_up.category) == (by_id[follow_up.id].question,
                                                                          by_id[follow_up.id].answer,
                                                                          by_id[follow_up.id].category)
    assert sorted(earlier_ids) == sorted(PAIRED)  # each question is asked before another exactly once
    assert "B. blue" in next(f for f in follow_ups if f.id == "b-exist").history[0].question  # options listed


def test_follow_ups_are_deterministic_from_the_seed(tmp_path):
    items = _items(tmp_path)
    first = _answered(items)
    pairs = {seed: [(f.id, f.history[0].reply) for f in follow_up_items(items, first, seed=seed)] for seed in range(6)}
    assert pairs[0] == [(f.id, f.history[0].reply) for f in follow_up_items(items, first, seed=0)]
    assert len({tuple(p) for p in pairs.values()}) > 1  # the seed decides which question comes first


def test_follow_ups_skip_unanswered_questions_and_lone_images(tmp_path):
    items = _items(tmp_path)
    follow_ups = follow_up_items(items, _answered(items, skip={"b-colour"}), seed=0)
    ids = {f.id for f in follow_ups}
    assert ids == PAIRED - {"b-colour", "b-exist"}  # blue is left with one answered question
    assert all("b-colour" not in f.history[0].reply for f in follow_ups)


def test_follow_ups_of_a_ppl_evaluation_repeat_the_cloze_question_and_chain_histories(tmp_path):
    items = [item for item in _items(tmp_path) if item.id.startswith("b-")]
    [after_exist, after_colour] = sorted(follow_up_items(items, _answered(items, mode="ppl"), seed=0),
                                         key=lambda f: f.id, reverse=True)
    assert after_exist.id == "b-exist" and after_exist.history[0].question == "What colour is it?"
    # Follow-ups of follow-ups: the earlier item's history comes along (a third turn).
    third = follow_up_items([after_exist, after_colour], _answered([after_exist, after_colour]), seed=0)
    assert [len(f.history) for f in third] == [2, 2]
    assert third[0].history[0] == after_colour.history[0]


def test_the_synthetic_test_split_gets_one_follow_up_per_question_within_its_scene(tmp_path):
    world = generate_world(tmp_path / "world", n_train=0, n_val=0, n_test=4, text_corpus=False)
    bench = read_benchmark(world["test"])
    follow = follow_up_benchmark(bench, _answered(bench.items), seed=0)
    assert follow.name == bench.name and follow.bad_rows == [] and len(follow.items) == len(bench.items)
    scene = {item.id: item.id.rsplit("-", 1)[0] for item in bench.items}
    for item in follow.items:
        earlier = item.history[0].reply.removeprefix("reply to ")
        assert scene[earlier] == scene[item.id] and earlier != item.id


# --- end to end -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["gen", "ppl"])
def test_follow_ups_evaluate_like_any_benchmark(tmp_path, tokenizer, mode):
    model = tiny_vlm(tokenizer)
    _visual_boost(model)
    bench = read_benchmark(write_bench(tmp_path, ROWS))
    kw = dict(mode=mode, max_new_tokens=4, batch_size=3, progress=False)
    first = evaluate(model, bench, **kw)
    follow = follow_up_benchmark(bench, first, seed=0)
    result = evaluate(model, follow, **kw)
    # ppl mode cannot score r-colour (the only open colour answer in the file: no_options), so it has
    # no reply to follow; the red image still has two answered questions.
    expected = PAIRED - ({"r-colour"} if mode == "ppl" else set())
    assert {r.id for r in first.rows} & PAIRED == expected
    assert result.bad_rows == [] and {r.id for r in result.rows} == expected
    assert result.summary["n"] == len(expected)
    assert set(result.per_category) == {"colour", "count", "exist"}
    replies = {r.id: r.prediction for r in first.rows}
    assert all(f.history[0].reply == replies[_asked_id(f, bench)] for f in follow.items)
    if mode == "gen":  # the conversation before the question changes what the model says
        assert any(r.prediction != replies[r.id] for r in result.rows)
    else:
        first_scores = {r.id: r.scores for r in first.rows}
        assert any(r.scores != pytest.approx(first_scores[r.id], abs=1e-4) for r in result.rows)
    both = evaluate_with_blind(model, follow, **kw)
    assert both["blind"].summary["n"] == both["model"].summary["n"] == len(expected)


def _asked_id(follow_up, bench):
    """The id of the item whose question is the follow-up's history turn (same image, that text)."""
    [turn] = follow_up.history
    [earlier] = [item for item in bench.items if item.images == follow_up.images and item.id != follow_up.id
                 and turn.question.startswith(item.question)]
    return earlier.id

