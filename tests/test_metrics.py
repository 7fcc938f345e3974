"""Tests of flexvlm_env.metrics: hand-checked cases of each metric's official rules, per-sample
CIDEr-D against pycocoevalcap, the Python PTB tokenizer against the Java one, and the dispatch."""
from __future__ import annotations

import math
import shutil

import pytest
from PIL import Image

from flexvlm_env.metrics import (
    CIDER_REWARD_SCALE,
    METRICS,
    CiderD,
    CiderDStats,
    anls,
    build_cider_df,
    corpus_scores,
    exact_match,
    extract_answer,
    get_cider_df,
    mc_accuracy,
    normalize_vqa_answer,
    parse_choice,
    parse_multi_choice_response,
    parse_open_response,
    ptb_tokenize,
    score,
    set_cider_df,
    vqa_accuracy,
)
from flexvlm_env.metrics import caption as caption_module
from flexvlm_env.metrics.mmmu import mmmu_score
from flexvlm_env.tasks.sample import Sample

requires_java = pytest.mark.skipif(shutil.which("java") is None, reason="needs Java (pycocoevalcap's Java tools)")

_IMAGE = Image.new("RGB", (4, 4))


def make_sample(metric: str, answers, options=None, request_id: str = "test/hub/val/0") -> Sample:
    return Sample(request_id, _IMAGE, "question?", tuple(answers), "test", metric, 16, tuple(options) if options else None)


@pytest.fixture
def cider_registry(monkeypatch):
    """Isolate tests from each other's (and the session's) registered DF tables."""
    monkeypatch.setattr(caption_module, "_REGISTRY", {})
    return caption_module._REGISTRY


# ---------------------------------------------------------------------------------------------
# Answer extraction


@pytest.mark.parametrize(
    "generation, expected",
    [
        ("  yes \n", "yes"),
        ("Answer: B", "B"),
        ("The answer is Two.", "Two"),
        ("the answer is: 3.5.", "3.5"),
        ("Final answer - 42", "42"),
        ("Let me count.\nThere are three.\n\nThe answer is 3.\n", "3"),
        ("**Answer:** B", "B"),
        ("*two*", "two"),
        ("answer key on a desk", "answer key on a desk"),  # a real word, not a prefix
        ("The answer is", ""),
        ("", ""),
        ("\n \n", ""),
        # Long answers keep their period; short ones lose it.
        ("A man riding a wave on top of a surfboard.", "A man riding a wave on top of a surfboard."),
        ("A red circle.", "A red circle"),
        ("etc...", "etc..."),
    ],
)
def test_extract_answer(generation, expected):
    assert extract_answer(generation) == expected


# ---------------------------------------------------------------------------------------------
# VQA accuracy


@pytest.mark.parametrize(
    "raw, normalized",
    [
        ("Two", "2"),
        ("none", "0"),
        ("ten", "10"),
        ("the dog.", "dog"),
        ("A Dog", "dog"),
        ("an apple", "apple"),
        ("yes!", "yes"),
        ("yes?", "yes"),
        ("dont", "don't"),
        ("isnt", "isn't"),
        ("it isnt", "it isn't"),
        ("1,000", "1000"),  # digit-comma-digit: punctuation deleted, not spaced
        ("yes,no", "yes no"),  # comma touching no space: replaced by a space
        ("red, white", "red white"),  # comma touching a space: deleted
        ("3.5", "3.5"),  # a period followed by a digit stays
        ("1.", "1"),
        ("(left)", "left"),
        ("well-lit", "well lit"),
        ("10:30", "10:30"),  # the colon is not in the official punctuation list
        ("dog's", "dog's"),
        ("  Two\tdogs\n", "2 dogs"),
    ],
)
def test_vqa_normalization(raw, normalized):
    assert normalize_vqa_answer(raw) == normalized


@pytest.mark.parametrize("matches", range(11))
def test_vqa_accuracy_ten_answers(matches):
    answers = ["2"] * matches + ["3"] * (10 - matches)
    # Average over the ten leave-one-out subsets: the 10-m non-matching annotators leave m matches,
    # the m matching ones leave m-1.
    expected = ((10 - matches) * min(1, matches / 3) + matches * min(1, (matches - 1) / 3)) / 10
    assert vqa_accuracy("two", answers) == pytest.approx(expected, abs=1e-12)


