"""Answer letters from generated text, and teacher/student accuracy on the validation split."""

from __future__ import annotations

import re
from dataclasses import dataclass

LETTER_PATTERNS = [
    # "C", "(C)", "C) 600", "C." or "C is ..." at the start of the answer.
    re.compile(r"^\s*\(?([A-E])\)?\s*(?=$|[).:,;]|is\b)"),
    # "C 600" at the start; "A" followed by a word is left out because it is usually the article.
    re.compile(r"^\s*([B-E])\s"),
    # "The answer is C", "answer: (C)", "Answer is option D".
    re.compile(r"answer\s*(?:is|:|=)?\s*(?:option\s*)?\(?([A-E])\)?(?![A-Za-z0-9])", re.IGNORECASE),
    re.compile(r"\boption\s*\(?([A-E])\)?(?![A-Za-z0-9])", re.IGNORECASE),
    # "(C)" or "C)" anywhere.
    re.compile(r"\(([A-E])\)"),
    re.compile(r"(?<![A-Za-z0-9])([A-E])\)"),
]
# A lone capital B-E anywhere; "A" is left out here because it is usually the article.
LONE_LETTER = re.compile(r"(?<![A-Za-z0-9])([B-E])(?![A-Za-z0-9])")


def _normalise(text: str) -> str:
    return re.sub(r"\s+", "", text).lower().rstrip(".")


def extract_letter(answer: str, options: dict[str, str] | None = None) -> str | None:
    """Return the option letter an answer chooses, or None when it names none.

    Handles "C", "(C)", "C) 600", "The answer is C", and an answer that repeats one option's text ("600").
    ``options`` maps letters to option texts without their "A)" labels.
    """
    text = answer.strip()
    if not text:
        return None
    for pattern in LETTER_PATTERNS:
        match = pattern.search(text)
        if match:
            return match.group(1).upper()

    # The answer repeats an option's text: an exact match first, then a unique containment.
    if options:
        target = _normalise(text)
        exact = [letter for letter, option in options.items() if option and _normalise(option) == target]
        if len(exact) == 1:
            return exact[0]
        contained = [letter for letter, option in options.items()
                     if option and _normalise(option) in target]
        if len(contained) == 1:
            return contained[0]

    match = LONE_LETTER.search(text)
    return match.group(1) if match else None


@dataclass
class Scores:
    """Validation scores; accuracies and shares are fractions in [0, 1]."""

    student_accuracy: float
    teacher_accuracy: float
    agreement: float
    student_unparsed: float
    teacher_unparsed: float


def score(gold: list[str], teacher_letters: list[str | None], student_letters: list[str | None]) -> Scores:
    """Accuracy of each side against gold, their agreement (a missing letter never agrees) and unparsed shares."""
    n = len(gold)
    if n == 0:
        raise ValueError("cannot score an empty validation set")
    return Scores(
        student_accuracy=sum(s == g for s, g in zip(student_letters, gold)) / n,
        teacher_accuracy=sum(t == g for t, g in zip(teacher_letters, gold)) / n,
        agreement=sum(s is not None and s == t for s, t in zip(student_letters, teacher_letters)) / n,
        student_unparsed=sum(s is None for s in student_letters) / n,
        teacher_unparsed=sum(t is None for t in teacher_letters) / n,
    )
