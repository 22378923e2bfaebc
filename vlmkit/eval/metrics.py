"""Scores: per-row correctness, then accuracy overall and per category, yes/no metrics as POPE
reports them (precision / recall / F1 with "yes" as the positive class, and the yes-ratio), and
CircularEval aggregation as MMBench defines it (a question is right only if every rotation of its
options is answered right).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import asdict, dataclass
from typing import Any

from vlmkit.data.answers import gold_form, parse_answer
from vlmkit.eval.benchmarks import BenchItem


@dataclass
class RowResult:
    """One evaluated item: what the model said (`prediction`), what we read from it (`parsed`)."""

    id: str
    source_id: str
    category: str
    kind: str
    answer: str
    prediction: str
    parsed: str | None
    correct: bool
    rotation: int = 0
    scores: list[float] | None = None
    """ppl mode: the length-normalised log-likelihood of each option, in option order."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def parse_reply(item: BenchItem, reply: str) -> str | None:
    """The scorable answer in a generated reply (data/answers.py's `parse_answer` by the item's kind)."""
    return parse_answer(item.kind, reply, item.choices)


def score_reply(item: BenchItem, reply: str) -> RowResult:
    parsed = parse_reply(item, reply)
    return RowResult(id=item.id, source_id=item.source_id, category=item.category, kind=item.kind,
                     answer=item.answer, prediction=reply, parsed=parsed,
                     correct=parsed == gold_form(item.kind, item.answer), rotation=item.rotation)


def _ratio(num: float, den: float) -> float:
    return num / den if den else 0.0


def yes_no_metrics(rows: list[RowResult]) -> dict[str, float]:
    """POPE's table: accuracy, precision, recall, F1 (positive = "yes"), yes-ratio, unparsed count."""
    tp = sum(r.parsed == "yes" and r.answer == "yes" for r in rows)
    fp = sum(r.parsed == "yes" and r.answer == "no" for r in rows)
    fn = sum(r.parsed != "yes" and r.answer == "yes" for r in rows)
    precision, recall = _ratio(tp, tp + fp), _ratio(tp, tp + fn)
    return {
        "n": len(rows),
        "accuracy": _ratio(sum(r.correct for r in rows), len(rows)),
        "precision": precision,
        "recall": recall,
        "f1": _ratio(2 * precision * recall, precision + recall),
        "yes_ratio": _ratio(sum(r.parsed == "yes" for r in rows), len(rows)),
        "unparsed": sum(r.parsed is None for r in rows),
    }


def _accuracy_table(outcomes: list[tuple[str, bool]]) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """(category, correct) pairs -> overall {n, correct, accuracy} and the same per category."""
    by_cat: dict[str, list[bool]] = defaultdict(list)
    for category, ok in outcomes:
        by_cat[category].append(ok)
    per_category = {c: {"n": len(v), "correct": sum(v), "accuracy": _ratio(sum(v), len(v))}
                    for c, v in sorted(by_cat.items())}
    correct = sum(ok for _, ok in outcomes)
    return {"n": len(outcomes), "correct": correct, "accuracy": _ratio(correct, len(outcomes))}, per_category


def summarize(rows: list[RowResult]) -> dict[str, Any]:
    """Accuracy overall and per category; CircularEval when rows hold rotations; POPE metrics.

    With rotations, a question (source_id) is right only if all its rows are right; `vanilla`
    then reports the plain accuracy of the unrotated rows for comparison.
    """
    questions: dict[str, list[RowResult]] = defaultdict(list)
    for r in rows:
        questions[r.source_id].append(r)
    outcomes = [(group[0].category, all(r.correct for r in group)) for group in questions.values()]
    overall, per_category = _accuracy_table(outcomes)
    out: dict[str, Any] = {**overall, "per_category": per_category}
    out["unparsed"] = sum(r.parsed is None for r in rows)
    if any(r.rotation for r in rows):
        out["circular"] = True
        out["vanilla"], _ = _accuracy_table([(r.category, r.correct) for r in rows if r.rotation == 0])
    yes_no = [r for r in rows if r.kind == "yesno"]
    if yes_no:
        out["yes_no"] = yes_no_metrics(yes_no)
    return out
