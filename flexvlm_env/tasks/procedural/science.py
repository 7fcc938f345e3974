"""`science_qa_img`: pick the option that a science diagram supports.

One of five diagrams (`diagrams.DIAGRAMS`: food chain, bar chart, thermometer, balance, circuit)
with a question and 2..5 options. Multiple-choice convention (shared with `mmmu`, see
`references.py`): `Sample.options` holds the option texts in letter order, the prompt lists them as
"A. text" lines, and `answers == (correct_letter,)`.
"""
from __future__ import annotations

import numpy as np
from PIL import Image

from .diagrams import DIAGRAMS
from .layout import sample_image_size
from .references import MC_LETTERS, Draft, multiple_choice
from .render import jitter_rgb


def answer_vocabulary() -> list[str]:
    return list(MC_LETTERS)


def generate(rng: np.random.Generator) -> Draft:
    size_wh = sample_image_size(rng)
    image = Image.new("RGB", size_wh, jitter_rgb(rng, (252, 252, 250), amount=3))
    kind = tuple(DIAGRAMS)[int(rng.integers(len(DIAGRAMS)))]
    diagram = DIAGRAMS[kind](image, rng)
    prompt, options, answers = multiple_choice(
        rng, diagram.question, diagram.correct, diagram.distractors, keep_order=diagram.keep_order
    )
    difficulty = {
        "image_width_px": size_wh[0], "image_height_px": size_wh[1], "diagram": kind, "option_count": len(options),
        **diagram.difficulty,
    }
    return Draft(image, prompt, answers, difficulty, options)
