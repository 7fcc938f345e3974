"""`mmmu`: multiple-choice questions that need two steps (count, then compare or combine).

A scene holds 2..4 kinds of coloured shapes, 0..9 of each (1..9 of the first), at 8..40 px.
Questions: how many more of one kind than another, the total of two shapes, what remains after
removing a colour, and which colour is most common. Four or five options; MMMU-style convention
(see `references.py`): `Sample.options` in letter order, "A. text" lines in the prompt,
`answers == (correct_letter,)`. Numeric options are consecutive and ascending, with the correct
one at a random position (clamped at 0, so small answers lean towards early letters).
"""
from __future__ import annotations

from collections import Counter

import numpy as np
from PIL import ImageDraw

from .layout import sample_image_size
from .references import MC_LETTERS, Draft, multiple_choice, numeric_options
from .render import draw_line_clutter
from .scene import draw_objects, new_background, scatter
from .vocab import COLOURS_RGB, SHAPES, plural

QUESTION_TYPES = ("difference", "sum", "remove", "most_colour")


def answer_vocabulary() -> list[str]:
    return list(MC_LETTERS)


def generate(rng: np.random.Generator) -> Draft:
    size_wh = sample_image_size(rng)
    image, _ = new_background(rng, size_wh)
    kind_count = int(rng.integers(2, 5))
    colours = [tuple(COLOURS_RGB)[i] for i in rng.choice(len(COLOURS_RGB), size=kind_count, replace=False)]
    shapes = [SHAPES[i] for i in rng.choice(len(SHAPES), size=kind_count, replace=False)]
    object_size_px = int(rng.integers(8, 41))
    # 0..9 objects per kind (absent kinds make good distractors), but never an empty scene.
    planned_counts = [int(rng.integers(1 if k == 0 else 0, 10)) for k in range(kind_count)]
    specs = [
        (shape, colour, max(6, round(object_size_px * rng.uniform(0.85, 1.15))))
        for colour, shape, count in zip(colours, shapes, planned_counts)
        for _ in range(count)
    ]
    specs = [specs[i] for i in rng.permutation(len(specs))]  # no kind gets placement priority
    objects = scatter(rng, size_wh, specs, min_side_px=5, gap_px=2)
    clutter_count = int(rng.integers(0, 9))
    draw_line_clutter(ImageDraw.Draw(image), rng, size_wh, clutter_count)
    draw_objects(image, rng, objects)

    kind_counts = Counter((obj.colour, obj.shape) for obj in objects)
    counts = {kind: kind_counts.get(kind, 0) for kind in zip(colours, shapes)}
    colour_counts = Counter(obj.colour for obj in objects)
    option_count = int(rng.integers(4, 6))
    kinds = list(counts)
    question_type = QUESTION_TYPES[int(rng.integers(len(QUESTION_TYPES)))]
    ranked = colour_counts.most_common()
    if question_type == "most_colour" and (len(ranked) < 2 or ranked[0][1] == ranked[1][1]):
        question_type = "remove"  # a tie has no single answer
    unequal = [(a, b) for a in kinds for b in kinds if counts[a] > counts[b]]
    if question_type == "difference" and not unequal:
        question_type = "sum"  # every kind has the same count: "how many more" would be 0
    if question_type == "difference":
        a, b = unequal[int(rng.integers(len(unequal)))]
        question = f"How many more {a[0]} {plural(a[1])} than {b[0]} {plural(b[1])} are there?"
        answer = counts[a] - counts[b]
    elif question_type == "sum":
        a, b = (kinds[i] for i in rng.choice(len(kinds), size=2, replace=False))
        question = f"How many {plural(a[1])} and {plural(b[1])} are there in total?"
        answer = counts[a] + counts[b]
    elif question_type == "remove":
        colour = colours[int(rng.integers(len(colours)))]
        question = f"If all {colour} shapes are removed, how many shapes are left?"
        answer = len(objects) - colour_counts.get(colour, 0)
    else:
        question = "Which color has the most shapes?"
        present = [colour for colour, _ in ranked]
        absent = [c for c in COLOURS_RGB if c not in present]
        pool = (present[1:] + absent)[: option_count - 1]
        prompt, options, answers = multiple_choice(rng, question, ranked[0][0], pool)
        return Draft(image, prompt, answers, _difficulty(size_wh, objects, object_size_px, clutter_count, question_type), options)
    options = [str(v) for v in numeric_options(rng, answer, option_count, low=0)]
    prompt, options, answers = multiple_choice(rng, question, str(answer), [], keep_order=options)
    return Draft(image, prompt, answers, _difficulty(size_wh, objects, object_size_px, clutter_count, question_type), options)


def _difficulty(size_wh, objects, object_size_px: int, clutter_count: int, question_type: str) -> dict:
    return {
        "image_width_px": size_wh[0],
        "image_height_px": size_wh[1],
        "object_count": len(objects),
        "object_size_px": object_size_px,
        "clutter_count": clutter_count,
        "question_type": question_type,
    }
