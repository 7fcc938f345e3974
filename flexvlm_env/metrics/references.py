"""The reference answers every per-sample metric takes: a non-empty sequence of strings."""
from __future__ import annotations

from typing import Sequence


def check_references(answers: Sequence[str]) -> None:
    """Raise ValueError unless `answers` is a non-empty sequence of reference strings. A bare string is refused:
    iterated, it would be one-character references, and `vqa_accuracy("yes", "yes")` would score 0."""
    if isinstance(answers, str):
        raise ValueError(f"answers={answers!r} is a string; pass a sequence of reference answers, e.g. [{answers!r}]")
    if not answers:
        raise ValueError("answers must hold at least one reference answer")
