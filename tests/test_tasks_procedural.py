"""Tests of the procedural task source: validity, determinism, split disjointness, vocabularies,
multiple-choice conventions, difficulty spread and argument validation. Throughput is printed
(run with -s to see it), never asserted: it depends on the machine."""
from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
import time
from functools import lru_cache

import numpy as np
import pytest

import flexvlm_env
from flexvlm_env.tasks import FAMILIES, Sample, load_samples
from flexvlm_env.tasks.procedural import (
    MC_INSTRUCTION,
    MC_LETTERS,
    MULTIPLE_CHOICE_FAMILIES,
    answer_vocabulary,
    generate_sample,
    generate_samples,
)
from flexvlm_env.tasks.procedural.layout import IMAGE_SIZES_PX
from flexvlm_env.tasks.procedural.vocab import SCENE_WORDS

VQA_FAMILIES = ("coco_2014_vqa", "okvqa", "text_vqa")
SAMPLES_PER_FAMILY = 60
REPO_ROOT = os.path.dirname(os.path.dirname(flexvlm_env.__file__))


def _path_env() -> dict[str, str]:
    """A minimal environment for subprocesses that import this checkout of flexvlm_env."""
    return {"PATH": os.environ.get("PATH", ""), "PYTHONPATH": REPO_ROOT}


@lru_cache(maxsize=None)
def samples(family: str, split: str = "val", n: int = SAMPLES_PER_FAMILY, seed: int = 0) -> tuple[Sample, ...]:
    return tuple(generate_samples(family, split=split, n=n, seed=seed))


def image_digest(sample: Sample) -> str:
    return hashlib.sha256(sample.image.tobytes() + repr(sample.image.size).encode()).hexdigest()


@pytest.mark.parametrize("family", FAMILIES)
def test_samples_are_valid(family):
    spec = FAMILIES[family]
    for index, sample in enumerate(samples(family)):
        assert isinstance(sample, Sample)
        assert sample.request_id == f"{family}/procedural/val/{index}"
        assert (sample.family, sample.metric, sample.max_new_tokens) == (family, spec.metric, spec.max_new_tokens)
        assert sample.image.mode == "RGB" and sample.image.size in IMAGE_SIZES_PX
        question = sample.prompt.splitlines()[0]
        assert 3 <= len(question.split()) <= 20, sample.prompt
        assert sample.answers and all(isinstance(a, str) and a.strip() for a in sample.answers)
        difficulty = dict(sample.difficulty)
        assert difficulty["image_width_px"] == sample.image.width and difficulty["image_height_px"] == sample.image.height
        assert len(difficulty) >= 4


@pytest.mark.parametrize("family", FAMILIES)
def test_answers_in_closed_vocabulary(family):
    vocabulary = answer_vocabulary(family)
    assert len(vocabulary) == len(set(vocabulary)) > 1
    known = set(vocabulary)
    for sample in samples(family):
        for answer in sample.answers:
            if family == "coco_caption":
                assert set(re.findall(r"[a-z]+", answer.lower())) <= known, answer
            else:
                assert answer in known, (sample.request_id, answer)
                if family not in MULTIPLE_CHOICE_FAMILIES:
                    assert answer == answer.lower(), "non-MC references are lower case"


def test_reference_formats():
    for family in VQA_FAMILIES:
        for sample in samples(family):
            assert len(sample.answers) == 10
            assert max(sample.answers.count(a) for a in set(sample.answers)) >= 7, "most annotators agree"
    for sample in samples("coco_caption"):
        assert 5 <= len(sample.answers) == len(set(sample.answers))
        assert all(caption.endswith(".") and caption[0].isupper() for caption in sample.answers)
    for family in ("tally_qa", "doc_qa", "st_qa"):
        assert all(len(sample.answers) == 1 for sample in samples(family))
    assert all(0 <= int(sample.answers[0]) <= 12 for sample in samples("tally_qa"))
    assert any(len(set(sample.answers)) > 1 for sample in samples("coco_2014_vqa")), "some annotator variants"


@pytest.mark.parametrize("family", FAMILIES)
def test_multiple_choice_convention(family):
    for sample in samples(family):
        if family not in MULTIPLE_CHOICE_FAMILIES:
            assert sample.options is None
            continue
        options = sample.options
        assert 2 <= len(options) <= 5 and len(set(options)) == len(options)
        assert len(sample.answers) == 1 and sample.answers[0] in MC_LETTERS[: len(options)]
        lines = sample.prompt.splitlines()
        assert lines[1:-1] == [f"{MC_LETTERS[i]}. {option}" for i, option in enumerate(options)]
        assert lines[-1] == MC_INSTRUCTION


def test_multiple_choice_letters_are_spread():
    for family in MULTIPLE_CHOICE_FAMILIES:
        letters = {sample.answers[0] for sample in samples(family)}
        assert {"A", "B", "C"} <= letters, (family, letters)


@pytest.mark.parametrize("family", FAMILIES)
def test_deterministic_per_seed_split_index(family):
    first = generate_sample(family, "train", 7, seed=3)
    again = generate_sample(family, "train", 7, seed=3)
    assert first.image.tobytes() == again.image.tobytes()
    for attribute in ("prompt", "answers", "options", "request_id"):
        assert getattr(first, attribute) == getattr(again, attribute)
    assert dict(first.difficulty) == dict(again.difficulty)
    assert image_digest(generate_sample(family, "train", 7, seed=4)) != image_digest(first)
    assert image_digest(generate_sample(family, "train", 8, seed=3)) != image_digest(first)
    # generate_samples is the same function of the index, whatever the batch it comes in.
    assert image_digest(generate_samples(family, "train", n=2, seed=3, start_index=6)[1]) == image_digest(first)


