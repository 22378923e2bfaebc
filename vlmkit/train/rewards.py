"""Verifiable rewards of a grpo stage (train/grpo.py): checkers, the reward router, the format reward.

A `Task` is what a prompt asks: the reference reply of its record, its final answer, the options
listed in the question and the task's category. A checker reads a reply against the reference
answer, `(reply, answer, task) -> float` in [0, 1]:

    exact   the reply's final answer equals the reference's after normalisation
    choice  the reply picks the reference's option (by letter or by the option's text)
    number  the reply states the reference's number (numeric equality after parsing)
    world   the world's own answer checker: the reply read by the question's kind (choice / yes-no /
            open) and compared as the evaluation scores a benchmark item (data/answers.py)

The router picks the checker per task category, as MiMo-VL routes each task to its verifier
(`GRPOSettings.routes`, default per world category; `default_checker` for the rest). A checker
that raises, or returns anything but a number in [0, 1], is counted (`RewardRouter.errors`) and
the reply gets reward 0: one bad checker or reference never stops a run.

The optional format reward (`GRPOSettings.format_reward`, its weight) pays a reply that ended on
its own (not cut at max length), whose final answer can be read for the task's kind, and that
concludes with "Answer: ..." wherever the reference reply does (the world's worked categories).
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field

from vlmkit.config import GRPOSettings
from vlmkit.data.answers import (LETTERS, canonical_answer, extract_choice, final_answer, has_final_answer,
                                 is_correct, listed_choices, normalize_answer, numbers_equal, parse_answer,
                                 parse_number, resolve_answer)
from vlmkit.data.types import Message, Record
from vlmkit.errors import BadRecordError

log = logging.getLogger("vlmkit.train")
LOGGED_ERRORS = 10
"""Checker failures logged as warnings; later ones go to the debug log (they are all counted)."""
CATEGORY_SUFFIX = re.compile(r"-([a-z][a-z_]*)$")
"""A record id's category suffix, as the world's single-question records carry it (`val_12-count`)."""


@dataclass
class Task:
    """A question with a verifiable answer."""

    id: str
    reference: str
    """The reference reply (the record's last assistant turn)."""
    choices: list[str] = field(default_factory=list)
    """The options the question lists ("A. text" lines), in order; empty for an open question."""
    category: str | None = None

    @property
    def answer(self) -> str:
        """The reference's final answer (the text after its last "Answer:", else all of it)."""
        return final_answer(self.reference)


def task_from_record(record: Record) -> tuple[list[Message], Task]:
    """The prompt (the turns before the record's last assistant turn) and the task it asks.

    The category is the record's `category` metadata, else its id's suffix (CATEGORY_SUFFIX).
    Raises BadRecordError (no_assistant_turn, answer_not_in_choices) for a record that asks
    nothing checkable."""
    last = max((i for i, m in enumerate(record.messages) if m.role == "assistant"), default=None)
    if last is None or not record.messages[last].content.strip() or \
            not any(m.role == "user" for m in record.messages[:last]):
        raise BadRecordError("no_assistant_turn", "a prompt needs a user turn and an assistant reply after it",
                             record.id)
    question = next(m.content for m in reversed(record.messages[:last]) if m.role == "user")
    suffix = CATEGORY_SUFFIX.search(record.id)
    category = record.meta.get("category") or (suffix.group(1) if suffix else None)
    task = Task(record.id, record.messages[last].content.strip(), listed_choices(question), category)
    canonical_answer(task.answer, task.choices)  # a reference naming no listed option is unusable
    return record.messages[:last], task


# ---------------------------------------------------------------------------------------------
# Checkers
# ---------------------------------------------------------------------------------------------

Checker = Callable[[str, str, Task], float]


def check_exact(reply: str, answer: str, task: Task) -> float:
    return float(normalize_answer(final_answer(reply)) == normalize_answer(answer))


def check_choice(reply: str, answer: str, task: Task) -> float:
    if not task.choices:
        raise ValueError(f"task {task.id} lists no options for the choice checker")
    picked = extract_choice(final_answer(reply), task.choices)
    return float(picked is not None and LETTERS[picked] == resolve_answer(answer, task.choices))


def check_number(reply: str, answer: str, task: Task) -> float:
    gold = parse_number(answer)
    if gold is None:
        raise ValueError(f"the reference answer {answer!r:.40} of task {task.id} is not a number")
    stated = parse_number(reply)
    return float(stated is not None and numbers_equal(stated, gold))


def check_world(reply: str, answer: str, task: Task) -> float:
    kind, gold = canonical_answer(answer, task.choices)
    return float(is_correct(kind, reply, gold, task.choices))


CHECKERS: dict[str, Checker] = {"exact": check_exact, "choice": check_choice, "number": check_number,
                                "world": check_world}
"""Every checker by the name the router table uses (config.py's `CheckerName`)."""


def format_score(reply: str, task: Task, complete: bool) -> float:
    """1 for a reply in the expected format (module docstring), else 0."""
    if not complete:
        return 0.0
    kind, _ = canonical_answer(task.answer, task.choices)
    if parse_answer(kind, reply, task.choices) is None:
        return 0.0
    return float(has_final_answer(reply) or not has_final_answer(task.reference))


# ---------------------------------------------------------------------------------------------
# The router
# ---------------------------------------------------------------------------------------------


@dataclass
class Reward:
    """A reply's reward and its parts."""

    correct: float
    """The checker's score in [0, 1] (0 when it failed)."""
    format: float
    """The format score (0 or 1; 0 when the checking failed)."""
    total: float
    """correct + format weight x format: what the advantages are computed from."""
    error: bool = False
    """The checker (or the format check) raised or returned something outside [0, 1]."""


class RewardRouter:
    """Scores replies with the checker routed to each task's category."""

    def __init__(self, settings: GRPOSettings):
        self.routes = dict(settings.routes)
        self.default = settings.default_checker
        self.format_weight = settings.format_reward
        self.errors = 0
        """Replies whose checking failed, over the router's life."""

    def checker_name(self, task: Task) -> str:
        return self.routes.get(task.category, self.default) if task.category is not None else self.default

    def score(self, reply: str, task: Task, complete: bool) -> Reward:
        """The reward of `reply`; a failing checker gives reward 0 and `error`, never an exception."""
        try:
            correct = float(CHECKERS[self.checker_name(task)](reply, task.answer, task))
            if not (math.isfinite(correct) and 0.0 <= correct <= 1.0):
                raise ValueError(f"checker returned {correct}, outside [0, 1]")
            form = format_score(reply, task, complete) if self.format_weight else 0.0
        except Exception as e:  # whatever a checker does wrong is counted, never raised
            self.errors += 1
            level = logging.WARNING if self.errors <= LOGGED_ERRORS else logging.DEBUG
            log.log(level, "reward checker %s failed on task %s: %s: %s", self.checker_name(task), task.id,
                    type(e).__name__, e)
            return Reward(0.0, 0.0, 0.0, error=True)
        return Reward(correct, form, correct + self.format_weight * form)
