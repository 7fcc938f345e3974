"""VQA accuracy with the official VQA v2 answer normalisation.

Implements the rules of the official evaluation script (`vqaEval.py` of the VQA challenge tools,
also used for OK-VQA and TextVQA): punctuation handling (with the digit-comma and period rules),
number words to digits, articles dropped, contractions restored, then accuracy averaged over the
leave-one-annotator-out subsets, each giving min(1, #matching annotators / 3).

One deliberate difference from the script: it only normalises the references (and, in its
latest version, the prediction) when the annotators disagree, because the released VQA v2
annotations are already normalised. Our references come from several datasets and from the
procedural generator, so both sides are always normalised; on the official annotations the two
agree except for predictions like "two" against ten identical "2"s, which the script scores 0.
"""
from __future__ import annotations

import re
from typing import Sequence

from .references import check_references

# Number words the official script maps to digits (it stops at ten).
NUMBER_WORDS = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
    "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}
ARTICLES = frozenset({"a", "an", "the"})
# Characters the official script treats as punctuation. Note what is absent: the period (own rule
# below), the apostrophe (contractions), the colon and most symbols survive normalisation.
PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!")

# Contraction spellings without the apostrophe, as annotators type them, restored to the
# apostrophe form. This is the official table, oddities included ("somebody'd" maps to
# "somebodyd"; capitalised keys like "Im" never fire because words are lowercased first), so that
# scores stay comparable with published numbers.
CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've",
    "couldnt": "couldn't", "couldn'tve": "couldn't've", "couldnt've": "couldn't've",
    "didnt": "didn't", "doesnt": "doesn't", "dont": "don't", "hadnt": "hadn't",
    "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't", "havent": "haven't",
    "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's", "howd": "how'd",
    "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm",
    "Ive": "I've", "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've",
    "itll": "it'll", "let's": "let's", "maam": "ma'am", "mightnt": "mightn't",
    "mightnt've": "mightn't've", "mightn'tve": "mightn't've", "mightve": "might've",
    "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't", "notve": "not've",
    "oclock": "o'clock", "oughtnt": "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at",
    "'ow'sat": "'ow's'at", "shant": "shan't", "shed've": "she'd've", "she'dve": "she'd've",
    "she's": "she's", "shouldve": "should've", "shouldnt": "shouldn't",
    "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've", "somebody'd": "somebodyd",
    "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll", "somebodys": "somebody's", "someoned": "someone'd",
    "someoned've": "someone'd've", "someone'dve": "someone'd've", "someonell": "someone'll",
    "someones": "someone's", "somethingd": "something'd", "somethingd've": "something'd've",
    "something'dve": "something'd've", "somethingll": "something'll", "thats": "that's",
    "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've",
    "therere": "there're", "theres": "there's", "theyd": "they'd", "theyd've": "they'd've",
    "they'dve": "they'd've", "theyll": "they'll", "theyre": "they're", "theyve": "they've",
    "twas": "'twas", "wasnt": "wasn't", "wed've": "we'd've", "we'dve": "we'd've",
    "weve": "we've", "werent": "weren't", "whatll": "what'll", "whatre": "what're",
    "whats": "what's", "whatve": "what've", "whens": "when's", "whered": "where'd",
    "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've",
    "who'dve": "who'd've", "wholl": "who'll", "whos": "who's", "whove": "who've",
    "whyll": "why'll", "whyre": "why're", "whys": "why's", "wont": "won't",
    "wouldve": "would've", "wouldnt": "wouldn't", "wouldnt've": "wouldn't've",
    "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll", "y'allll": "y'all'll",
    "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've",
    "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll",
    "youre": "you're", "youve": "you've",
}

# A comma between two digits ("1,000") switches the whole answer to "delete punctuation" mode.
_DIGIT_COMMA = re.compile(r"\d,\d")
# The official period pattern is written with a broken look-behind, `(?!<=\d)`, which is a
# look-*ahead* that always passes; what it really does is delete every period not followed by a
# digit. Reproduced as behaved, not as intended: "3.5" keeps its period, "1." and "dog." lose theirs.
_PERIOD = re.compile(r"\.(?!\d)")
# The official call passes re.UNICODE (= 32) where `count` goes, so at most 32 periods are removed.
_PERIOD_MAX_REMOVALS = 32


def process_punctuation(text: str) -> str:
    """Apply the official punctuation rules to an answer string.

    Each punctuation character is deleted where it touches a space (or anywhere, if the answer has
    a digit-comma-digit) and replaced by a space otherwise, so "yes,no" splits into two words while
    "1,000" becomes "1000"; then periods not followed by a digit are deleted.
    """
    delete_everywhere = _DIGIT_COMMA.search(text) is not None
    out = text
    for char in PUNCTUATION:
        # The test looks at the *original* text, as the official script does.
        if delete_everywhere or f"{char} " in text or f" {char}" in text:
            out = out.replace(char, "")
        else:
            out = out.replace(char, " ")
    return _PERIOD.sub("", out, count=_PERIOD_MAX_REMOVALS)


def process_digit_article(text: str) -> str:
    """Lowercase, map number words to digits, drop articles and restore contractions."""
    words = [NUMBER_WORDS.get(word, word) for word in text.lower().split()]
    words = [CONTRACTIONS.get(word, word) for word in words if word not in ARTICLES]
    return " ".join(words)


def normalize_vqa_answer(answer: str) -> str:
    """Normalise one answer the way the official VQA evaluation does.

    >>> normalize_vqa_answer("The Two dogs.")
    '2 dogs'
    """
    text = answer.replace("\n", " ").replace("\t", " ").strip()
    return process_digit_article(process_punctuation(text))


def vqa_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """VQA accuracy of `prediction` against the annotators' `answers`, in [0, 1].

    For each annotator, the prediction scores min(1, matches among the *other* annotators / 3);
    the result is the mean over annotators. With the usual ten answers that is the official
    average over the ten 9-annotator subsets. With a single reference there is no one left to
    leave out, so it is exact match after normalisation.
    """
    check_references(answers)
    predicted = normalize_vqa_answer(prediction)
    references = [normalize_vqa_answer(answer) for answer in answers]
    if len(references) == 1:
        return float(predicted == references[0])
    total_matches = sum(reference == predicted for reference in references)
    per_annotator = [
        min(1.0, (total_matches - (reference == predicted)) / 3.0) for reference in references
    ]
    return sum(per_annotator) / len(per_annotator)
