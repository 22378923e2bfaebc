"""From a model's free-form reply to a scorable answer.

- `final_answer`: a worked reply's conclusion, the text after its last "Answer:" ("The cat is on
  the left. Answer: cat" -> "cat"); a reply without one is its own conclusion.
- `normalize_answer`: lower case, no punctuation, no articles, number words as digits, no
  "the answer is" lead-in (in the spirit of the VQA answer normalisation).
- `extract_choice`: the option a reply picks, coping with "B", "(B)", "Answer: B", "B. red",
  "The answer is B" and the option's text alone ("red"). Returns the option's index or None.
- `parse_yes_no`: "yes" / "no" / None, looking at the first word first (so that
  "No, there is not a dog" is a no and "Yes, there is no cat" is a yes).

None means "could not tell": scoring counts it as wrong, never as a guess.
"""

from __future__ import annotations

import re
import string

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
    marks = list(_FINAL.finditer(reply))
    if not marks or not reply[marks[-1].end():].strip():
        return reply
    return reply[marks[-1].end():].strip()


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
