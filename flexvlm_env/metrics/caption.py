"""Per-sample CIDEr-D for caption rewards, with document frequencies fixed in advance.

CIDEr-D weighs n-grams by how rare they are across the reference corpus, so pycocoevalcap computes
it for a whole corpus at once. A reward needs one caption scored alone; here the document
frequencies (DF) come from a reference corpus computed once (`build_cider_df`), saved as gzipped
JSON, and every caption is then scored against its own references with that table. With the DF of
the evaluated corpus itself, the result equals pycocoevalcap's per-image CIDEr-D exactly (tested),
including its details: clipped tf-idf products, the Gaussian length penalty (sigma 6), the factor
10, and the length taken as the count of bigrams, as the reference code does.

Tokenisation: the corpus path feeds CIDEr the output of pycocoevalcap's Java PTBTokenizer
(lowercase, Penn Treebank splits, punctuation tokens removed). Starting Java per reward is too
slow, so `ptb_tokenize` reproduces that output in Python for plain ASCII captions of words, numbers
and sentence punctuation (tested against the Java tokenizer). It differs from Java on some ASCII
too: "c++" (Java keeps it), "hello...world" and "3.5kg" (Java splits them), abbreviations such as
"no." and "sq." (Java keeps the period); and non-ASCII, URLs or emoticons may tokenise differently.

Where the DF comes from: `score()` looks the table up with `get_cider_df(cider_df_key(sample))`.
Procedural samples use the key "procedural", which defaults to the shipped asset
`flexvlm_env/assets/cider_df_procedural.json.gz` (built by `scripts/build_cider_df.py` from 5000
procedural training captions). Real-dataset samples use the key "default": register a table built
from the loaded references before scoring, e.g.
`set_cider_df(build_cider_df([s.answers for s in samples]))`.
"""
from __future__ import annotations

import gzip
import json
import math
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping, Sequence

CIDER_N = 4
CIDER_SIGMA = 6.0
# Reward = clip(CIDEr-D / 3, 0, 1). CIDEr-D runs from 0 to 10 (10 x mean clipped cosine), but
# typical values are far lower: a caption identical to one of five COCO references scores about 3
# (the copied reference contributes 10/5, the others less; 2.9 in the tests' example), human
# captions average 0.85 on COCO and published systems 1.0-1.5. Dividing by 3 maps copying a
# reference to ~1 and keeps the range where models differ linear rather than saturated. On the
# template-like procedural captions (shipped DF, 300 val images) a held-out reference scores 4.6
# on average (p10 3.1), a copied one 5.4 and another image's caption 0.4 (p90 0.9): correct
# reference-style captions saturate at 1, captions of the wrong scene stay below 0.3. A fixed
# scale, rather than one fitted per DF table, keeps rewards comparable across corpora.
CIDER_REWARD_SCALE = 3.0

FORMAT_NAME = "flexvlm-cider-df"
FORMAT_VERSION = 1
PROCEDURAL_KEY = "procedural"
DEFAULT_KEY = "default"
PROCEDURAL_ASSET = Path(__file__).resolve().parent.parent / "assets" / "cider_df_procedural.json.gz"

# ---------------------------------------------------------------------------------------------
# PTB tokenisation

