"""The language corpus of the synthetic world: real prose, split by unit."""

import json

from vlmkit.data import corpus


def test_text_corpus_is_split_by_unit_and_prose(tmp_path):
    paths = corpus.write_corpus(tmp_path)
    train = [json.loads(line)["text"] for line in open(paths["train"])]
    heldout = [json.loads(line)["text"] for line in open(paths["heldout"])]
    assert sum(map(len, train)) > 300_000 and 5_000 < sum(map(len, heldout)) < sum(map(len, train)) / 5
    assert not set(train) & set(heldout)
    assert not any(">>>" in t or "::=" in t for t in train + heldout)
    assert paths["counts"]["heldout"]["documents"] == len(heldout)
    raw = "Title\n*****\n\nUse :func:`len` and ``x`` to count the items\nof a container.\n\n   code = 1\n"
    assert corpus.clean_paragraphs(raw, min_chars=20) == ["Use len and x to count the items of a container."]
