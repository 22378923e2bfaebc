"""Verifiable rewards: each checker on hand-made replies, the world checker against the evaluation's
scoring, the router's table and defaults, the format reward, tasks read from records, and a
checker that fails (counted, reward 0, never raised)."""

import typing

import pytest

from vlmkit.config import CheckerName, GRPOSettings, load_config
from vlmkit.data.answers import canonical_answer, listed_choices, parse_number
from vlmkit.data.types import Message, Record
from vlmkit.errors import BadRecordError, ConfigError
from vlmkit.eval.benchmarks import make_item
from vlmkit.eval.metrics import score_reply
from vlmkit.train.rewards import (CHECKERS, RewardRouter, Task, check_choice, check_exact, check_number,
                                  check_world, format_score, task_from_record)

CHOICES = ["red", "blue", "dark red", "green"]


def test_every_configurable_checker_exists():
    assert set(CHECKERS) == set(typing.get_args(CheckerName))


@pytest.mark.parametrize("reply, expected", [
    ("red circle", 1.0), ("The red circle.", 1.0), ("It is left of it. Answer: Red Circle", 1.0),
    ("blue circle", 0.0), ("red", 0.0), ("", 0.0),
])
def test_exact(reply, expected):
    assert check_exact(reply, "red circle", Task("t", "red circle")) == expected


@pytest.mark.parametrize("reply, expected", [
    ("B", 1.0), ("(B)", 1.0), ("The answer is B", 1.0), ("blue", 1.0), ("Answer: blue", 1.0),
    ("A", 0.0), ("dark red", 0.0), ("purple", 0.0),
])
def test_choice_by_letter_or_text(reply, expected):
    task = Task("t", "blue", CHOICES)
    assert check_choice(reply, "blue", task) == expected  # the reference as the option's text
    assert check_choice(reply, "B", task) == expected  # or as its letter


def test_choice_without_options_raises():
    with pytest.raises(ValueError):
        check_choice("B", "B", Task("t", "B"))


@pytest.mark.parametrize("reply, expected", [
    ("3", 1.0), ("three", 1.0), ("There are 3 shapes.", 1.0), ("Answer: 3.0", 1.0), ("three (3)", 1.0),
    ("4", 0.0), ("2 or 3", 0.0), ("many", 0.0),
])
def test_number(reply, expected):
    assert check_number(reply, "3", Task("t", "3")) == expected


def test_number_parsing():
    assert parse_number("2.50") == 2.5 and parse_number("-4") == -4 and parse_number("1,200 dots") == 1200
    assert parse_number("twelve") == 12 and parse_number("row 1, column 2") is None and parse_number("x") is None
    with pytest.raises(ValueError):  # a reference that is no number cannot be checked numerically
        check_number("3", "red", Task("t", "red"))


@pytest.mark.parametrize("question, answer, choices, replies", [
    ("What colour?", "blue", CHOICES, ["B", "blue", "Answer: B", "red", "dark red", "nothing"]),
    ("Is there a cat?", "no", [], ["No, there is none.", "Yes", "no", "maybe"]),
    ("How many?", "3", [], ["three", "The answer is 3.", "4", ""]),
    ("What is left of it?", "blue square", [], ["The red circle is here. Answer: blue square", "blue",
                                                 "Blue Square."]),
])
def test_world_checker_scores_as_the_evaluation_does(question, answer, choices, replies):
    item = make_item(id="q", question=question, answer=answer, choices=choices, images=[])
    for reply in replies:
        task = Task("q", answer, list(choices))
        assert check_world(reply, answer, task) == float(score_reply(item, reply).correct), reply


def test_router_routes_by_category_with_a_default():
    router = RewardRouter(GRPOSettings())
    assert router.checker_name(Task("t", "3", category="count")) == "number"
    assert router.checker_name(Task("t", "B", CHOICES, category="multiple_choice")) == "choice"
    assert router.checker_name(Task("t", "red", category="color")) == "world"
    assert router.checker_name(Task("t", "red")) == "world"
    custom = RewardRouter(GRPOSettings(routes={"color": "exact"}, default_checker="exact"))
    assert custom.checker_name(Task("t", "3", category="count")) == "exact"
    assert custom.score("Red.", Task("t", "red", category="color"), complete=True).correct == 1.0