# Tokens pycocoevalcap deletes after tokenising. The bracket names are upper case there while the
# tokenizer runs with -lowerCase, so "-lrb-"/"-rrb-" survive: kept that way to match scores.
PTB_PUNCTUATION = frozenset(
    ["''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-", ".", "?", "!", ",", ":", "-", "--", "...", ";"]
)
# Words whose final period the PTB tokenizer keeps even at the end of a line (checked against
# Stanford CoreNLP 3.4.1, the jar pycocoevalcap ships). Single letters and dotted acronyms ("a.m.",
# "u.s.") are handled by pattern.
_ABBREVIATIONS = frozenset(
    "mr mrs ms dr st mt jr sr vs etc inc co ltd ft jan feb mar apr jun jul aug sep sept oct nov "
    "dec ave blvd rd corp bros gen gov lt col sgt capt prof rev dept est al cf".split()
)
_ACRONYM = re.compile(r"^(?:[a-z]\.)+[a-z]?\.?$|^[a-z]\.$")
# Words the PTB tokenizer splits although no apostrophe (or only an odd one) marks it.
_SPLIT_WORDS = {
    "cannot": ("can", "not"), "gonna": ("gon", "na"), "gotta": ("got", "ta"),
    "wanna": ("wan", "na"), "lemme": ("lem", "me"), "gimme": ("gim", "me"),
    "'twas": ("'t", "was"), "'tis": ("'t", "is"), "y'all": ("y'", "all"),
}
_CLITICS = ("n't", "'s", "'re", "'ve", "'ll", "'d", "'m")
_CLITIC = re.compile(r"^(.+?)(n't|'s|'re|'ve|'ll|'d|'m)$")
# Characters split off the front of a word, and how PTB writes them (an opening quote is "`"/"``").
_OPENERS = {'"': "``", "'": "`", "`": "`", "(": "-lrb-", "[": "-lsb-", "{": "-lcb-", "$": "$", "#": "#", "-": "-"}
# ... and off the end of a word (a closing double quote is "''").
_CLOSERS = {'"': "''", "'": "'", "`": "`", ")": "-rrb-", "]": "-rsb-", "}": "-rcb-", ",": ",", ";": ";", ":": ":", "%": "%", "-": "-"}
# A character standing alone: PTB reads a lone double quote as closing.
_SINGLE = {**_OPENERS, **_CLOSERS}
# Inside a word, these split it ("red,white" -> "red , white") unless between digits ("1,000",
# "10:30"); "&", "+", "=" always split ("at&t" -> "at & t").
_INNER_SPLIT = re.compile(r"(?<!\d)([,;:])|([,;:])(?!\d)|([&+=])")


def ptb_tokenize(caption: str) -> str:
    """Tokenise like pycocoevalcap's PTBTokenizer and return the space-joined tokens.

    >>> ptb_tokenize("A man's T-shirt (white), isn't it?")
    "a man 's t-shirt -lrb- white -rrb- is n't it"
    """
    tokens: list[str] = []
    for chunk in caption.replace("\n", " ").lower().split():
        for piece in _INNER_SPLIT.split(chunk):
            if piece:
                tokens.extend(_tokenize_piece(piece))
    return " ".join(token for token in tokens if token not in PTB_PUNCTUATION)


def _tokenize_piece(piece: str) -> list[str]:
    if piece in _SINGLE:
        return [_SINGLE[piece]]
    head: list[str] = []
    while len(piece) > 1 and piece[0] in _OPENERS:
        # "'90s", a bare clitic ("'s") and "'twas" keep their apostrophe; "-5" is a number.
        if piece[0] == "'" and (piece[1].isdigit() or piece in _CLITICS or piece in _SPLIT_WORDS):
            break
        if piece[0] == "-" and not piece[1].isalpha():
            break
        head.append(_OPENERS[piece[0]])
        piece = piece[1:]
    tail: list[str] = []
    while len(piece) > 1:
        if piece.endswith("..."):
            tail.append("...")
            piece = piece[:-3]
        elif piece[-1] in "!?":
            run = len(piece) - len(piece.rstrip("!?"))
            tail.append(piece[-run:])
            piece = piece[:-run]
        elif piece[-1] in _CLOSERS:
            tail.append(_CLOSERS[piece[-1]])
            piece = piece[:-1]
        elif piece[-1] == "." and not _keeps_period(piece):
            tail.append(".")
            piece = piece[:-1]
        else:
            break
    middle: list[str] = []
    if piece in _SPLIT_WORDS:
        middle.extend(_SPLIT_WORDS[piece])
    elif piece in _SINGLE:
        middle.append(_SINGLE[piece])
    else:
        clitics: list[str] = []
        while (match := _CLITIC.match(piece)) is not None:
            piece = match.group(1)
            clitics.insert(0, match.group(2))
        middle.append(piece)
        middle.extend(clitics)
    return head + middle + tail[::-1]


def _keeps_period(word: str) -> bool:
    return word[:-1] in _ABBREVIATIONS or _ACRONYM.match(word) is not None


# ---------------------------------------------------------------------------------------------
# Document frequencies


def _ngram_counts(tokens: Sequence[str], n: int = CIDER_N) -> Counter[tuple[str, ...]]:
    counts: Counter[tuple[str, ...]] = Counter()
    for k in range(1, n + 1):
        for start in range(len(tokens) - k + 1):
            counts[tuple(tokens[start : start + k])] += 1
    return counts


