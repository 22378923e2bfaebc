"""Reading and checking answers: the one home of how a reply is turned into an answer and
compared with the gold one, shared by evaluation (eval/metrics.py scores benchmark items with it)
and training (train/rewards.py's verifiable rewards).

- `final_answer`: a worked reply's conclusion, the text after its last "Answer:" ("The cat is on
  the left. Answer: cat" -> "cat"); a reply without one is its own conclusion (`has_final_answer`
  tells which).
- `normalize_answer`: lower case, no punctuation, no articles, number words as digits, no
  "the answer is" lead-in (in the spirit of the VQA answer normalisation).
- `extract_choice`: the option a reply picks, coping with "B", "(B)", "Answer: B", "B. red",
  "The answer is B" and the option's text alone ("red"). Returns the option's index or None.
- `parse_yes_no`: "yes" / "no" / None, looking at the first word first (so that
  "No, there is not a dog" is a no and "Yes, there is no cat" is a yes).
- `parse_number`: the number a reply states ("3", "three", "2.50", "-4"), or None;
  `numbers_equal` compares two up to float rounding.
- `listed_choices`: the options a question lists as "A. text" lines.
- `canonical_answer`: a question's kind (choice / yesno / open) and its gold answer in the form
  the checks compare against (the option letter, "yes" / "no", the text); `resolve_answer` finds
  a choice question's letter from an index, a letter or the option's text.
- `parse_answer`, `gold_form`, `is_correct`: a reply read by the question's kind and compared with
  the gold answer: the world's own answer checker, and every benchmark's.

None means "could not tell": scoring counts it as wrong, never as a guess.
"""

from __future__ import annotations

import math
import re
import string
from typing import Any, Literal

from vlmkit.errors import BadRecordError

AnswerKind = Literal["choice", "yesno", "open"]
LETTERS = string.ascii_uppercase
"""Option letters: choices[i] is LETTERS[i]."""
YES_NO = {"yes": "yes", "no": "no", "true": "yes", "false": "no"}
"""Gold answers that make a question a yes/no one, and their canonical form."""
_NUMBER_WORDS = {w: str(i) for i, w in enumerate(
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen "
    "sixteen seventeen eighteen nineteen twenty".split())}
_ARTICLES = {"a", "an", "the"}
_LEAD_IN = re.compile(r"^\s*(?:the\s+)?(?:correct\s+|final\s+)?(?:answer|option|choice)\s*(?:is|:)?\s*[:\-]?\s*",
                      re.IGNORECASE)
_PUNCT = str.maketrans({c: " " for c in string.punctuation})
_YES = {"yes", "yeah", "yep", "true", "correct"}
_NO = {"no", "nope", "not", "false", "incorrect"}


_FINAL = re.compile(r"\banswer\s*:", re.IGNORECASE)


def final_answer(reply: str) -> str:
    """The text after the last "Answer:" of a reply that works its way to an answer, else the reply."""
    if not has_final_answer(reply):
        return reply
    return reply[list(_FINAL.finditer(reply))[-1].end():].strip()


def has_final_answer(reply: str) -> bool:
    """Whether a reply concludes with "Answer: <something>"."""
    marks = list(_FINAL.finditer(reply))
    return bool(marks) and bool(reply[marks[-1].end():].strip())


def normalize_answer(text: str) -> str:
    """Canonical form for exact-match comparison: 'The answer is: Three.' -> '3'."""
    text = _LEAD_IN.sub("", text.strip().lower())
    words = text.translate(_PUNCT).split()
    words = [_NUMBER_WORDS.get(w, w) for w in words if w not in _ARTICLES]
    return " ".join(words)


def _letter_in_range(letter: str, n: int) -> int | None:
    index = ord(letter.upper()) - ord("A")
    return index if 0 <= index < n else None


