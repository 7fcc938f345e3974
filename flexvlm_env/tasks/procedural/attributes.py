"""`coco_2014_vqa`: attribute and relation questions about a scene of coloured shapes.

Each scene holds 2..7 objects with distinct (colour, shape) pairs, so "the red circle" names one
object. Questions ask an object's colour, shape or size class, whether an object exists, whether one
object is left of/above another, or which object is furthest in a direction. Objects are mostly
large, so many questions are answerable from micro's global view (112 px in the design, 224 px shipped); scenes with small objects
and line clutter need crops. References: 10 VQA-style annotator answers.
"""
from __future__ import annotations

from itertools import product

import numpy as np
from PIL import ImageDraw

from .layout import sample_image_size
from .references import Draft, vqa_references
from .render import draw_line_clutter
from .scene import ShapeObject, draw_objects, new_background, scatter
from .vocab import COLOUR_VARIANTS, COLOURS_RGB, SHAPES, SIZE_VARIANTS

SHAPE_VARIANTS: dict[str, tuple[str, ...]] = {"circle": ("round",), "diamond": ("rhombus",)}
DIRECTIONS = {  # direction -> (axis, sign): sign -1 means "smaller coordinate"
    "left": (0, -1), "right": (0, 1), "top": (1, -1), "bottom": (1, 1),
}
EXTREME_COLOUR_QUESTION = {
    "left": "What color is the leftmost shape?", "right": "What color is the rightmost shape?",
    "top": "What color is the top shape?", "bottom": "What color is the bottom shape?",
}
EXTREME_SHAPE_QUESTION = {
    "left": "What shape is furthest left?", "right": "What shape is furthest right?",
    "top": "What shape is at the top?", "bottom": "What shape is at the bottom?",
}
RELATION_WORDS = {"left": "left of", "right": "right of", "top": "above", "bottom": "below"}
QUESTION_TYPES = ("colour", "shape", "exists", "relation", "extreme", "size")


def answer_vocabulary() -> list[str]:
    words = set(COLOURS_RGB) | set(SHAPES) | {"yes", "no", "small", "large"}
    for variants in (*COLOUR_VARIANTS.values(), *SHAPE_VARIANTS.values(), *SIZE_VARIANTS.values()):
        words |= set(variants)
    return sorted(words)


def _name(obj: ShapeObject) -> str:
    return f"{obj.colour} {obj.shape}"


def _extreme(objects: list[ShapeObject], direction: str) -> ShapeObject | None:
    """The object furthest in `direction`, if it leads the runner-up by a visible margin."""
    if len(objects) < 2:
        return None
    axis, sign = DIRECTIONS[direction]
    ranked = sorted(objects, key=lambda obj: sign * obj.center[axis], reverse=True)
    lead_px = abs(ranked[0].center[axis] - ranked[1].center[axis])
    return ranked[0] if lead_px >= max(6.0, ranked[0].size_px / 2) else None


