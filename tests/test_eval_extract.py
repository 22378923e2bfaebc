"""Answer normalisation, option extraction and yes/no parsing on a table of tricky replies."""

import pytest

from vlmkit.data.answers import extract_choice, final_answer, normalize_answer, parse_yes_no

CHOICES = ["red", "blue", "dark red", "green"]


@pytest.mark.parametrize("reply, expected", [
    ("B", 1),
    ("(B)", 1),
    ("b", 1),
    ("B.", 1),
    ("[C]", 2),
    ("Answer: B", 1),
    ("answer:D", 3),
    ("The answer is B", 1),
    ("The answer is (B).", 1),
    ("the answer is (c).", 2),
    ("The correct option is D, green.", 3),
    ("B. blue", 1),
    ("B) blue", 1),
    ("(B) blue", 1),
    ("C: dark red", 2),
    ("blue", 1),
    ("Blue.", 1),
    ("dark red", 2),  # contains "red" too: the longer option wins
    ("It is green.", 3),
    ("The answer is a red circle", 0),  # "a" is an article, not option A
    ("A red one", 0),  # by text, not by the article
    ("I think B is right", 1),
    ("A", 0),
    ("E", None),  # out of range
    ("Answer: E", None),
    ("red or blue", None),  # two options named: cannot tell
    ("", None),
    ("purple", None),
    ("B\nBecause the sky is blue", 1),
])
def test_extract_choice(reply, expected):
    assert extract_choice(reply, CHOICES) == expected


def test_extract_choice_two_options():
    assert extract_choice("Yes", ["Yes", "No"]) == 0
    assert extract_choice("no.", ["Yes", "No"]) == 1
    assert extract_choice("C", ["Yes", "No"]) is None


@pytest.mark.parametrize("reply, expected", [
    ("Yes", "yes"),
    ("yes.", "yes"),
    ("No", "no"),
    ("No, there is not a dog.", "no"),
    ("Yes, there is no cat here but a dog.", "yes"),
    ("There isn't a dog in the image.", "no"),
    ("There is no dog.", "no"),
    ("I can say yes", "yes"),
    ("Maybe", None),
    ("", None),
])
def test_parse_yes_no(reply, expected):
    assert parse_yes_no(reply) == expected


@pytest.mark.parametrize("text, expected", [
    ("The answer is: Three.", "3"),
    ("  Red ", "red"),
    ("a red circle", "red circle"),
    ("Answer: two", "2"),
    ("top-left", "top left"),
])
def test_normalize_answer(text, expected):
    assert normalize_answer(text) == expected


@pytest.mark.parametrize("reply, expected", [
    ("The red circle is in the center. Left of it, in the middle left, is a blue square. Answer: blue square",
     "blue square"),
    ("The circle is red. Answer: C", "C"),
    ("answer: first. Then more. ANSWER : yes", "yes"),  # the last one counts
    ("blue square", "blue square"),  # no "Answer:": the reply is the answer
    ("The answer is 3", "The answer is 3"),  # a lead-in, left to normalize_answer
    ("My answer: ", "My answer: "),  # nothing after it: keep the reply
    ("Answers differ", "Answers differ"),
])
def test_final_answer(reply, expected):
    assert final_answer(reply) == expected
