"""`okvqa`: questions whose answer is a fact about a drawn object, not visible in the pixels.

The image shows 1..4 icon drawings (`icons.py`) among line clutter; the question names one by
position when there are several ("the object on the left") and asks a fact from the closed
`FACTS` table: what it is used for, where it is found, which season or time of day it goes
with, which animal eats it, what it tells drivers... The model must recognise the object (icons of
14..120 px) and recall the fact; the table is small and fixed, so the facts are learnable.
References: 10 VQA-style annotator answers, a few using a listed synonym.
"""
from __future__ import annotations

import numpy as np
from PIL import ImageDraw

from .icons import ICONS, draw_icon
from .layout import place_boxes, sample_image_size
from .references import Draft, vqa_references
from .render import draw_line_clutter
from .scene import new_background

# relation -> question template; {ref} is "this" or "the object on the left" etc.
QUESTIONS = {
    "use": "What is {ref} used for?",
    "place": "Where would you usually find {ref}?",
    "season": "Which season goes with {ref}?",
    "time": "At what time of day do you see {ref}?",
    "eaten_by": "Which animal likes to eat {ref}?",
    "food_group": "Which food group is {ref} in?",
    "ability": "What can {ref} do?",
    "made_of": "What is {ref} made of?",
    "gives": "What does {ref} give us?",
    "signal": "What does {ref} tell drivers to do?",
}
# object -> relation -> (answer, variants a few annotators use)
FACTS: dict[str, dict[str, tuple[str, tuple[str, ...]]]] = {
    "sun": {"time": ("day", ("daytime",)), "place": ("sky", ()), "season": ("summer", ()), "gives": ("light", ("heat",))},
    "moon": {"time": ("night", ("nighttime",)), "place": ("sky", ())},
    "tree": {"place": ("forest", ("woods", "park")), "gives": ("wood", ("shade",))},
    "flower": {"place": ("garden", ("park",)), "season": ("spring", ())},
    "apple": {"food_group": ("fruit", ()), "eaten_by": ("horse", ("pig",)), "place": ("tree", ("orchard",))},
    "carrot": {"food_group": ("vegetable", ("veggie",)), "eaten_by": ("rabbit", ("bunny",))},
    "cheese": {"food_group": ("dairy", ()), "eaten_by": ("mouse", ("rat",))},
    "fish": {"place": ("water", ("ocean", "sea")), "ability": ("swim", ()), "eaten_by": ("cat", ("bear",))},
    "bird": {"ability": ("fly", ()), "place": ("nest", ("tree", "sky"))},
    "car": {"use": ("driving", ("transportation",)), "place": ("road", ("street",))},
    "boat": {"use": ("sailing", ("fishing",)), "place": ("water", ("sea", "lake"))},
    "house": {"use": ("living", ("shelter",))},
    "umbrella": {"use": ("rain", ("shade",))},
    "cup": {"use": ("drinking", ("coffee",))},
    "clock": {"use": ("time", ("telling time",))},
    "snowman": {"season": ("winter", ()), "made_of": ("snow", ("ice",))},
    "red traffic light": {"signal": ("stop", ())},
    "yellow traffic light": {"signal": ("slow down", ("slow", "caution"))},
    "green traffic light": {"signal": ("go", ())},
}
POSITION_REFS = {
    "left": "the object on the left", "right": "the object on the right", "top": "the top object", "bottom": "the bottom object",
}
MAX_OTHER_ICONS = 3


def answer_vocabulary() -> list[str]:
    words = set()
    for relations in FACTS.values():
        for answer, variants in relations.values():
            words |= {answer, *variants}
    return sorted(words)


def _unique_extreme(boxes, target: int) -> list[str]:
    """Directions in which box `target` is clearly the furthest of all boxes."""
    directions = []
    for direction, axis, sign in (("left", 0, -1), ("right", 0, 1), ("top", 1, -1), ("bottom", 1, 1)):
        centres = [sign * (box[axis] + box[axis + 2]) / 2 for box in boxes]
        others = [c for i, c in enumerate(centres) if i != target]
        side = boxes[target][2] - boxes[target][0]
        if centres[target] - max(others) >= max(8.0, side / 2):
            directions.append(direction)
    return directions


def generate(rng: np.random.Generator) -> Draft:
    size_wh = sample_image_size(rng)
    image, _ = new_background(rng, size_wh)
    background_rgb = image.getpixel((0, 0))
    names = list(ICONS)
    target = names[int(rng.integers(len(names)))]
    icon_size_px = int(rng.integers(14, 121))
    other_count = int(rng.integers(0, MAX_OTHER_ICONS + 1))
    others = [names[i] for i in rng.permutation(len(names)) if names[i] != target][:other_count]
    sizes = [icon_size_px] + [max(14, round(icon_size_px * rng.uniform(0.7, 1.3))) for _ in others]
    boxes = place_boxes(rng, size_wh, [(s, s) for s in sizes], gap_px=6, min_side_px=12)
    placed = [(name, box) for name, box in zip([target, *others], boxes) if box is not None]
    directions = _unique_extreme([box for _, box in placed], 0) if len(placed) > 1 else []
    if len(placed) > 1 and not directions:
        placed = placed[:1]  # no unambiguous way to point at the target: show it alone
    clutter_count = int(rng.integers(0, 13))
    draw = ImageDraw.Draw(image)
    draw_line_clutter(draw, rng, size_wh, clutter_count)
    for name, box in placed:
        draw_icon(draw, name, box, background_rgb, rng)

    ref = POSITION_REFS[directions[int(rng.integers(len(directions)))]] if len(placed) > 1 else "this"
    relations = list(FACTS[target])
    relation = relations[int(rng.integers(len(relations)))]
    answer, variants = FACTS[target][relation]
    difficulty = {
        "image_width_px": size_wh[0],
        "image_height_px": size_wh[1],
        "icon_size_px": placed[0][1][2] - placed[0][1][0],
        "icon_count": len(placed),
        "clutter_count": clutter_count,
        "object": target,
        "relation": relation,
    }
    return Draft(image, QUESTIONS[relation].format(ref=ref), vqa_references(rng, answer, variants), difficulty)