def test_vqa_accuracy_hand_values():
    ten = lambda m: ["yes"] * m + ["no"] * (10 - m)  # noqa: E731
    assert vqa_accuracy("yes", ten(0)) == 0.0
    assert vqa_accuracy("yes", ten(1)) == pytest.approx(0.3)
    assert vqa_accuracy("yes", ten(2)) == pytest.approx(0.6)
    assert vqa_accuracy("Yes!", ten(3)) == pytest.approx(0.9)
    assert vqa_accuracy("yes", ten(4)) == pytest.approx(1.0)
    # Fewer annotators: same leave-one-out rule. 3 answers, 1 match: (0 + 1/3 + 1/3) / 3.
    assert vqa_accuracy("cat", ["cat", "dog", "bird"]) == pytest.approx(2 / 9)
    # One reference: exact match after normalisation.
    assert vqa_accuracy("The Dog.", ["dog"]) == 1.0
    assert vqa_accuracy("cat", ["dog"]) == 0.0


# ---------------------------------------------------------------------------------------------
# Exact match and ANLS


def test_exact_match():
    assert exact_match("Three", ["3"]) == 1.0
    assert exact_match(" 3. ", ["three"]) == 1.0
    assert exact_match("twelve", ["12"]) == 1.0
    assert exact_match("none", ["0"]) == 1.0
    assert exact_match("3 dogs", ["3"]) == 0.0
    assert exact_match("4", ["3", "4"]) == 1.0


@pytest.mark.parametrize(
    "prediction, answers, expected",
    [
        ("hello", ["hello"], 1.0),
        ("hallo", ["hello"], 0.8),  # one substitution in five characters
        ("Hello   World ", ["hello world"], 1.0),  # case and whitespace do not count
        ("abc", ["xyz"], 0.0),
        ("ab", ["ac"], 0.0),  # distance exactly 0.5 is not below the threshold
        ("abcd", ["abce"], 0.75),
        ("", ["hello"], 0.0),
        ("", [""], 1.0),
        ("hallo", ["xyz", "hello"], 0.8),  # best reference
        ("$12.50", ["$12.5"], 1 - 1 / 6),
    ],
)
def test_anls(prediction, answers, expected):
    assert anls(prediction, answers) == pytest.approx(expected)


# ---------------------------------------------------------------------------------------------
# Multiple choice (ScienceQA) and MMMU

OPTIONS = ("cat", "dog", "bird")


@pytest.mark.parametrize(
    "prediction, letter",
    [
        ("B", "B"),
        ("b", "B"),
        ("(B)", "B"),
        ("B.", "B"),
        ("B)", "B"),
        ("B) dog", "B"),
        ("(b) dog", "B"),
        ("B. dog", "B"),
        ("B: dog", "B"),
        ("B dog", "B"),
        ("Option B", "B"),
        ("dog", "B"),
        ("Dog.", "B"),
        ("It is a dog", "B"),
        ("A dog", "B"),  # the article, not option A
        ("I pick (C) here", "C"),
        ("cat or dog", None),  # hedging is unparsed
        ("(A) or (B)", None),
        ("fish", None),
        ("D", None),  # out of range
    ],
)
def test_parse_choice(prediction, letter):
    assert parse_choice(prediction, OPTIONS) == letter


def test_parse_choice_prefers_longest_containing_option():
    assert parse_choice("it is dark red", ("red", "dark red", "blue")) == "B"


def test_mc_accuracy_through_score():
    sample = make_sample("mc_accuracy", ["B"], OPTIONS)
    for generation in ("B", "Answer: B", "The answer is B) dog", "Let me think.\nThe answer is (B).", "dog"):
        assert score(sample, generation) == 1.0, generation
    assert score(sample, "A") == 0.0
    # Real datasets may give the option text as the reference.
    assert score(make_sample("mc_accuracy", ["dog"], OPTIONS), "B") == 1.0
    with pytest.raises(ValueError, match="neither a letter"):
        mc_accuracy("B", "Z", OPTIONS)
    with pytest.raises(ValueError, match="no options"):
        score(make_sample("mc_accuracy", ["B"]), "B")


MMMU_OPTIONS = ("London", "Paris", "Rome", "Berlin")


@pytest.mark.parametrize(
    "response, letter",
    [
        ("(B)", "B"),
        ("B", "B"),
        ("B.", "B"),
        ("B. Paris", "B"),  # the " X." rule
        ("I think the answer is C because", "C"),
        ("(A) is wrong, the answer is (C)", "C"),  # brackets first, the last mentioned wins
        ("A or maybe D", "D"),
        ("The capital of France is clearly Paris of course", "B"),  # > 5 words: option text
        ("Paris", None),  # <= 5 words: option text is not tried
        ("no idea", None),  # the official code guesses at random; here it is unparsed
    ],
)
def test_mmmu_multiple_choice(response, letter):
    assert parse_multi_choice_response(response, MMMU_OPTIONS) == letter


