"""Answer extraction: from a raw model generation to the answer string a metric compares.

Every per-sample metric runs the generation through `extract_answer` first, so that scoring does
not depend on how chatty the model was: surrounding whitespace goes, a model that reasons over
several lines is judged on its last non-empty line, "Answer:"/"The answer is" style prefixes and
markdown emphasis are dropped, and a short answer loses its sentence-final period ("Two." -> "Two").
Metric-specific normalisation (VQA punctuation rules, PTB tokenisation, ...) happens later, in the
metric itself.
"""
from __future__ import annotations

import re

# Answers of at most this many words are "short": their trailing period is sentence punctuation,
# not part of the answer. Longer generations (captions) keep it; their metrics tokenise it away.
SHORT_ANSWER_MAX_WORDS = 5

# "Answer: x", "Final answer - x", "The answer is x", "The correct answer is: x". A bare leading
# "Answer" without ":"/"is"/"-" is kept: it may be a word of the answer ("answer key").
# Applied repeatedly because models stack them ("Answer: The answer is B").
_PREFIX = re.compile(
    r"^(?:the\s+)?(?:(?:final|correct|short|best)\s+)?answer\s*(?:is\s*:?|:|-)\s*",
    re.IGNORECASE,
)
# Markdown emphasis around the whole answer ("*two*", "__B__") carries no content; bold markers
# ("**Answer:** B") are removed wherever they are.
_EMPHASIS = re.compile(r"^(\*|_{1,2})(.+?)\1$")


def extract_answer(generation: str) -> str:
    """Return the answer contained in a raw generation (see module docstring for the rules).

    >>> extract_answer("  Let me look.\\nThe answer is Two.\\n")
    'Two'
    >>> extract_answer("Answer: **B**")
    'B'
    """
    if not isinstance(generation, str):
        raise TypeError(f"generation must be a str, got {type(generation).__name__}")
    lines = [line.strip() for line in generation.strip().splitlines()]
    lines = [line for line in lines if line]
    if not lines:
        return ""
    answer = lines[-1].replace("**", "").strip()
    while True:
        stripped = _PREFIX.sub("", _strip_emphasis(answer), count=1).strip()
        if stripped == answer:
            break
        answer = stripped
    return strip_final_period(_strip_emphasis(answer))


def strip_final_period(text: str) -> str:
    """`text` without the sentence-ending period of a short answer ("Two." -> "Two"; not "..."). Metrics that
    compare characters (ANLS, MMMU's open questions) apply it to the references too, so that a reference that
    itself ends in one ("Acme Inc.", "U.S.") still equals the answer that repeats it."""
    if text.endswith(".") and not text.endswith("..") and len(text.split()) <= SHORT_ANSWER_MAX_WORDS:
        return text[:-1].rstrip()
    return text


def _strip_emphasis(text: str) -> str:
    match = _EMPHASIS.match(text)
    return match.group(2).strip() if match else text