# Ordered from the most explicit form to the least; each captures one option letter.
_LETTER_PATTERNS = [
    re.compile(r"^\s*[\(\[]?([A-Za-z])[\)\]]?\s*[.:]?\s*$"),  # "B", "(B)", "b.", "[B]"
    # "Answer: B", "The answer is (B)", "option B"; the letter must be a capital ("answer is a cat").
    re.compile(r"(?i:answer|option|choice)\s*(?i:is|would be|:)?\s*[:\-]?\s*[\(\[]?([A-Z])(?![A-Za-z'])"),
    re.compile(r"(?i:answer|option|choice)\s*(?i:is|would be|:)?\s*[:\-]?\s*[\(\[]([A-Za-z])[\)\]]"),  # "answer is (c)"
    re.compile(r"^\s*[\(\[]?([A-Z])[\)\]]?\s*[.:)]\s"),  # "B. red", "(B) red", "B) red", "B: red"
    re.compile(r"^\s*[\(\[]([A-Z])[\)\]]"),  # "(B)red"
]


def _choice_by_text(reply: str, choices: list[str]) -> int | None:
    """The one option whose (normalised) text the reply is, or the reply contains as whole words."""
    norm_reply = normalize_answer(reply)
    norm_choices = [normalize_answer(c) for c in choices]
    exact = [i for i, c in enumerate(norm_choices) if c and c == norm_reply]
    if len(exact) == 1:
        return exact[0]
    padded = f" {norm_reply} "
    found = [i for i, c in enumerate(norm_choices) if c and f" {c} " in padded]
    # "dark red" also contains "red": keep only matches not inside a longer matched option.
    found = [i for i in found if not any(j != i and f" {norm_choices[i]} " in f" {norm_choices[j]} "
                                         and norm_choices[j] != norm_choices[i] for j in found)]
    return found[0] if len(found) == 1 else None


def extract_choice(reply: str, choices: list[str]) -> int | None:
    """Index of the option `reply` picks among `choices` (A = 0), or None when it cannot tell."""
    n = len(choices)
    if not reply or not reply.strip():
        return None
    first_line = reply.strip().splitlines()[0]
    for text in (first_line, reply):
        for pattern in _LETTER_PATTERNS:
            m = pattern.search(text)
            if m:
                index = _letter_in_range(m.group(1), n)
                if index is not None:
                    return index
    by_text = _choice_by_text(reply, choices)
    if by_text is not None:
        return by_text
    # A lone capital letter ("I think B is right"); "A" / "I" followed by a lower-case word are
    # an article / a pronoun, not an option. Only when exactly one distinct letter qualifies.
    letters = {m.group(1) for m in re.finditer(r"(?<![A-Za-z'])([A-Z])(?![A-Za-z'])", reply)
               if not (m.group(1) in "AI" and re.match(r"\s+[a-z]", reply[m.end():]))}
    letters = {letter for letter in letters if _letter_in_range(letter, n) is not None}
    if len(letters) == 1:
        return _letter_in_range(letters.pop(), n)
    return None


def parse_yes_no(reply: str) -> str | None:
    """'yes', 'no', or None when the reply says neither (or both without a leading word)."""
    words = normalize_answer(reply).split()
    if not words:
        return None
    if words[0] in _YES:
        return "yes"
    if words[0] in _NO:
        return "no"
    has_yes = any(w in _YES for w in words)
    has_no = any(w in _NO for w in words) or "n't" in reply.lower()
    if has_yes != has_no:
        return "yes" if has_yes else "no"
    return None


_NUMBER = re.compile(r"(?<![\w.])[-+]?\d+(?:\.\d+)?(?!\w)")


def parse_number(reply: str) -> float | None:
    """The one number a reply's final answer states ("3", "three", "2.50", "-4", "1,200"), or None
    when it states none or several different ones."""
    text = _LEAD_IN.sub("", final_answer(reply).strip()).replace(",", "")
    words = text.lower().translate(_PUNCT).split()
    values = {float(_NUMBER_WORDS[w]) for w in words if w in _NUMBER_WORDS}
    values |= {float(m.group(0)) for m in _NUMBER.finditer(text)}
    return values.pop() if len(values) == 1 else None


