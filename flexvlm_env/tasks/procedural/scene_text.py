"""`st_qa`: small, rotated scene text: words, codes and numbers on plates or painted in colour.

1..5 text items (a word from `vocab.SCENE_WORDS`, a code like "K27", or a number 10..999) are
scattered among clutter, each rotated by up to +-45 degrees, at small sizes (font 9..24 px). An
item is either a coloured plate ("What is written on the red sign?") or bare coloured text ("What
is written in red?"). Rotation plus small size makes most requests need many crops. The reference
is the item in lower case (one answer, ANLS).
"""
from __future__ import annotations

import string

import numpy as np
from PIL import ImageDraw

from .layout import place_boxes, sample_image_size
from .references import Draft
from .render import draw_line_clutter, fitting_text_patch, jitter_rgb, paste_patch, text_ink_size, text_on
from .scene import draw_clutter_shapes, new_background
from .vocab import CASES, COLOURS_RGB, SCENE_WORDS, SIGN_COLOURS, styled

# Bare text must contrast with pale backgrounds, so yellow is left out here.
INK_COLOURS = ("red", "green", "blue", "orange", "purple", "pink", "black", "brown")
MAX_ROTATION_DEG = 45.0


def answer_vocabulary() -> list[str]:
    codes = [f"{letter}{number:02d}" for letter in string.ascii_lowercase for number in range(10, 100)]
    numbers = [str(number) for number in range(10, 1000)]
    return sorted(set(SCENE_WORDS) | set(codes) | set(numbers))


def _item(rng: np.random.Generator) -> tuple[str, str]:
    """(kind, text as the reference spells it)."""
    draw_kind = rng.random()
    if draw_kind < 0.5:
        return "word", SCENE_WORDS[int(rng.integers(len(SCENE_WORDS)))]
    if draw_kind < 0.75:
        return "code", f"{string.ascii_lowercase[int(rng.integers(26))]}{int(rng.integers(10, 100))}"
    return "number", str(int(rng.integers(10, 1000)))


def generate(rng: np.random.Generator) -> Draft:
    size_wh = sample_image_size(rng)
    image, _ = new_background(rng, size_wh)
    draw = ImageDraw.Draw(image)
    plated = rng.random() < 0.5
    palette = SIGN_COLOURS if plated else INK_COLOURS
    item_count = int(rng.integers(1, 6))
    colours = [palette[i] for i in rng.choice(len(palette), size=item_count, replace=False)]
    case = CASES[int(rng.integers(len(CASES)))]
    font_size_px = int(rng.integers(9, 25))
    rotation_deg = float(rng.uniform(-MAX_ROTATION_DEG, MAX_ROTATION_DEG))

    items, patches, seen = [], [], set()
    for k, colour in enumerate(colours):
        kind, text = _item(rng)
        while text in seen:  # distinct items, so the question has one answer
            kind, text = _item(rng)
        seen.add(text)
        size_px = font_size_px if k == 0 else max(9, round(font_size_px * rng.uniform(0.7, 1.3)))
        angle_deg = rotation_deg if k == 0 else float(rng.uniform(-MAX_ROTATION_DEG, MAX_ROTATION_DEG))
        shown = styled(text, case) if kind == "word" else text.upper()
        rgb = jitter_rgb(rng, COLOURS_RGB[colour], amount=10)
        fill = text_on(rgb) if plated else rgb
        patch, size_px = fitting_text_patch(
            shown, size_px, (size_wh[0] - 8, size_wh[1] - 8), fill, angle_deg, background=rgb if plated else None
        )
        if k == 0:
            font_size_px = size_px
        items.append((colour, kind, text, shown))
        patches.append(patch)
    boxes = place_boxes(rng, size_wh, [patch.size for patch in patches], gap_px=5, margin_px=4)
    placed = [(item, patch, box) for item, patch, box in zip(items, patches, boxes) if box is not None]
    clutter_count = int(rng.integers(0, 21))
    clutter_drawn = draw_clutter_shapes(draw, rng, size_wh, clutter_count // 2, [box for *_, box in placed])
    draw_line_clutter(draw, rng, size_wh, clutter_count - clutter_count // 2)
    for _, patch, box in placed:
        paste_patch(image, patch, box[:2])

    colour, kind, text, shown = placed[0][0]
    if plated:
        prompt = "What is written on the sign?" if len(placed) == 1 else f"What is written on the {colour} sign?"
    else:
        prompt = f"What is written in {colour}?"
    difficulty = {
        "image_width_px": size_wh[0],
        "image_height_px": size_wh[1],
        "font_size_px": font_size_px,
        "text_height_px": text_ink_size(shown, font_size_px)[1],
        "rotation_deg": round(rotation_deg, 1),
        "item_count": len(placed),
        "clutter_count": clutter_drawn + clutter_count - clutter_count // 2,
        "plated": plated,
        "text_kind": kind,
    }
    return Draft(image, prompt, (text,), difficulty)
