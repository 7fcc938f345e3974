"""MMMU scoring: the benchmark's own answer parsing for multiple-choice and open questions.

Re-implements the rules of MMMU's evaluation utilities (`parse_multi_choice_response`,
`parse_open_response`, `eval_open`) so that scores are comparable with published MMMU numbers.

Multiple choice (the sample has `options`): strip , . ! ? ; : ' from the ends, pad with spaces,
then look for "(X)"; failing that " X "; failing that " X." (an addition made by lmms-eval's port,
needed for "B. Paris"); failing that, and only for answers longer than five words, the option
texts. Several candidates: the one mentioned last wins. No candidate: the official code guesses
at random; here the answer is unparsed and scores 0, because rewards must be deterministic.

Open questions (no `options`): key phrases are taken from the answer (the text after the last
"is ", "so ", "therefore ", "answer ", "=", ...), numbers are pulled out of them, numbers are
compared as floats rounded to 2 decimals and strings by containment of the normalised reference.
"""
from __future__ import annotations

import re
from typing import Sequence

from .choice import gold_letter, option_letters
from .references import check_references

_EDGE_CHARS = (",", ".", "!", "?", ";", ":", "'")


def parse_multi_choice_response(response: str, options: Sequence[str]) -> str | None:
    """The letter MMMU's rules read from `response`, or None (see module docstring)."""
    letters = option_letters(options)
    text = response
    # Sequential, as the original: "B.," loses "," then ".", but "B,." keeps its ",".
    for char in _EDGE_CHARS:
        text = text.strip(char)
    padded = f" {text} "

    for pattern in ("({})", " {} ", " {}."):
        candidates = [letter for letter in letters if pattern.format(letter) in padded]
        if candidates:
            positions = [padded.rfind(pattern.format(letter)) for letter in candidates]
            return candidates[positions.index(max(positions))]

    if len(padded.split()) > 5:
        lowered = padded.lower()
        candidates = [
            letter for letter, option in zip(letters, options)
            if option.strip() and option.lower() in lowered
        ]
        if candidates:
            positions = [lowered.rfind(options[letters.index(letter)].lower()) for letter in candidates]
            return candidates[positions.index(max(positions))]
    return None


def _is_number(text: str) -> bool:
    try:
        float(text.replace(",", ""))
    except ValueError:
        return False
    return True


def normalize_open_answer(text: str) -> list[str | float]:
    """MMMU's `normalize_str`: a number becomes [its float rounded to 2 places]; a string is
    lowercased, and a one-character string becomes [" x", "x "] so it only matches as a word end."""
    text = text.strip()
    if _is_number(text):
        return [round(float(text.replace(",", "")), 2)]
    text = text.lower()
    if len(text) == 1:
        return [" " + text, text + " "]
    return [text]


_NUMBER_WITH_COMMAS = re.compile(r"-?\b\d{1,3}(?:,\d{3})+\b")
_NUMBER_SCIENTIFIC = re.compile(r"-?\d+(?:\.\d+)?[eE][+-]?\d+")
_NUMBER_PLAIN = re.compile(r"-?(?:\d+\.\d+|\.\d+|\d+)(?![eE][+-]?\d+)(?![,\d])")


def extract_numbers(text: str) -> list[str]:
    """All numbers written in `text`: with thousands commas, scientific, then plain."""
    return [
        *_NUMBER_WITH_COMMAS.findall(text),
        *_NUMBER_SCIENTIFIC.findall(text),
        *_NUMBER_PLAIN.findall(text),
    ]


_KEY_INDICATORS = ("could be ", "so ", "is ", "thus ", "therefore ", "final ", "answer ", "result ")
_TRIVIAL_KEYS = frozenset(":,.!?;'")


def _key_subresponses(response: str) -> list[str]:
    text = response.strip().strip(".").lower()
    # The original splits on r"\.\s(?=[A-Z])|\n" *after* lowercasing, so the sentence rule never
    # fires and only line breaks split; kept that way for comparable scores.
    parts = text.split("\n")
    keys = []
    for index, part in enumerate(parts):
        indicators = _KEY_INDICATORS + (("=",) if index == len(parts) - 1 else ())
        tails = [part.split(indicator)[-1].strip() for indicator in indicators if indicator in part]
        # The shortest tail is the one closest to the end: the most specific claim.
        shortest = min(tails, key=len) if tails else ""
        if shortest and shortest not in _TRIVIAL_KEYS:
            keys.append(shortest)
    return keys or [text]


def parse_open_response(response: str) -> list[str | float]:
    """MMMU's `parse_open_response`: the normalised candidate answers found in `response`."""
    keys = _key_subresponses(response)
    candidates = list(keys)
    for key in keys:
        candidates.extend(extract_numbers(key))
    normalized: list[str | float] = []
    for candidate in candidates:
        for value in normalize_open_answer(candidate):
            if value not in normalized:
                normalized.append(value)
    return normalized


def eval_open(answers: Sequence[str], predictions: Sequence[str | float]) -> bool:
    """MMMU's `eval_open`: a float prediction must equal a numeric reference; a string prediction
    must contain a normalised string reference."""
    references = [value for answer in answers for value in normalize_open_answer(answer)]
    for prediction in predictions:
        if isinstance(prediction, str):
            if any(isinstance(reference, str) and reference in prediction for reference in references):
                return True
        elif prediction in references:
            return True
    return False


def mmmu_score(prediction: str, answers: Sequence[str], options: Sequence[str] | None) -> float:
    """1.0 if MMMU's rules judge `prediction` correct, else 0.0.

    With `options` the question is multiple choice and `answers[0]` the correct letter (or option
    text); without, every entry of `answers` is an accepted open answer.
    """
    check_references(answers)
    if options:
        return float(parse_multi_choice_response(prediction, options) == gold_letter(answers[0], options))
    return float(eval_open(answers, parse_open_response(prediction)))