def test_mmmu_open():
    assert parse_open_response("5") == [5.0]
    assert 3.14 in parse_open_response("so the result is 3.14159")
    assert 1000.0 in parse_open_response("x = 1,000")
    assert mmmu_score("The answer is 3.14159", ["3.14"], None) == 1.0
    assert mmmu_score("x = 1,000", ["1000"], None) == 1.0
    assert mmmu_score("so it is photosynthesis", ["Photosynthesis"], None) == 1.0
    assert mmmu_score("it is respiration", ["photosynthesis"], None) == 0.0
    assert mmmu_score("2.5", ["2.50", "5/2"], None) == 1.0
    # Numbers are compared as floats rounded to 2 places, not as substrings.
    assert mmmu_score("12", ["1"], None) == 0.0


def test_a_reference_ending_in_a_period_equals_the_answer_that_repeats_it():
    """The answer extractor drops a short answer's final period; ANLS and MMMU's open questions compare characters,
    so the references go through the same rule (the official ANLS gives 1.0 for an exact repeat)."""
    for prediction in ("Acme Inc.", "Acme Inc", "The answer is Acme Inc."):
        assert score(make_sample("anls", ["Acme Inc."]), prediction) == 1.0
    assert score(make_sample("anls", ["No."]), "No.") == 1.0
    assert score(make_sample("mmmu", ["U.S."]), "U.S.") == 1.0
    assert score(make_sample("anls", ["Acme Inc."]), "Acme Ltd") < 1.0


@pytest.mark.parametrize("metric", [vqa_accuracy, exact_match, anls, lambda p, a: mmmu_score(p, a, None)])
def test_a_bare_string_of_references_is_refused(metric):
    with pytest.raises(ValueError, match=r"answers='yes' is a string; pass a sequence of reference answers, e.g. \['yes'\]"):
        metric("yes", "yes")
    with pytest.raises(ValueError, match="at least one reference"):
        metric("yes", [])
    with pytest.raises(ValueError, match=r"answers='13' must be a tuple of strings, e.g. \('13',\)"):
        Sample("x/local/val/0", Image.new("RGB", (8, 8)), "q", "13", "tally_qa", "exact_match", 8)


def test_mmmu_through_score():
    assert score(make_sample("mmmu", ["B"], MMMU_OPTIONS), "Answer: (B) Paris") == 1.0
    assert score(make_sample("mmmu", ["B"], MMMU_OPTIONS), "Answer: C") == 0.0
    assert score(make_sample("mmmu", ["42"]), "The answer is 42.") == 1.0


# ---------------------------------------------------------------------------------------------
# Captions: PTB tokenisation and per-sample CIDEr-D

CAPTION_REFERENCES = [
    [
        "A man riding a wave on top of a surfboard.",
        "A surfer rides a large wave in the ocean.",
        "A person on a surfboard riding a wave.",
        "Man surfing on a big wave.",
        "A surfer in a wetsuit catches a wave!",
    ],
    [
        "Two dogs playing in the grass.",
        "Two dogs run across a grassy field.",
        "A pair of dogs play together on the lawn.",
        "Dogs playing with a ball in a park.",
        "Two brown dogs in a green field.",
    ],
    [
        "A red circle and a blue square on a white background.",
        "A picture of a red circle and a blue square.",
        "There is a red circle and a blue square in the image.",
        "A simple drawing showing a blue square and a red circle.",
        "Some colorful shapes including a red circle and a blue square.",
    ],
    [
        "A plate of food with broccoli and rice.",
        "A dish of rice with broccoli on the side.",
        "Broccoli and rice on a white plate.",
        "A meal with vegetables (broccoli) and rice.",
        "Food on a plate, including broccoli; it's healthy.",
    ],
    [
        "Three shapes: two small green triangles and a yellow star.",
        "A drawing of two green triangles and a yellow star.",
        "The kids' toys aren't on the table -- they're in a box.",
        "A \"stop\" sign at 10:30 a.m. near St. Louis.",
        "A 2-year-old boy in a t-shirt can't reach the $5 toy...",
    ],
]
CAPTION_PREDICTIONS = [
    "A man riding a wave on top of a surfboard.",
    "Two dogs play on the grass.",
    "A red circle, a blue square.",
    "A cat sleeping on a couch.",
    "Two green triangles and a star.",
]


