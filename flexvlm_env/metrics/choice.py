"""Multiple-choice accuracy (ScienceQA-style): which option did the model pick?

Options are in letter order (A, B, C, ...) and the prompt lists them as "A. ...". The reference is
normally the correct letter, but real datasets sometimes give the option text instead;
`gold_letter` accepts both. The prediction may name the option by letter ("B", "(B)", "B.",
"B) Paris", "Option B") or by its text ("Paris"); `parse_choice` tries, in order:

1. the whole answer is one letter, optionally bracketed or followed by ")", "." or ":";
2. the whole answer is an option's text;
3. the answer starts with a delimited letter ("(b) ...", "B) ...", "B. ...", "B: ...") or with a
   bare capital letter followed by that option's text ("B Paris");
4. exactly one bracketed letter "(X)" appears anywhere (several veto rule 3 too);
5. option texts appearing as whole words: the only one, or the longest when it contains all the
   others ("dark red" over "red").

Anything else (several letters, two unrelated options named) is unparsed and scores 0: a reward
must not pay for hedging.
"""
from __future__ import annotations

import re
import string
from typing import Sequence

LETTERS = string.ascii_uppercase


def option_letters(options: Sequence[str]) -> str:
    """The letters labelling `options`: "ABCD" for four options."""
    if not options:
        raise ValueError("options must be non-empty for a multiple-choice metric")
    if len(options) > len(LETTERS):
        raise ValueError(f"{len(options)} options is more than the {len(LETTERS)} letters available")
    return LETTERS[: len(options)]


def normalize_option_text(text: str) -> str:
    """Lowercase, collapse whitespace and drop framing punctuation, for comparing option texts."""
    return " ".join(text.lower().split()).strip(" .,;:!?\"'")


def gold_letter(answer: str, options: Sequence[str]) -> str:
    """The correct letter, from a reference given as a letter or as the option's text."""
    letters = option_letters(options)
    candidate = answer.strip().strip("().").upper()
    if len(candidate) == 1 and candidate in letters:
        return candidate
    wanted = normalize_option_text(answer)
    for letter, option in zip(letters, options):
        if normalize_option_text(option) == wanted:
            return letter
    raise ValueError(
        f"reference answer {answer!r} is neither a letter in {letters[0]}-{letters[-1]} nor the text "
        f"of one of the options {list(options)}"
    )


_WHOLE_LETTER = re.compile(r"\(?([A-Za-z])[).:]?")
_LEADING_BRACKETED = re.compile(r"\(([A-Za-z])\)")
# Uppercase only: a lowercase "a." or "a " at the start is usually the article, not option A.
_LEADING_DELIMITED = re.compile(r"([A-Z])[).:](?:\s|$)")
_LEADING_BARE = re.compile(r"([A-Z])\s+(.+)")
_ANY_BRACKETED = re.compile(r"\(([A-Z])\)")
_OPTION_WORD = re.compile(r"^(?:option|choice)\s+", re.IGNORECASE)


def parse_choice(prediction: str, options: Sequence[str]) -> str | None:
    """The letter the prediction picks among `options`, or None (rules in the module docstring)."""
    letters = option_letters(options)
    texts = [normalize_option_text(option) for option in options]
    answer = _OPTION_WORD.sub("", prediction.strip())

    whole = _WHOLE_LETTER.fullmatch(answer)
    if whole and whole.group(1).upper() in letters:
        return whole.group(1).upper()
    normalized = normalize_option_text(answer)
    if normalized in texts:
        return letters[texts.index(normalized)]

    # Letters written "(X)" anywhere: more than one means the answer names several options.
    bracketed = {letter for letter in _ANY_BRACKETED.findall(answer.upper()) if letter in letters}
    leading = _LEADING_BRACKETED.match(answer) or _LEADING_DELIMITED.match(answer)
    if leading and leading.group(1).upper() in letters and bracketed <= {leading.group(1).upper()}:
        return leading.group(1).upper()
    bare = _LEADING_BARE.fullmatch(answer)
    if bare and bare.group(1) in letters and normalize_option_text(bare.group(2)) == texts[letters.index(bare.group(1))]:
        return bare.group(1)
    if len(bracketed) == 1:
        return bracketed.pop()

    found = [
        index for index, text in enumerate(texts)
        if text and re.search(rf"(?<!\w){re.escape(text)}(?!\w)", normalized)
    ]
    if len(found) == 1:
        return letters[found[0]]
    if found:
        longest = max(found, key=lambda index: len(texts[index]))
        if all(texts[index] in texts[longest] for index in found):
            return letters[longest]
    return None


def mc_accuracy(prediction: str, answer: str, options: Sequence[str]) -> float:
    """1.0 if the prediction picks the reference option, else 0.0."""
    return float(parse_choice(prediction, options) == gold_letter(answer, options))