def test_a_failing_checker_is_counted_and_scores_zero(monkeypatch):
    def broken(reply, answer, task):
        raise RuntimeError("checker bug")

    monkeypatch.setitem(CHECKERS, "world", broken)
    monkeypatch.setitem(CHECKERS, "exact", lambda reply, answer, task: 2.0)  # outside [0, 1]
    router = RewardRouter(GRPOSettings(routes={"color": "exact"}, format_reward=0.5))
    for task in (Task("a", "red"), Task("b", "red", category="color")):
        reward = router.score("red", task, complete=True)
        assert reward.error and reward.total == reward.correct == reward.format == 0.0
    assert router.errors == 2
    # a choice task routed to the choice checker without options fails the same way
    reward = RewardRouter(GRPOSettings(default_checker="choice")).score("B", Task("c", "B"), complete=True)
    assert reward.error and reward.total == 0.0


def test_format_reward():
    worked = Task("t", "The red circle is in the center. Answer: blue square")
    assert format_score("Something. Answer: red", worked, complete=True) == 1.0
    assert format_score("red", worked, complete=True) == 0.0  # the reference concludes with "Answer:"
    assert format_score("Something. Answer: red", worked, complete=False) == 0.0  # cut at max length
    choice = Task("t", "blue", CHOICES)
    assert format_score("B", choice, complete=True) == 1.0
    assert format_score("purple", choice, complete=True) == 0.0  # no option read
    router = RewardRouter(GRPOSettings(format_reward=0.5))
    assert router.score("B", choice, complete=True).total == 1.5
    assert router.score("A", choice, complete=True).total == 0.5


def test_tasks_from_records():
    question = "What colour is the square?\nA. red\nB. blue\nC. dark red\nD. green\n<image>"
    record = Record("val_3-multiple_choice", "qa", "chat",
                    [Message("user", question), Message("assistant", "blue")])
    turns, task = task_from_record(record)
    assert turns == record.messages[:1]
    assert task.choices == CHOICES and task.answer == "blue" and task.category == "multiple_choice"
    assert canonical_answer(task.answer, task.choices) == ("choice", "B")
    worked = Record("train_1-0", "qa", "chat",
                    [Message("user", "<image>\nWhat is red?"), Message("assistant", "a circle"),
                     Message("user", "What is left of the circle?"), Message("assistant", "It is. Answer: cross")],
                    meta={"category": "relation"})
    turns, task = task_from_record(worked)
    assert len(turns) == 3 and task.answer == "cross" and task.category == "relation"
    assert task_from_record(Record("train_1-0", "qa", "chat", [Message("user", "q"), Message("assistant", "a")])
                            )[1].category is None  # a numbered record carries no category


@pytest.mark.parametrize("messages, reason", [
    ([Message("user", "q")], "no_assistant_turn"),
    ([Message("assistant", "a")], "no_assistant_turn"),
    ([Message("user", "Which?\nA. red\nB. blue"), Message("assistant", "green")], "answer_not_in_choices"),
])
def test_records_that_ask_nothing_checkable(messages, reason):
    with pytest.raises(BadRecordError) as e:
        task_from_record(Record("r", "qa", "chat", messages))
    assert e.value.reason == reason


def test_listed_choices_need_consecutive_letters():
    assert listed_choices("Q?\nA. x\nB. y") == ["x", "y"]
    assert listed_choices("Q?\nA. x") == [] and listed_choices("Q?\nB. x\nC. y") == []
    assert listed_choices("No options here.") == []



@pytest.mark.parametrize("settings, needle", [
    ({"routes": {"color": "fuzzy"}}, "grpo.routes.color: must be one of"),
    ({"default_checker": "fuzzy"}, "grpo.default_checker: must be one of"),
    ({"clip_low": 1.0}, "grpo.clip_low must be < 1"),
    ({"refill_rounds": -1}, "grpo.refill_rounds must be >= 0"),
])
def test_router_settings_are_checked(settings, needle):
    raw = {"data": {"qa": {"path": "qa.json"}},
           "stages": [{"kind": "grpo", "llm_lr": 1e-3, "steps": 1, "grpo": settings}]}
    with pytest.raises(ConfigError, match=needle):
        load_config(raw)
