"""The one request type every task source produces.

A `Sample` is what the environment serves and the metrics score: an image, a prompt, the
reference answers and the family's metric. Procedural and real-dataset sources both map to it,
so everything downstream is source-agnostic. Request ids are addressable strings
(`family/source/split/index`) so that an episode can be recorded and replayed.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

from PIL import Image


@dataclass(frozen=True, eq=False)
class Sample:
    """One vision-language request with its references.

    Attributes:
        request_id: addressable id, `family/source/split/index` (e.g. `tally_qa/procedural/val/17`).
        image: RGB PIL image.
        prompt: the question or instruction, as the user would type it.
        answers: reference answers (10 annotator answers for VQA-style, >= 5 captions, ...).
        family: one of `flexvlm_env.tasks.FAMILIES`.
        metric: name of the metric in `flexvlm_env.metrics` that scores this sample.
        max_new_tokens: generation budget for this family.
        options: answer options for multiple-choice families (None otherwise).
        difficulty: for procedural samples, the parameters that generated the sample.
    """

    request_id: str
    image: Image.Image
    prompt: str
    answers: tuple[str, ...]
    family: str
    metric: str
    max_new_tokens: int
    options: tuple[str, ...] | None = None
    difficulty: Mapping[str, Any] | None = field(default=None)

    def __post_init__(self) -> None:
        if not isinstance(self.image, Image.Image):
            raise TypeError(f"Sample.image must be a PIL.Image.Image, got {type(self.image).__name__}")
        # A bare string would be scored as a sequence of one-character answers.
        if isinstance(self.answers, str) or not all(isinstance(a, str) for a in self.answers):
            raise ValueError(f"Sample {self.request_id!r}: answers={self.answers!r} must be a tuple of strings, e.g. "
                             f"({self.answers!r},)" if isinstance(self.answers, str) else
                             f"Sample {self.request_id!r}: answers={self.answers!r} must be a tuple of strings")
        if not self.answers:
            raise ValueError(f"Sample {self.request_id!r}: answers must be non-empty")
        if self.max_new_tokens < 1:
            raise ValueError(f"Sample {self.request_id!r}: max_new_tokens must be >= 1, got {self.max_new_tokens}")
