"""Scoring, POPE yes/no metrics, CircularEval aggregation on hand-made cases, and report files."""

import json

import pytest

from vlmkit.eval.benchmarks import BenchItem, circular_items
from vlmkit.eval.metrics import score_reply, summarize
from vlmkit.eval.report import write_report


def test_score_reply_by_kind():
    choice = BenchItem(id="c", question="?", answer="B", kind="choice", choices=["red", "blue"])
    assert score_reply(choice, "The answer is B").correct
    assert score_reply(choice, "blue").correct
    assert not score_reply(choice, "red").correct
    assert score_reply(choice, "purple").parsed is None
    yesno = BenchItem(id="y", question="?", answer="no", kind="yesno")
    assert score_reply(yesno, "No, there is none.").correct
    assert not score_reply(yesno, "Yes").correct
    open_ = BenchItem(id="o", question="?", answer="3", kind="open")
    assert score_reply(open_, "three").correct
    assert score_reply(open_, "The answer is 3.").correct
    assert not score_reply(open_, "4").correct


def test_worked_replies_are_scored_on_their_final_answer():
    relation = BenchItem(id="r", question="?", answer="blue square", kind="open")
    worked = "The red circle is in the center. Left of it, in the middle left, is a blue square. Answer: "
    assert score_reply(relation, worked + "blue square").correct
    # the facts name the right object, the conclusion does not: wrong
    assert not score_reply(relation, worked.replace("Answer: ", "Answer: red circle")).correct
    choice = BenchItem(id="c", question="?", answer="B", kind="choice", choices=["red", "blue"])
    assert score_reply(choice, "The circle is blue. Answer: B").correct
    assert not score_reply(choice, "The circle is blue. Answer: A").correct
    yesno = BenchItem(id="y", question="?", answer="no", kind="yesno")
    assert score_reply(yesno, "Yes, I looked. Answer: no").correct


def test_pope_metrics():
    golds = ["yes", "yes", "yes", "no", "no", "no"]
    replies = ["yes", "yes", "no", "yes", "no", "hmm"]
    rows = [score_reply(BenchItem(id=str(i), question="?", answer=g, kind="yesno", category="pope"), r)
            for i, (g, r) in enumerate(zip(golds, replies))]
    out = summarize(rows)
    y = out["yes_no"]
    # tp=2, fp=1, fn=1 -> precision 2/3, recall 2/3; 3 of 6 answered yes; "hmm" is unparsed.
    assert y["precision"] == pytest.approx(2 / 3) and y["recall"] == pytest.approx(2 / 3)
    assert y["f1"] == pytest.approx(2 / 3)
    assert y["yes_ratio"] == pytest.approx(0.5) and y["unparsed"] == 1
    assert out["accuracy"] == pytest.approx(3 / 6) == y["accuracy"]


def test_circular_eval_hand_made():
    # q1: the model always says "w" -> right under every rotation. q2: always answers "A" -> right
    # only when the gold option sits at A (rotation 0), so it fails CircularEval.
    q1 = BenchItem(id="q1", question="?", answer="A", kind="choice", choices=["w", "x", "y", "z"], category="c1")
    q2 = BenchItem(id="q2", question="?", answer="A", kind="choice", choices=["p", "q", "r"], category="c2")
    rows = []
    for item in circular_items([q1, q2]):
        reply = "w" if item.source_id == "q1" else "A"
        rows.append(score_reply(item, reply))
    assert len(rows) == 7
    out = summarize(rows)
    assert out["circular"] and out["n"] == 2 and out["correct"] == 1 and out["accuracy"] == 0.5
    assert out["per_category"] == {"c1": {"n": 1, "correct": 1, "accuracy": 1.0},
                                   "c2": {"n": 1, "correct": 0, "accuracy": 0.0}}
    assert out["vanilla"]["accuracy"] == 1.0  # both right without rotations


def test_report_files(tmp_path):
    rows = [score_reply(BenchItem(id=str(i), question="?", answer="yes", kind="yesno", category=c), r)
            for i, (c, r) in enumerate([("a", "yes"), ("a", "no"), ("b", "yes")])]
    report = {"benchmark": "toy", "mode": "gen", "circular": False, "blind": False, **summarize(rows),
              "bad_rows": {"count": 1, "rows": [{"index": 7, "id": "x", "reason": "missing_image", "message": "m"}]}}
    paths = write_report(report, [r.to_dict() for r in rows], tmp_path / "out")
    assert json.loads(paths["json"].read_text())["accuracy"] == pytest.approx(2 / 3)
    md = paths["markdown"].read_text()
    assert "| a | 2 | 50.0 |" in md and "missing_image" in md and "precision" in md
    assert paths["png"].read_bytes()[:4] == b"\x89PNG"
    lines = paths["predictions"].read_text().splitlines()
    assert [json.loads(line)["prediction"] for line in lines] == ["yes", "no", "yes"]
