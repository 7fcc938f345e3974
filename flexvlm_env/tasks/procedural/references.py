"""What a family generator returns, and the reference-answer formats the metrics expect.

A family generator draws one `Draft` (image, prompt, references, options, difficulty); the package
`__init__` wraps it into a `Sample` with the request id, metric and token budget of the family.
Reference formats follow the real datasets:

- VQA style (`vqa_references`): 10 annotator answers, most identical, a few using a listed
  variant ("grey" for "gray"), in random order, as VQA v2 and OK-VQA provide.
- Multiple choice (`multiple_choice`): options are stored in letter order on `Sample.options`
  (option i has letter "ABCDE"[i]); the prompt lists them one per line as "A. text"; and
  `answers == (correct_letter,)`, a single upper-case letter.

Every other reference answer is lower case; metrics compare case-insensitively.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
from PIL import Image

VQA_ANNOTATORS = 10
MC_LETTERS = "ABCDE"
MC_INSTRUCTION = "Answer with the letter."


@dataclass(frozen=True)
class Draft:
    """One generated request before it gets its id, metric and budget."""

    image: Image.Image
    prompt: str
    answers: tuple[str, ...]
    difficulty: dict[str, Any]
    options: tuple[str, ...] | None = None


def vqa_references(rng: np.random.Generator, answer: str, variants: Sequence[str] = ()) -> tuple[str, ...]:
    """10 annotator answers for `answer`: 0..3 annotators use one of `variants`, the rest agree."""
    variant_count = int(rng.integers(0, 4)) if variants else 0
    references = [answer] * (VQA_ANNOTATORS - variant_count)
    references += [variants[int(rng.integers(len(variants)))] for _ in range(variant_count)]
    return tuple(references[i] for i in rng.permutation(VQA_ANNOTATORS))


def multiple_choice(
    rng: np.random.Generator,
    question: str,
    correct: str,
    distractors: Sequence[str],
    *,
    keep_order: Sequence[str] | None = None,
) -> tuple[str, tuple[str, ...], tuple[str, ...]]:
    """Return (prompt, options, answers) for a multiple-choice question (module docstring format).

    Options are shuffled unless `keep_order` gives their order (numeric options read better
    ascending); `keep_order` must contain `correct` and the distractors.
    """
    if keep_order is not None:
        options = tuple(keep_order)
    else:
        pool = [correct, *distractors]
        options = tuple(pool[i] for i in rng.permutation(len(pool)))
    if not 2 <= len(options) <= len(MC_LETTERS) or len(set(options)) != len(options) or correct not in options:
        raise ValueError(f"bad multiple-choice options {options!r} for correct={correct!r}")
    letter = MC_LETTERS[options.index(correct)]
    lines = [question] + [f"{MC_LETTERS[i]}. {option}" for i, option in enumerate(options)] + [MC_INSTRUCTION]
    return "\n".join(lines), options, (letter,)


def numeric_options(rng: np.random.Generator, correct: int, count: int, step: int = 1, low: int = 0) -> list[int]:
    """`count` consecutive multiples of `step` (>= `low`) containing `correct`, ascending, with the
    correct value at a uniformly random position where the lower bound allows it."""
    position = int(rng.integers(count))
    first = max(low, correct - position * step)
    return [first + i * step for i in range(count)]