@requires_java
def test_ptb_tokenize_matches_java_tokenizer():
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    captions = [c for refs in CAPTION_REFERENCES for c in refs] + CAPTION_PREDICTIONS + [
        "Is it 50% off? Yes!! Really?!",
        "Mr. Smith's dog, Rex, won't sit.",
        "the end (finally).",
        "'Hello' said the man's wife, who'd've known.",
        "A dog.. A cat.",
        "Cannot, gonna, y'all, ain't.",
        "red,white and blue;green",
        "at&t and a+b=c",
        "Dogs' bones, -ish items, word- breaks",
    ]
    java = PTBTokenizer().tokenize({i: [{"caption": c}] for i, c in enumerate(captions)})
    for i, caption in enumerate(captions):
        assert ptb_tokenize(caption) == java[i][0], caption


def test_ptb_tokenize_examples():
    assert ptb_tokenize("A man's T-shirt (white), isn't it?") == "a man 's t-shirt -lrb- white -rrb- is n't it"
    assert ptb_tokenize('He said "stop".') == "he said stop"


def test_per_sample_cider_equals_pycocoevalcap_per_image():
    from pycocoevalcap.cider.cider import Cider

    gts = {i: [ptb_tokenize(r) for r in refs] for i, refs in enumerate(CAPTION_REFERENCES)}
    res = {i: [ptb_tokenize(p)] for i, p in enumerate(CAPTION_PREDICTIONS)}
    corpus_mean, per_image = Cider().compute_score(gts, res)
    scorer = CiderD(build_cider_df(CAPTION_REFERENCES))
    mine = [scorer.score(p, refs) for p, refs in zip(CAPTION_PREDICTIONS, CAPTION_REFERENCES)]
    assert mine == pytest.approx(list(per_image), rel=1e-12, abs=1e-12)
    assert sum(mine) / len(mine) == pytest.approx(corpus_mean, rel=1e-12)


def test_cider_reward_ordering_and_range():
    scorer = CiderD(build_cider_df(CAPTION_REFERENCES))
    refs = CAPTION_REFERENCES[1]
    identical = scorer.reward(refs[0], refs)
    paraphrase = scorer.reward("Two dogs are playing on a grass field.", refs)
    unrelated = scorer.reward("A plate of rice with broccoli.", refs)
    assert 1.0 >= identical > paraphrase > unrelated >= 0.0
    assert identical > 0.8  # copying a reference is (close to) full marks
    assert scorer.reward("", refs) == 0.0
    assert identical == min(1.0, scorer.score(refs[0], refs) / CIDER_REWARD_SCALE)


def test_cider_df_json_round_trip(tmp_path):
    stats = build_cider_df(CAPTION_REFERENCES)
    for name in ("df.json", "df.json.gz"):
        stats.save(tmp_path / name)
        loaded = CiderDStats.load(tmp_path / name)
        assert loaded.num_documents == stats.num_documents
        assert dict(loaded.document_frequency) == dict(stats.document_frequency)
        assert loaded.log_num_documents == pytest.approx(math.log(len(CAPTION_REFERENCES)))
    # Reproducible bytes: the shipped asset must not change when rebuilt.
    stats.save(tmp_path / "again.json.gz")
    assert (tmp_path / "again.json.gz").read_bytes() == (tmp_path / "df.json.gz").read_bytes()
    (tmp_path / "bad.json").write_text('{"format": "something else"}')
    with pytest.raises(ValueError, match="flexvlm-cider-df"):
        CiderDStats.load(tmp_path / "bad.json")


def test_build_cider_df_validates():
    with pytest.raises(TypeError, match="sequence of captions"):
        build_cider_df(["a caption"])
    with pytest.raises(ValueError, match="empty"):
        build_cider_df([])


def test_cider_score_uses_registered_df(cider_registry):
    samples = [make_sample("cider", refs, request_id=f"coco_caption/hub/val/{i}") for i, refs in enumerate(CAPTION_REFERENCES)]
    with pytest.raises(LookupError, match="set_cider_df"):
        score(samples[0], "a surfer")
    set_cider_df(build_cider_df([s.answers for s in samples]))
    assert get_cider_df() is cider_registry["default"]
    scorer = CiderD(cider_registry["default"])
    for sample, prediction in zip(samples, CAPTION_PREDICTIONS):
        assert score(sample, prediction) == pytest.approx(min(1.0, scorer.score(prediction, sample.answers) / CIDER_REWARD_SCALE))


def test_procedural_captions_use_shipped_df(cider_registry):
    sample = make_sample("cider", CAPTION_REFERENCES[2], request_id="coco_caption/procedural/val/0")
    if not caption_module.PROCEDURAL_ASSET.exists():
        with pytest.raises(FileNotFoundError, match="build_cider_df.py"):
            score(sample, "a red circle")
        pytest.skip(f"{caption_module.PROCEDURAL_ASSET} not built yet")
    stats = get_cider_df("procedural")
    assert stats.num_documents >= 1000
    identical = score(sample, CAPTION_REFERENCES[2][1])
    paraphrase = score(sample, "A blue square next to a red circle.")
    unrelated = score(sample, "Three yellow stars.")
    assert identical > paraphrase > unrelated


