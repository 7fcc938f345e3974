"""`coco_caption`: describe a scene of coloured shapes in one sentence.

A scene holds 1..3 kinds of object (a kind is a colour and a shape), 1..3 objects of each kind, at
one object size (10..90 px) for the scene. References are 5..7 captions, all true for the image,
that differ in template, word order (left to right, or by count) and synonyms ("picture", "image",
"drawing"), as COCO's five annotators do. Small scenes need crops to tell colours and shapes apart.
"""
from __future__ import annotations

import numpy as np
from PIL import ImageDraw

from .layout import sample_image_size
from .references import Draft
from .render import draw_line_clutter
from .scene import ShapeObject, draw_objects, new_background, scatter
from .vocab import BACKGROUNDS_RGB, COLOURS_RGB, NUMBER_WORDS, SHAPES, article, plural

MAX_KINDS, MAX_PER_KIND = 3, 3
MAX_OBJECTS = MAX_KINDS * MAX_PER_KIND
PICTURE_WORDS = ("picture", "image", "drawing")
SHOWING_WORDS = ("showing", "with")
# Words the templates below use besides colours, shapes, numbers, sizes and background names.
TEMPLATE_WORDS = (
    "a", "an", "and", "of", "on", "background", "there", "is", "are", "in", "the", "shapes",
    "shape", "single", "to", "left", "some", "colorful", "including",
    "next", "group", "small", "large", "simple", *PICTURE_WORDS, *SHOWING_WORDS,
)


def answer_vocabulary() -> list[str]:
    """Captions are compositional: this is the closed set of words any reference caption uses."""
    words = set(TEMPLATE_WORDS) | set(COLOURS_RGB) | set(SHAPES) | {plural(s) for s in SHAPES}
    words |= set(NUMBER_WORDS[1:MAX_OBJECTS + 1])
    for name in BACKGROUNDS_RGB:
        words |= set(name.split())
    return sorted(words)


def _phrase(count: int, colour: str, shape: str, size_word: str | None) -> str:
    adjectives = f"{size_word} {colour}" if size_word else colour
    if count == 1:
        return f"{article(adjectives)} {adjectives} {shape}"
    return f"{NUMBER_WORDS[count]} {adjectives} {plural(shape)}"


def _join(parts: list[str]) -> str:
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def _captions(
    rng: np.random.Generator,
    groups: dict[tuple[str, str], list[ShapeObject]],
    background: str,
    size_word: str | None,
) -> list[str]:
    kinds = list(groups)
    left_to_right = sorted(kinds, key=lambda kind: min(obj.center[0] for obj in groups[kind]))
    by_count = sorted(kinds, key=lambda kind: -len(groups[kind]))

    def listing(order: list[tuple[str, str]]) -> str:
        sized = size_word if rng.random() < 0.5 else None  # the size word is optional, never false
        return _join([_phrase(len(groups[kind]), kind[0], kind[1], sized) for kind in order])

    def shuffled() -> list[tuple[str, str]]:
        return [kinds[i] for i in rng.permutation(len(kinds))]

    total = sum(len(objs) for objs in groups.values())
    first_plural = len(groups[left_to_right[0]]) > 1
    picture = PICTURE_WORDS[int(rng.integers(len(PICTURE_WORDS)))]
    showing = SHOWING_WORDS[int(rng.integers(len(SHOWING_WORDS)))]
    captions = [
        f"{listing(left_to_right)}.",
        f"{listing(shuffled())} on a {background} background.",
        f"{article(picture)} {picture} of {listing(by_count)}.",
        f"There {'are' if first_plural else 'is'} {listing(left_to_right)} in the {picture}.",
        f"A simple {PICTURE_WORDS[(PICTURE_WORDS.index(picture) + 1) % 3]} {showing} {listing(shuffled())}.",
    ]
    if total == 1:
        kind = kinds[0]
        captions.append(f"A single {kind[0]} {kind[1]} on a {background} background.")
    elif len(kinds) > 1:
        captions.append(f"{NUMBER_WORDS[total]} shapes: {listing(by_count)}.")
    else:
        captions.append(f"A group of {listing(kinds)} on a {background} background.")
    if len({kind[0] for kind in kinds}) > 1:
        captions.append(f"Some colorful shapes including {listing(shuffled())}.")
    if len(kinds) == 2 and all(len(groups[kind]) == 1 for kind in kinds):
        a, b = (groups[kind][0] for kind in left_to_right)
        if b.center[0] - a.center[0] > (a.size_px + b.size_px) / 2:
            captions.append(f"{_phrase(1, a.colour, a.shape, None)} to the left of {_phrase(1, b.colour, b.shape, None)}.")
        else:
            captions.append(f"{_phrase(1, a.colour, a.shape, None)} next to {_phrase(1, b.colour, b.shape, None)}.")
    captions = list(dict.fromkeys(c[0].upper() + c[1:] for c in captions))  # dedupe, keep order
    keep = int(rng.integers(5, min(7, len(captions)) + 1))
    return [captions[i] for i in sorted(rng.choice(len(captions), size=keep, replace=False))]


def generate(rng: np.random.Generator) -> Draft:
    size_wh = sample_image_size(rng)
    image, background = new_background(rng, size_wh)
    kind_count = int(rng.integers(1, MAX_KINDS + 1))
    colours = [tuple(COLOURS_RGB)[i] for i in rng.choice(len(COLOURS_RGB), size=kind_count, replace=False)]
    shapes = [SHAPES[i] for i in rng.choice(len(SHAPES), size=kind_count, replace=False)]
    counts = rng.integers(1, MAX_PER_KIND + 1, size=kind_count)
    object_size_px = int(rng.integers(10, 91))
    specs = [
        (shape, colour, max(6, round(object_size_px * rng.uniform(0.9, 1.1))))
        for colour, shape, count in zip(colours, shapes, counts)
        for _ in range(int(count))
    ]
    objects = scatter(rng, size_wh, specs, min_side_px=6)
    clutter_count = int(rng.integers(0, 7))
    draw_line_clutter(ImageDraw.Draw(image), rng, size_wh, clutter_count)
    draw_objects(image, rng, objects)

    groups: dict[tuple[str, str], list[ShapeObject]] = {}
    for obj in objects:
        groups.setdefault((obj.colour, obj.shape), []).append(obj)
    # Size words are relative to the image, and only used where nobody would dispute them.
    size_fraction = float(np.median([obj.size_px for obj in objects])) / min(size_wh)
    size_word = "large" if size_fraction >= 0.22 else "small" if size_fraction <= 0.07 else None
    difficulty = {
        "image_width_px": size_wh[0],
        "image_height_px": size_wh[1],
        "object_count": len(objects),
        "kind_count": len(groups),
        "object_size_px": min(obj.size_px for obj in objects),
        "clutter_count": clutter_count,
    }
    return Draft(image, "Describe the image in one sentence.", tuple(_captions(rng, groups, background, size_word)), difficulty)
