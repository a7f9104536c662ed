"""Answer-letter extraction and validation scores."""

from __future__ import annotations

import pytest

from hdkd.evaluation import extract_letter, score

OPTIONS = {"A": "32400", "B": "6000", "C": "600", "D": "60000", "E": "10"}


@pytest.mark.parametrize("answer, expected", [
    ("C", "C"),
    ("(C)", "C"),
    ("C) 600", "C"),
    ("C)600", "C"),
    ("c", None),
    ("The answer is C", "C"),
    ("the answer is (D).", "D"),
    ("Answer: option B", "B"),
    ("I pick option E", "E"),
    ("600", "C"),
    ("60000", "D"),
    (" 32400 ", "A"),
    ("so it is (B)", "B"),
    ("A", "A"),
    ("A) 32400", "A"),
    ("", None),
    ("   ", None),
    ("I do not know", None),
    ("A train leaves", None),
])
def test_extract_letter(answer, expected):
    assert extract_letter(answer, OPTIONS) == expected


def test_extract_letter_without_options():
    assert extract_letter("600") is None
    assert extract_letter("The answer is E") == "E"


def test_score_counts_agreement_and_unparsed():
    gold = ["A", "B", "C", "D"]
    teacher = ["A", "B", None, "A"]
    student = ["A", "C", None, "A"]
    scores = score(gold, teacher, student)
    assert scores.teacher_accuracy == 0.5
    assert scores.student_accuracy == 0.25
    # A missing letter never agrees: rows 0 and 3 agree, row 2 (both None) does not.
    assert scores.agreement == 0.5
    assert scores.student_unparsed == 0.25
    assert scores.teacher_unparsed == 0.25


def test_score_rejects_empty():
    with pytest.raises(ValueError):
        score([], [], [])
