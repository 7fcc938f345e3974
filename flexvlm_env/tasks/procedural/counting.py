"""`tally_qa`: count the objects of one kind among many small objects and distractors.

The question names a colour and a shape ("How many red circles are there?"), a shape only, or a
colour only. 0..12 matching objects are scattered among 0..24 distractors, half of them near
misses that share the colour or the shape. Objects are small (6..32 px), so most requests need
crops. The reference is the count in digits ("7"), one answer, scored by exact match; the count is
taken from the objects actually drawn.
"""
from __future__ import annotations

import numpy as np
from PIL import ImageDraw

from .layout import sample_image_size
from .references import Draft
from .render import draw_line_clutter
from .scene import ShapeObject, draw_objects, new_background, scatter
from .vocab import COLOURS_RGB, SHAPES, plural

MAX_COUNT = 12
COLOURS = tuple(COLOURS_RGB)


def answer_vocabulary() -> list[str]:
    return [str(count) for count in range(MAX_COUNT + 1)]


def _matches(obj: ShapeObject, colour: str | None, shape: str | None) -> bool:
    return (colour is None or obj.colour == colour) and (shape is None or obj.shape == shape)


def _pick(rng: np.random.Generator, values: tuple[str, ...], exclude: str | None = None) -> str:
    pool = [value for value in values if value != exclude]
    return pool[int(rng.integers(len(pool)))]


def generate(rng: np.random.Generator) -> Draft:
    size_wh = sample_image_size(rng)
    image, _ = new_background(rng, size_wh)
    question_type = ("colour_shape", "shape", "colour")[int(rng.choice(3, p=(0.6, 0.2, 0.2)))]
    colour = _pick(rng, COLOURS) if question_type != "shape" else None
    shape = _pick(rng, SHAPES) if question_type != "colour" else None
    target_count = int(rng.integers(0, MAX_COUNT + 1))
    distractor_count = int(rng.integers(0, 25))
    object_size_px = int(rng.integers(6, 33))

    def sized() -> int:
        return max(5, round(object_size_px * rng.uniform(0.8, 1.2)))

    specs = [(shape or _pick(rng, SHAPES), colour or _pick(rng, COLOURS), sized()) for _ in range(target_count)]
    for _ in range(distractor_count):
        if question_type == "colour_shape" and rng.random() < 0.5:
            # Near miss: same colour other shape, or same shape other colour.
            if rng.random() < 0.5:
                specs.append((_pick(rng, SHAPES, shape), colour, sized()))
            else:
                specs.append((shape, _pick(rng, COLOURS, colour), sized()))
        else:
            specs.append((_pick(rng, SHAPES, shape), _pick(rng, COLOURS, colour), sized()))
    # Targets are placed first and may shrink but are never dropped; distractors that do not fit are.
    objects = scatter(rng, size_wh, specs, min_side_px=4, gap_px=2)
    clutter_count = int(rng.integers(0, 11))
    draw_line_clutter(ImageDraw.Draw(image), rng, size_wh, clutter_count)
    draw_objects(image, rng, objects)

    count = sum(_matches(obj, colour, shape) for obj in objects)
    if question_type == "colour_shape":
        prompt = f"How many {colour} {plural(shape)} are there?"
    elif question_type == "shape":
        prompt = f"How many {plural(shape)} are there?"
    else:
        prompt = f"How many {colour} shapes are there?"
    difficulty = {
        "image_width_px": size_wh[0],
        "image_height_px": size_wh[1],
        "target_count": count,
        "distractor_count": len(objects) - count,
        "object_count": len(objects),
        "object_size_px": object_size_px,
        "clutter_count": clutter_count,
        "question_type": question_type,
    }
    return Draft(image, prompt, (str(count),), difficulty)