@dataclass(frozen=True)
class CiderDStats:
    """Corpus statistics CIDEr-D needs: n-gram document frequencies and the corpus size.

    Attributes:
        document_frequency: for each n-gram (tuple of PTB tokens, n = 1..4), the number of images
            whose references contain it at least once.
        num_documents: number of images (reference sets) in the corpus.
    """

    document_frequency: Mapping[tuple[str, ...], int]
    num_documents: int

    def __post_init__(self) -> None:
        if self.num_documents < 1:
            raise ValueError(f"num_documents must be >= 1, got {self.num_documents}")

    @property
    def log_num_documents(self) -> float:
        return math.log(float(self.num_documents))

    def save(self, path: str | Path) -> None:
        """Write the table as JSON, gzipped when `path` ends in ".gz" (never pickle)."""
        payload = {
            "format": FORMAT_NAME,
            "version": FORMAT_VERSION,
            "n": CIDER_N,
            "tokenizer": "ptb (pycocoevalcap post-processing)",
            "num_documents": self.num_documents,
            "log_num_documents": self.log_num_documents,
            # n-gram tokens never contain spaces, so a space-joined string is a lossless key;
            # sorted so that the file is reproducible byte for byte.
            "document_frequency": {" ".join(ngram): count for ngram, count in sorted(self.document_frequency.items())},
        }
        text = json.dumps(payload, separators=(",", ":"), sort_keys=True)
        path = Path(path)
        if path.suffix == ".gz":
            # No file name and mtime=0 in the gzip header keep the shipped asset reproducible.
            with open(path, "wb") as raw, gzip.GzipFile(filename="", fileobj=raw, mode="wb", mtime=0) as handle:
                handle.write(text.encode("utf-8"))
        else:
            path.write_text(text, encoding="utf-8")

    @classmethod
    def load(cls, path: str | Path) -> "CiderDStats":
        """Read a table written by `save`."""
        path = Path(path)
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rt", encoding="utf-8") as handle:
            payload = json.load(handle)
        if payload.get("format") != FORMAT_NAME or payload.get("version") != FORMAT_VERSION:
            raise ValueError(
                f"{path} is not a {FORMAT_NAME} v{FORMAT_VERSION} file "
                f"(format={payload.get('format')!r}, version={payload.get('version')!r})"
            )
        if payload.get("n") != CIDER_N:
            raise ValueError(f"{path} holds {payload.get('n')}-gram statistics, expected {CIDER_N}")
        frequency = {tuple(key.split(" ")): int(count) for key, count in payload["document_frequency"].items()}
        return cls(document_frequency=frequency, num_documents=int(payload["num_documents"]))


def build_cider_df(reference_sets: Iterable[Sequence[str]]) -> CiderDStats:
    """Document frequencies from raw reference captions, one sequence of captions per image."""
    frequency: Counter[tuple[str, ...]] = Counter()
    num_documents = 0
    for references in reference_sets:
        if isinstance(references, str):
            raise TypeError("each element of reference_sets must be a sequence of captions, got a str")
        ngrams: set[tuple[str, ...]] = set()
        for reference in references:
            ngrams.update(_ngram_counts(ptb_tokenize(reference).split()))
        frequency.update(ngrams)
        num_documents += 1
    if num_documents == 0:
        raise ValueError("reference_sets is empty: document frequencies need at least one image")
    return CiderDStats(document_frequency=dict(frequency), num_documents=num_documents)


# ---------------------------------------------------------------------------------------------
# Scoring


