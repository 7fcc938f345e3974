"""The nine task families: name, metric, generation budget and real-dataset source.

Names follow the datasets the seed study used (DESIGN.md section 3). This table is the single
source of truth for a family's metric and `max_new_tokens`; procedural and real loaders read it.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class FamilySpec:
    name: str
    metric: str  # a key of flexvlm_env.metrics.METRICS
    max_new_tokens: int
    real_dataset: str  # human-readable name of the real dataset
    skill: str  # what the procedural source exercises


FAMILIES: dict[str, FamilySpec] = {
    spec.name: spec
    for spec in (
        FamilySpec("coco_2014_vqa", "vqa_accuracy", 16, "VQA v2 val", "attribute/relation questions about scenes of shapes"),
        FamilySpec("coco_caption", "cider", 64, "COCO Captions val", "describe the scene in one sentence"),
        FamilySpec("tally_qa", "exact_match", 16, "TallyQA test", "count objects of a kind, many small ones"),
        FamilySpec("doc_qa", "anls", 32, "DocVQA val", "read a value from a rendered document"),
        FamilySpec("okvqa", "vqa_accuracy", 16, "OK-VQA val", "question needing a fact beyond the pixels"),
        FamilySpec("text_vqa", "vqa_accuracy", 64, "TextVQA val", "read a word in the scene"),
        FamilySpec("science_qa_img", "mc_accuracy", 16, "ScienceQA (image) val", "pick an option about a diagram"),
        FamilySpec("st_qa", "anls", 32, "ST-VQA val", "scene text, small and rotated"),
        FamilySpec("mmmu", "mmmu", 16, "MMMU val", "multi-step question with options"),
    )
}


def family_spec(family: str) -> FamilySpec:
    """Return the spec of `family`, or raise a ValueError listing the known families."""
    try:
        return FAMILIES[family]
    except KeyError:
        raise ValueError(f"family={family!r} is not a known task family; expected one of {sorted(FAMILIES)}") from None
