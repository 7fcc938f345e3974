"""Procedural task source: nine families of synthetic requests, deterministic and unlimited.

Each family (`flexvlm_env.tasks.FAMILIES`) has one generator module that exercises the family's
skill with Pillow-drawn images and a closed answer vocabulary: `attributes` (coco_2014_vqa),
`captions` (coco_caption), `counting` (tally_qa), `documents` (doc_qa), `knowledge` (okvqa),
`signs` (text_vqa), `science` (science_qa_img), `scene_text` (st_qa) and `multistep` (mmmu).
Each module provides `generate(rng) -> references.Draft` and `answer_vocabulary() -> list[str]`;
this package turns a draft into a `Sample` with the family's id, metric and token budget. A
sample is a pure function of (family, split, index, seed) (`seeding.py`), so request ids
`family/procedural/split/index` are addressable and replayable, and the splits never share a
random stream. Difficulty (object sizes, text sizes, rotation, clutter, image size) varies per
sample and is recorded in `Sample.difficulty`; docs/TASKS.md tabulates the distributions.
"""
from __future__ import annotations

from functools import lru_cache
from numbers import Integral
from types import ModuleType

from .. import SPLITS  # the package __init__ defines SPLITS before it ever imports this module
from ..families import family_spec
from ..sample import Sample
from . import attributes, captions, counting, documents, knowledge, multistep, scene_text, science, signs
from .references import MC_INSTRUCTION, MC_LETTERS
from .seeding import GENERATOR_VERSION, sample_rng

GENERATORS: dict[str, ModuleType] = {
    "coco_2014_vqa": attributes,
    "coco_caption": captions,
    "tally_qa": counting,
    "doc_qa": documents,
    "okvqa": knowledge,
    "text_vqa": signs,
    "science_qa_img": science,
    "st_qa": scene_text,
    "mmmu": multistep,
}
MULTIPLE_CHOICE_FAMILIES = ("science_qa_img", "mmmu")


def _check_int(name: str, value: object, minimum: int | None = None) -> int:
    """`value` as a Python int (NumPy integers accepted, bools refused), or a ValueError naming it."""
    if isinstance(value, bool) or not isinstance(value, Integral):
        raise ValueError(f"{name}={value!r} must be an int")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name}={value!r} must be >= {minimum}")
    return int(value)


def _check_family_split(family: str, split: str) -> None:
    family_spec(family)  # raises a ValueError naming `family` and the known families
    if family not in GENERATORS:
        raise ValueError(f"family={family!r} has no procedural generator; expected one of {sorted(GENERATORS)}")
    if split not in SPLITS:
        raise ValueError(f"split={split!r} is not valid; expected one of {SPLITS}")


def generate_sample(family: str, split: str, index: int, seed: int = 0) -> Sample:
    """Sample `index` of the procedural `family` in `split` for `seed` (any index >= 0)."""
    _check_family_split(family, split)
    index = _check_int("index", index, minimum=0)
    seed = _check_int("seed", seed)
    spec = family_spec(family)
    draft = GENERATORS[family].generate(sample_rng(family, split, index, seed))
    return Sample(
        request_id=f"{family}/procedural/{split}/{index}",
        image=draft.image,
        prompt=draft.prompt,
        answers=draft.answers,
        family=family,
        metric=spec.metric,
        max_new_tokens=spec.max_new_tokens,
        options=draft.options,
        difficulty=draft.difficulty,
    )


def generate_samples(family: str, split: str = "val", n: int | None = None, seed: int = 0, start_index: int = 0) -> list[Sample]:
    """Samples `start_index .. start_index + n - 1` of `family` in `split` for `seed`."""
    _check_family_split(family, split)
    if n is None:
        raise ValueError("n=None: the procedural source is unlimited; pass the number of samples you want")
    n = _check_int("n", n, minimum=0)
    start_index = _check_int("start_index", start_index, minimum=0)
    seed = _check_int("seed", seed)
    return [generate_sample(family, split, index, seed) for index in range(start_index, start_index + n)]


def answer_vocabulary(family: str) -> list[str]:
    """The closed set of reference answers `family` can produce (no duplicates, stable order).

    For `coco_caption` (compositional sentences) it is the set of lower-case words the reference
    captions use; for the multiple-choice families (`science_qa_img`, `mmmu`) it is the letters.
    """
    _check_family_split(family, "val")
    return list(_vocabulary(family))


@lru_cache(maxsize=None)
def _vocabulary(family: str) -> tuple[str, ...]:
    # Cached: the doc_qa and st_qa vocabularies enumerate tens of thousands of values.
    return tuple(GENERATORS[family].answer_vocabulary())


__all__ = [
    "GENERATORS", "GENERATOR_VERSION", "MC_INSTRUCTION", "MC_LETTERS", "MULTIPLE_CHOICE_FAMILIES", "SPLITS",
    "answer_vocabulary", "generate_sample", "generate_samples",
]