# ---------------------------------------------------------------------------------------------
# Dispatch, ranges and corpus scores


def test_unknown_metric_names_the_metric_and_the_choices():
    with pytest.raises(ValueError, match=r"'bleu'.*anls.*vqa_accuracy"):
        score(make_sample("bleu", ["x"]), "x")
    with pytest.raises(KeyError):
        METRICS["bleu"]
    with pytest.raises(ValueError, match="bleu"):
        corpus_scores([make_sample("bleu", ["x"])], ["x"])


WEIRD_GENERATIONS = ["", " ", "\n\n", "B", "(A) (B) (C)", "yes", "3.14", "ünïcödé ✓", "x" * 500, "The answer is\n", "a " * 200]


def test_every_metric_returns_a_float_in_unit_interval(cider_registry):
    set_cider_df(build_cider_df(CAPTION_REFERENCES))
    samples = [
        make_sample("vqa_accuracy", ["yes"] * 7 + ["no"] * 3),
        make_sample("exact_match", ["3"]),
        make_sample("anls", ["ACME Corp"]),
        make_sample("mc_accuracy", ["B"], OPTIONS),
        make_sample("mmmu", ["B"], MMMU_OPTIONS),
        make_sample("mmmu", ["3.14"]),
        make_sample("cider", CAPTION_REFERENCES[0]),
    ]
    assert {s.metric for s in samples} == set(METRICS)
    for sample in samples:
        for generation in WEIRD_GENERATIONS + list(sample.answers):
            value = score(sample, generation)
            assert isinstance(value, float) and 0.0 <= value <= 1.0, (sample.metric, generation, value)


def test_corpus_scores_means_per_metric():
    samples = [make_sample("vqa_accuracy", ["yes"] * 10), make_sample("vqa_accuracy", ["no"] * 10), make_sample("anls", ["hello"])]
    result = corpus_scores(samples, ["yes", "yes", "hallo"])
    assert result == {"n": 3, "n_vqa_accuracy": 2, "vqa_accuracy": 0.5, "n_anls": 1, "anls": pytest.approx(0.8)}
    with pytest.raises(ValueError, match="predictions"):
        corpus_scores(samples, ["yes"])


def test_corpus_caption_scores_need_java(monkeypatch):
    monkeypatch.setattr(shutil, "which", lambda name: None)
    samples = [make_sample("cider", refs) for refs in CAPTION_REFERENCES]
    with pytest.raises(RuntimeError, match="requires Java"):
        corpus_scores(samples, CAPTION_PREDICTIONS)


@requires_java
def test_corpus_caption_scores_match_per_sample_cider():
    samples = [make_sample("cider", refs, request_id=f"coco_caption/hub/val/{i}") for i, refs in enumerate(CAPTION_REFERENCES)]
    samples.append(make_sample("exact_match", ["3"]))
    predictions = CAPTION_PREDICTIONS + ["three"]
    result = corpus_scores(samples, predictions)
    assert set(result) == {"n", "n_cider", "bleu4", "meteor", "rouge_l", "cider_d", "n_exact_match", "exact_match"}
    assert result["n"] == 6 and result["n_cider"] == 5 and result["exact_match"] == 1.0
    for key in ("bleu4", "meteor", "rouge_l"):
        assert 0.0 < result[key] < 1.0, key
    # Corpus CIDEr-D (Java tokenizer, DF of this set) equals the mean per-sample CIDEr-D with the
    # DF built from the same references (Python tokenizer).
    scorer = CiderD(build_cider_df(CAPTION_REFERENCES))
    per_sample = [scorer.score(p, refs) for p, refs in zip(CAPTION_PREDICTIONS, CAPTION_REFERENCES)]
    assert result["cider_d"] == pytest.approx(sum(per_sample) / len(per_sample), rel=1e-9)


@pytest.mark.slow
def test_shipped_procedural_df_is_reproducible(tmp_path):
    import runpy
    import sys

    script = caption_module.PROCEDURAL_ASSET.parents[2] / "scripts" / "build_cider_df.py"
    out = tmp_path / "df.json.gz"
    argv = sys.argv
    sys.argv = [str(script), "--out", str(out)]
    try:
        runpy.run_path(str(script), run_name="__main__")
    finally:
        sys.argv = argv
    assert out.read_bytes() == caption_module.PROCEDURAL_ASSET.read_bytes()
