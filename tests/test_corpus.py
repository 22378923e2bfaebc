"""The language corpus of the synthetic world: real prose, split by unit, and its text-only chats
(a question about each document's unit, answered with the document's opening)."""

import json
import re
from pathlib import Path

import pytest

from vlmkit.data import corpus


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    return corpus.write_corpus(tmp_path_factory.mktemp("corpus"))


def test_text_corpus_is_split_by_unit_and_prose(written):
    paths = written
    train = [json.loads(line)["text"] for line in open(paths["train"])]
    heldout = [json.loads(line)["text"] for line in open(paths["heldout"])]
    assert sum(map(len, train)) > 300_000 and 5_000 < sum(map(len, heldout)) < sum(map(len, train)) / 5
    assert not set(train) & set(heldout)
    assert not any(">>>" in t or "::=" in t for t in train + heldout)
    assert paths["counts"]["heldout"]["documents"] == len(heldout)
    raw = "Title\n*****\n\nUse :func:`len` and ``x`` to count the items\nof a container.\n\n   code = 1\n"
    assert corpus.clean_paragraphs(raw, min_chars=20) == ["Use len and x to count the items of a container."]


def chats(path):
    return json.loads(Path(path).read_text())


def test_text_chats_answer_each_document_with_its_opening(written):
    units = corpus.pydoc_units() + corpus.docstring_units()
    phrases = {unit: corpus.unit_phrase(unit, text) for unit, text in units}
    split = corpus.split_documents(units)
    for part in ("train", "heldout"):
        # the documents of text_{part}.jsonl, each under its unit#k id
        docs = [json.loads(line)["text"] for line in open(written[part])]
        assert docs == [doc for _, doc in split[part]]
        by_id, index = {}, {}
        for unit, doc in split[part]:
            index[unit] = index.get(unit, -1) + 1
            by_id[f"{unit}#{index[unit]}"] = (unit, doc)
        records = chats(written[f"chat_{part}"])
        assert written["counts"][part]["chat_records"] == len(records) > 0.9 * len(docs)  # few openings too long
        assert len({r["id"] for r in records}) == len(records)
        for r in records:
            assert set(r) == {"id", "conversations"}  # text only: no image
            (human, gpt) = r["conversations"]
            assert (human["from"], gpt["from"]) == ("human", "gpt") and "<image>" not in human["value"] + gpt["value"]
            unit, doc = by_id[r["id"]]
            assert human["value"] in {t.format(phrases[unit]) for t in corpus.QUESTION_TEMPLATES}, r["id"]
            reply = gpt["value"]
            assert doc.startswith(reply) and 0 < len(reply) <= corpus.REPLY_CHARS, r["id"]
            # cut where a sentence or a paragraph ends
            assert len(reply) == len(doc) or doc[len(reply)] == "\n" or reply[-1] in ".!?\"')", r["id"]
    train_units = {r["id"].split("#")[0] for r in chats(written["chat_train"])}
    heldout_units = {r["id"].split("#")[0] for r in chats(written["chat_heldout"])}
    assert heldout_units and not train_units & heldout_units
    # every template is used, and both kinds of unit are asked about
    questions = [r["conversations"][0]["value"] for r in chats(written["chat_train"])]
    for template in corpus.QUESTION_TEMPLATES:
        assert any(re.fullmatch(re.escape(template).replace(r"\{\}", ".+"), q) for q in questions), template
    assert any("the json module" in q for q in questions)
    assert any("the assert statement" in q for q in questions)


def test_text_chats_are_deterministic_and_follow_the_seed(written, tmp_path):
    again = corpus.write_corpus(tmp_path / "again")
    for key in ("chat_train", "chat_heldout", "train", "heldout"):
        assert Path(again[key]).read_bytes() == Path(written[key]).read_bytes(), key
    other = corpus.write_corpus(tmp_path / "seed1", seed=1)
    assert Path(other["chat_heldout"]).read_bytes() != Path(written["chat_heldout"]).read_bytes()


def test_unit_phrases_read_as_words():
    topics = dict(corpus.pydoc_units())
    assert corpus.unit_phrase("topic:assert", topics["topic:assert"]) == "the assert statement"
    assert corpus.unit_phrase("topic:augassign", topics["topic:augassign"]) == "augmented assignment statements"
    assert corpus.unit_phrase("topic:debugger", topics["topic:debugger"]) == "pdb"  # '"pdb" — The Python Debugger'
    assert corpus.unit_phrase("topic:typesmapping", topics["topic:typesmapping"]) == "mapping types"
    assert corpus.unit_phrase("topic:formatstrings", topics["topic:formatstrings"]) == "format string syntax"
    assert corpus.unit_phrase("module:json", "JSON (JavaScript Object Notation) is a subset of JavaScript") == (
        "the json module")
    # a topic without a heading reads as its key
    assert corpus.unit_phrase("topic:attribute-access", "Some prose.\n\nMore prose.") == "attribute access"


def test_opening_cuts_at_a_sentence_or_paragraph_end():
    doc = "A first sentence, e.g. with an abbreviation. A second one.\nA new paragraph that runs on"
    assert corpus.opening(doc, max_chars=50) == "A first sentence, e.g. with an abbreviation."
    assert corpus.opening(doc, max_chars=60) == "A first sentence, e.g. with an abbreviation. A second one."
    assert corpus.opening(doc, max_chars=len(doc)) == doc  # the whole document fits
    # a paragraph ending in ":" introduces what follows: no place to stop
    assert corpus.opening("Short intro, then a list:\nname -- what it is", max_chars=30) is None
    assert corpus.opening("x" * 400 + ".") is None  # a first sentence too long for a reply