def test_splits_never_collide():
    # Prompts repeat by design (templates); images must not, within or across splits.
    seen: dict[str, str] = {}
    for family in FAMILIES:
        for split in ("train", "val", "test"):
            for sample in samples(family, split, n=40):
                first = seen.setdefault(image_digest(sample), sample.request_id)
                assert first == sample.request_id, f"{sample.request_id} repeats the image of {first}"
    assert len(seen) == len(FAMILIES) * 3 * 40


def test_independent_of_python_hash_seed():
    code = (
        "import hashlib; from flexvlm_env.tasks.procedural import generate_sample; "
        "s = generate_sample('st_qa', 'test', 11, seed=5); "
        "print(hashlib.sha256(s.image.tobytes()).hexdigest(), s.prompt)"
    )
    outputs = set()
    for hash_seed in ("1", "2"):
        env = {"PYTHONHASHSEED": hash_seed, **_path_env()}
        outputs.add(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env).stdout)
    local = generate_sample("st_qa", "test", 11, seed=5)
    assert outputs == {f"{hashlib.sha256(local.image.tobytes()).hexdigest()} {local.prompt}\n"}


def test_difficulty_spreads_from_global_view_to_many_crops():
    def values(family, key, n=SAMPLES_PER_FAMILY):
        return [sample.difficulty[key] for sample in samples(family, n=n)]

    assert min(values("tally_qa", "object_size_px")) <= 10 and max(values("tally_qa", "object_size_px")) >= 25
    assert min(values("coco_2014_vqa", "target_size_px")) <= 16 and max(values("coco_2014_vqa", "target_size_px")) >= 60
    for family, key in (("text_vqa", "font_size_px"), ("st_qa", "font_size_px"), ("doc_qa", "font_size_px")):
        assert min(values(family, key)) <= 10 and max(values(family, key)) >= 15, family
    assert max(abs(r) for r in values("st_qa", "rotation_deg")) >= 30
    assert len({(s.image.width, s.image.height) for f in FAMILIES for s in samples(f)}) == len(IMAGE_SIZES_PX)
    # Reading and counting are harder on average than attribute questions.
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    assert mean(values("tally_qa", "object_size_px")) < mean(values("coco_2014_vqa", "target_size_px"))


def test_vocabularies():
    assert len(SCENE_WORDS) == len(set(SCENE_WORDS)) >= 250
    assert answer_vocabulary("tally_qa") == [str(count) for count in range(13)]
    assert answer_vocabulary("mmmu") == answer_vocabulary("science_qa_img") == list(MC_LETTERS)
    assert {"gray", "grey"} <= set(answer_vocabulary("coco_2014_vqa"))


@pytest.mark.parametrize(
    "call, argument",
    [
        (lambda: generate_samples("no_such_family", "val", n=1), "family"),
        (lambda: generate_samples("okvqa", "validation", n=1), "split"),
        (lambda: generate_samples("okvqa", "val", n=-1), "n"),
        (lambda: generate_samples("okvqa", "val", n=None), "n"),
        (lambda: generate_samples("okvqa", "val", n=True), "n"),
        (lambda: generate_samples("okvqa", "val", n=1, seed=1.5), "seed"),
        (lambda: generate_sample("okvqa", "val", -3), "index"),
        (lambda: answer_vocabulary("nope"), "family"),
        (lambda: load_samples("nope", n=1), "family"),
        (lambda: load_samples("okvqa", split="dev", n=1), "split"),
        (lambda: load_samples("okvqa", n=-2), "n"),
        (lambda: load_samples("okvqa", n=None), "n"),
    ],
)
def test_bad_arguments_raise_value_error_naming_them(call, argument):
    with pytest.raises(ValueError, match=rf"\b{argument}="):
        call()


def test_load_samples_takes_a_numpy_count():
    assert [s.request_id for s in load_samples("tally_qa", "procedural", "val", n=np.int64(2), seed=0)] == \
        [s.request_id for s in load_samples("tally_qa", "procedural", "val", n=2, seed=0)]
    with pytest.raises(ValueError, match="n=True"):
        load_samples("tally_qa", "procedural", "val", n=True, seed=0)


def test_load_samples_uses_procedural_source():
    loaded = load_samples("doc_qa", source="procedural", split="test", n=3, seed=2)
    direct = generate_samples("doc_qa", split="test", n=3, seed=2)
    assert [s.request_id for s in loaded] == ["doc_qa/procedural/test/0", "doc_qa/procedural/test/1", "doc_qa/procedural/test/2"]
    assert [image_digest(s) for s in loaded] == [image_digest(s) for s in direct]
    assert load_samples("doc_qa", n=0) == []


def test_throughput_printed_not_asserted():
    rates = {}
    for family in FAMILIES:
        start = time.perf_counter()
        generate_samples(family, "train", n=40, seed=99)
        rates[family] = 40 / (time.perf_counter() - start)
    print("\nprocedural samples/s (one process):", {family: round(rate) for family, rate in rates.items()})


@pytest.mark.parametrize(
    "script, arguments",
    [
        ("make_gallery.py", ["--per-family", "1", "--split", "test", "--out"]),
        ("bench_tasks.py", ["--samples", "3", "--repeats", "1", "--warmup", "1", "--no-pin-core", "--out"]),
    ],
)
def test_scripts_smoke(tmp_path, script, arguments):
    out = tmp_path / ("gallery.png" if script.endswith("gallery.py") else "bench.json")
    command = [sys.executable, os.path.join(REPO_ROOT, "scripts", script), *arguments, str(out)]
    subprocess.run(command, check=True, env=_path_env(), capture_output=True)
    assert out.stat().st_size > 0