NUMBER_TOLERANCE = 1e-9
"""Relative and absolute tolerance of `numbers_equal`: far below any stated digit, far above the
rounding of a float sum ("0.30000000000000004")."""


def numbers_equal(a: float, b: float) -> bool:
    """Numeric equality up to float rounding."""
    return math.isclose(a, b, rel_tol=NUMBER_TOLERANCE, abs_tol=NUMBER_TOLERANCE)


_OPTION_LINE = re.compile(r"^\s*([A-Z])\.\s+(\S.*?)\s*$")


def listed_choices(question: str) -> list[str]:
    """The options a question lists as "A. text" lines (A, B, C, ... in order, at least two), as
    vlmkit writes multiple-choice prompts; [] when it lists none."""
    options = [m.groups() for line in question.splitlines() if (m := _OPTION_LINE.match(line))]
    letters = "".join(letter for letter, _ in options)
    if len(options) < 2 or letters != LETTERS[:len(options)]:
        return []
    return [text for _, text in options]


def resolve_answer(answer: Any, choices: list[str]) -> str:
    """Canonical gold letter of a choice item: from an index, a letter, or the option text."""
    if isinstance(answer, bool):
        raise BadRecordError("bad_answer", f"answer {answer!r} is a boolean but the item has choices")
    if isinstance(answer, int):
        if 0 <= answer < len(choices):
            return LETTERS[answer]
        raise BadRecordError("answer_out_of_range", f"answer index {answer} with {len(choices)} choices")
    text = str(answer).strip()
    letter = text.strip("()").rstrip(".")
    matches = [i for i, c in enumerate(choices) if normalize_answer(c) == normalize_answer(text)]
    # "B" is a letter; "b" is a letter unless some option's text is "b".
    if len(letter) == 1 and letter.upper() in LETTERS[: len(choices)] and (letter.isupper() or not matches):
        return letter.upper()
    if len(matches) == 1:
        return LETTERS[matches[0]]
    raise BadRecordError("answer_not_in_choices",
                         f"answer {text!r:.40} is neither a letter nor one of {choices!r:.120}")


def canonical_answer(answer: Any, choices: list[str]) -> tuple[AnswerKind, str]:
    """(kind, gold answer) of a question: with choices, a choice question and its option letter
    (`resolve_answer`); a yes / no / true / false answer (or a boolean), a yes/no question and
    "yes" / "no"; anything else, an open question and the answer's text. Raises BadRecordError
    for a choice answer that names no option."""
    if choices:
        return "choice", resolve_answer(answer, choices)
    text = str(answer).strip()
    if isinstance(answer, bool):
        text = "yes" if answer else "no"
    yes_no = YES_NO.get(text.lower().rstrip("."))
    if yes_no is not None:
        return "yesno", yes_no
    return "open", text


def parse_answer(kind: AnswerKind, reply: str, choices: list[str]) -> str | None:
    """The scorable answer in a generated reply: a letter, "yes" / "no", or normalised text. A
    reply that states facts before its "Answer: ..." is read on that final answer."""
    reply = final_answer(reply)
    if kind == "choice":
        index = extract_choice(reply, choices)
        return None if index is None else LETTERS[index]
    if kind == "yesno":
        return parse_yes_no(reply)
    return normalize_answer(reply) or None


def gold_form(kind: AnswerKind, answer: str) -> str:
    """A canonical gold answer as `parse_answer` reads replies (open answers normalised)."""
    return normalize_answer(answer) if kind == "open" else answer


def is_correct(kind: AnswerKind, reply: str, answer: str, choices: list[str]) -> bool:
    """Whether `reply` gives the canonical gold `answer` of a question of `kind`."""
    return parse_answer(kind, reply, choices) == gold_form(kind, answer)
