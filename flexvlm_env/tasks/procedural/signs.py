"""`text_vqa`: read the word written on a sign in a cluttered scene.

1..4 upright signs of distinct colours each carry a different word from `vocab.SCENE_WORDS`
(~290 common short words), printed in upper, lower or title case; clutter (shapes and lines)
surrounds them. The question picks a sign by colour. Text size spans 9..40 px (font size), so large
signs are readable from micro's global view (112 px in the design, 224 px shipped) and small ones need several crops. References:
10 VQA-style annotator answers, the word in lower case.
"""
from __future__ import annotations

import numpy as np
from PIL import ImageDraw

from .layout import place_boxes, sample_image_size
from .references import Draft, vqa_references
from .render import draw_line_clutter, fitting_text_patch, jitter_rgb, paste_patch, text_ink_size, text_on
from .scene import draw_clutter_shapes, new_background
from .vocab import CASES, COLOURS_RGB, SCENE_WORDS, SIGN_COLOURS, styled


def answer_vocabulary() -> list[str]:
    return sorted(SCENE_WORDS)


def generate(rng: np.random.Generator) -> Draft:
    size_wh = sample_image_size(rng)
    image, _ = new_background(rng, size_wh)
    draw = ImageDraw.Draw(image)
    sign_count = int(rng.integers(1, 5))
    colours = [SIGN_COLOURS[i] for i in rng.choice(len(SIGN_COLOURS), size=sign_count, replace=False)]
    words = [SCENE_WORDS[i] for i in rng.choice(len(SCENE_WORDS), size=sign_count, replace=False)]
    case = CASES[int(rng.integers(len(CASES)))]
    font_size_px = int(rng.integers(9, 41))

    patches = []
    for k, (colour, word) in enumerate(zip(colours, words)):
        size_px = font_size_px if k == 0 else max(9, round(font_size_px * rng.uniform(0.7, 1.3)))
        plate = jitter_rgb(rng, COLOURS_RGB[colour], amount=10)
        max_wh = (size_wh[0] - 8, size_wh[1] - 8)
        patch, size_px = fitting_text_patch(styled(word, case), size_px, max_wh, text_on(plate), background=plate)
        patches.append(patch)
        if k == 0:
            font_size_px = size_px  # a long word at a large size is shrunk to fit the image
    # The target sign is placed first on an empty canvas, so only other signs can be dropped.
    boxes = place_boxes(rng, size_wh, [patch.size for patch in patches], gap_px=6, margin_px=4)
    placed = [(colour, word, patch, box) for colour, word, patch, box in zip(colours, words, patches, boxes) if box is not None]
    clutter_count = int(rng.integers(0, 13))
    clutter_drawn = draw_clutter_shapes(draw, rng, size_wh, clutter_count, [box for *_, box in placed])
    line_count = int(rng.integers(0, 7))
    draw_line_clutter(draw, rng, size_wh, line_count)
    for _, _, patch, box in placed:
        paste_patch(image, patch, box[:2])

    colour, word = placed[0][0], placed[0][1]
    prompt = "What word is written on the sign?" if len(placed) == 1 else f"What word is written on the {colour} sign?"
    difficulty = {
        "image_width_px": size_wh[0],
        "image_height_px": size_wh[1],
        "font_size_px": font_size_px,
        "text_height_px": text_ink_size(styled(word, case), font_size_px)[1],
        "sign_count": len(placed),
        "clutter_count": clutter_drawn + line_count,
        "case": case,
    }
    return Draft(image, prompt, vqa_references(rng, word), difficulty)