def _ask(rng: np.random.Generator, kind: str, objects: list[ShapeObject], size_class: dict[ShapeObject, str]):
    """(question, answer, variants, target objects) for `kind`, or None if this scene cannot ask it."""
    order = [objects[i] for i in rng.permutation(len(objects))]
    if kind == "colour":
        for obj in order:
            if sum(o.shape == obj.shape for o in objects) == 1:
                return f"What color is the {obj.shape}?", obj.colour, COLOUR_VARIANTS.get(obj.colour, ()), [obj]
    elif kind == "shape":
        for obj in order:
            if sum(o.colour == obj.colour for o in objects) == 1:
                return f"What shape is the {obj.colour} object?", obj.shape, SHAPE_VARIANTS.get(obj.shape, ()), [obj]
    elif kind == "exists":
        if rng.random() < 0.5:
            obj = order[0]
            return f"Is there a {_name(obj)}?", "yes", (), [obj]
        present = {(o.colour, o.shape) for o in objects}
        # Absent pairs that share a colour or a shape with the scene: a near miss, not a free "no".
        near = [(c, s) for c, s in product(COLOURS_RGB, SHAPES) if (c, s) not in present
                and any(c == pc or s == ps for pc, ps in present)]
        colour, shape = near[int(rng.integers(len(near)))]
        return f"Is there a {colour} {shape}?", "no", (), []
    elif kind == "relation":
        for i, a in enumerate(order):
            for b in order[i + 1:]:
                direction = tuple(DIRECTIONS)[int(rng.integers(4))]
                axis, sign = DIRECTIONS[direction]
                offset_px = a.center[axis] - b.center[axis]
                if abs(offset_px) < (a.size_px + b.size_px) / 4 + 4:
                    continue  # too close to call: a human annotator would hesitate too
                answer = "yes" if np.sign(offset_px) == sign else "no"
                return f"Is the {_name(a)} {RELATION_WORDS[direction]} the {_name(b)}?", answer, (), [a, b]
    elif kind == "extreme":
        for direction in (tuple(DIRECTIONS)[i] for i in rng.permutation(4)):
            obj = _extreme(objects, direction)
            if obj is None:
                continue
            if rng.random() < 0.5:
                return EXTREME_COLOUR_QUESTION[direction], obj.colour, COLOUR_VARIANTS.get(obj.colour, ()), [obj]
            return EXTREME_SHAPE_QUESTION[direction], obj.shape, SHAPE_VARIANTS.get(obj.shape, ()), [obj]
    elif kind == "size":
        if len(set(size_class.values())) == 2:
            obj = order[0]
            answer = size_class[obj]
            return f"What size is the {_name(obj)}?", answer, SIZE_VARIANTS[answer], [obj]
    return None


def generate(rng: np.random.Generator) -> Draft:
    size_wh = sample_image_size(rng)
    image, _ = new_background(rng, size_wh)
    object_count = int(rng.integers(2, 8))
    large_size_px = int(rng.integers(16, 97))
    small_ratio = float(rng.uniform(0.3, 0.5))
    two_sizes = rng.random() < 0.5
    pairs = list(product(COLOURS_RGB, SHAPES))
    chosen = [pairs[i] for i in rng.choice(len(pairs), size=object_count, replace=False)]
    specs = []
    for colour, shape in chosen:
        small = two_sizes and rng.random() < 0.5
        size_px = max(6, round(large_size_px * (small_ratio if small else 1.0) * rng.uniform(0.9, 1.1)))
        specs.append((shape, colour, size_px))
    objects = scatter(rng, size_wh, specs, min_side_px=6)
    # Size classes come from the placed sizes (placement may shrink), and the size question is only
    # asked when the two classes are clearly apart.
    sizes = [obj.size_px for obj in objects]
    threshold_px = (min(sizes) + max(sizes)) / 2
    size_class = {obj: ("large" if obj.size_px > threshold_px else "small") for obj in objects}
    if max(sizes) < 1.6 * min(sizes) or any(
        abs(obj.size_px - threshold_px) < 0.2 * threshold_px for obj in objects
    ):
        size_class = {obj: "large" for obj in objects}

    clutter_count = int(rng.integers(0, 9))
    draw_line_clutter(ImageDraw.Draw(image), rng, size_wh, clutter_count)
    draw_objects(image, rng, objects)

    asked = None
    for kind in (QUESTION_TYPES[i] for i in rng.permutation(len(QUESTION_TYPES))):
        asked = _ask(rng, kind, objects, size_class)
        if asked is not None:
            break
    question, answer, variants, targets = asked  # "exists" always succeeds, so asked is set
    difficulty = {
        "image_width_px": size_wh[0],
        "image_height_px": size_wh[1],
        "object_count": len(objects),
        "object_size_min_px": min(sizes),
        "object_size_max_px": max(sizes),
        "target_size_px": min((obj.size_px for obj in targets), default=min(sizes)),
        "clutter_count": clutter_count,
        "question_type": kind,
    }
    return Draft(image, question, vqa_references(rng, answer, variants), difficulty)
