"""Exact match after light normalisation, the metric of the counting family (TallyQA).

Both sides are lowercased, stripped of surrounding whitespace and of sentence punctuation at the
ends, whitespace is collapsed, and number words become digits ("Three" == "3"). The number words
are the VQA table extended to twenty, because counting answers go past ten. Nothing else is
forgiven: "3 dogs" does not match "3".
"""
from __future__ import annotations

from typing import Sequence

from .references import check_references
from .vqa import NUMBER_WORDS

COUNT_WORDS = {
    **NUMBER_WORDS,
    "eleven": "11", "twelve": "12", "thirteen": "13", "fourteen": "14", "fifteen": "15",
    "sixteen": "16", "seventeen": "17", "eighteen": "18", "nineteen": "19", "twenty": "20",
}
# Punctuation that frames an answer without being part of it ("3.", "(3)", '"three"').
_FRAMING = " \t\n.,;:!?\"'()[]"


def normalize_exact(text: str) -> str:
    """Normalise an answer for exact matching (see module docstring).

    >>> normalize_exact(" Three. ")
    '3'
    """
    words = text.strip(_FRAMING).lower().split()
    return " ".join(COUNT_WORDS.get(word, word) for word in words)


def exact_match(prediction: str, answers: Sequence[str]) -> float:
    """1.0 if the normalised prediction equals any normalised reference, else 0.0."""
    check_references(answers)
    predicted = normalize_exact(prediction)
    return float(any(predicted == normalize_exact(answer) for answer in answers))