class CiderD:
    """Scores single captions with CIDEr-D under fixed document frequencies.

    >>> stats = build_cider_df([["a red circle", "a red disk"], ["two blue squares"]])
    >>> CiderD(stats).score("a red circle", ["a red circle", "a red disk"]) > 0
    True
    """

    def __init__(self, stats: CiderDStats, sigma: float = CIDER_SIGMA):
        self.stats = stats
        self.sigma = sigma

    def _vectors(self, tokens: Sequence[str]) -> tuple[list[dict], list[float], int]:
        vectors: list[dict[tuple[str, ...], float]] = [{} for _ in range(CIDER_N)]
        norms = [0.0] * CIDER_N
        bigram_count = 0
        log_documents = self.stats.log_num_documents
        for ngram, term_frequency in _ngram_counts(tokens).items():
            order = len(ngram) - 1
            # Unseen n-grams get df 1 (idf = log N), as in the reference implementation.
            document_frequency = max(1.0, float(self.stats.document_frequency.get(ngram, 0)))
            weight = float(term_frequency) * (log_documents - math.log(document_frequency))
            vectors[order][ngram] = weight
            norms[order] += weight * weight
            if order == 1:
                # The reference code measures caption length in bigrams (its `n == 1` is 0-based);
                # replicated because the length penalty depends on it.
                bigram_count += term_frequency
        return vectors, [math.sqrt(norm) for norm in norms], bigram_count

    def score(self, caption: str, references: Sequence[str]) -> float:
        """CIDEr-D (0..10) of `caption` against its `references`, both raw text."""
        if not references or isinstance(references, str):
            raise ValueError("references must be a non-empty sequence of captions")
        vector, norm, length = self._vectors(ptb_tokenize(caption).split())
        total = [0.0] * CIDER_N
        for reference in references:
            ref_vector, ref_norm, ref_length = self._vectors(ptb_tokenize(reference).split())
            # math.e ** x rather than math.exp(x): the reference computes it so, and the two may
            # differ in the last bit.
            penalty = math.e ** (-((length - ref_length) ** 2) / (2 * self.sigma**2))
            for order in range(CIDER_N):
                # Clipping the candidate's weight at the reference's is the "-D": repeating a
                # matching n-gram does not raise the score.
                dot = sum(
                    min(weight, ref_vector[order].get(ngram, 0.0)) * ref_vector[order].get(ngram, 0.0)
                    for ngram, weight in vector[order].items()
                )
                if norm[order] != 0 and ref_norm[order] != 0:
                    dot /= norm[order] * ref_norm[order]
                total[order] += dot * penalty
        # Same operation order as the reference (mean over n, / #refs, * 10) for identical floats.
        return (sum(total) / CIDER_N) / len(references) * 10.0

    def reward(self, caption: str, references: Sequence[str]) -> float:
        """The caption reward in [0, 1]: clip(CIDEr-D / CIDER_REWARD_SCALE, 0, 1)."""
        return cider_reward(self.score(caption, references))


def cider_reward(cider_d: float) -> float:
    """Map a CIDEr-D value to [0, 1] (the scale is justified at CIDER_REWARD_SCALE)."""
    return min(1.0, max(0.0, cider_d / CIDER_REWARD_SCALE))


# ---------------------------------------------------------------------------------------------
# Registry of DF tables

_REGISTRY: dict[str, CiderDStats] = {}


def set_cider_df(stats: CiderDStats, key: str = DEFAULT_KEY) -> None:
    """Register the DF table that samples with `cider_df_key(sample) == key` are scored with."""
    if not isinstance(stats, CiderDStats):
        raise TypeError(f"stats must be a CiderDStats (see build_cider_df), got {type(stats).__name__}")
    _REGISTRY[key] = stats


def get_cider_df(key: str = DEFAULT_KEY) -> CiderDStats:
    """The DF table registered under `key`; "procedural" falls back to the shipped asset."""
    if key in _REGISTRY:
        return _REGISTRY[key]
    if key == PROCEDURAL_KEY:
        if not PROCEDURAL_ASSET.exists():
            raise FileNotFoundError(
                f"CIDEr-D document frequencies for procedural captions are missing: {PROCEDURAL_ASSET} "
                "does not exist. Build it with `python scripts/build_cider_df.py`."
            )
        _REGISTRY[key] = CiderDStats.load(PROCEDURAL_ASSET)
        return _REGISTRY[key]
    raise LookupError(
        f"no CIDEr-D document frequencies registered under key {key!r} (registered: {sorted(_REGISTRY)}). "
        "Build them from the reference captions of the corpus you score and register them, e.g. "
        f"set_cider_df(build_cider_df([s.answers for s in samples]), key={key!r})"
    )


def cider_df_key(request_id: str) -> str:
    """Which registry key scores a caption request: "procedural" or "default"."""
    return PROCEDURAL_KEY if "/procedural/" in request_id else DEFAULT_KEY
