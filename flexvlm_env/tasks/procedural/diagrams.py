"""Science diagrams for `science_qa_img`: food chain, bar chart, thermometer, balance, circuit.

Each `draw_*` function draws one diagram on a blank image and returns a `DiagramQuestion`: the
question, the correct option, the distractor options, whether options keep a fixed order (yes/no,
left/right, ascending numbers), and the diagram's own difficulty parameters. Labels are small
(8..18 px fonts) and the decisive detail (a switch gap, a slight tilt, a thermometer tick) is
often only a few pixels, so diagrams range from glanceable to needing crops.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from .references import numeric_options
from .render import Box, draw_arrow, draw_text, draw_text_line, jitter_rgb, text_ink_size
from .vocab import COLOURS_RGB

INK = (30, 30, 30)
FOOD_CHAINS = (
    ("grass", "rabbit", "fox"), ("grass", "grasshopper", "frog", "snake"), ("algae", "fish", "heron"),
    ("seeds", "mouse", "owl"), ("leaves", "caterpillar", "bird", "hawk"), ("plankton", "fish", "seal", "shark"),
    ("acorns", "squirrel", "hawk"), ("grass", "deer", "wolf"), ("flowers", "bee", "bird"), ("kelp", "urchin", "otter"),
)
ORGANISMS = sorted({name for chain in FOOD_CHAINS for name in chain})
BAR_LABELS = ("apple", "pear", "plum", "lemon", "grape", "peach", "melon", "kiwi", "mango", "lime")


@dataclass
class DiagramQuestion:
    question: str
    correct: str
    distractors: list[str]
    keep_order: list[str] | None = None
    difficulty: dict[str, Any] = field(default_factory=dict)


def _label_box(draw: ImageDraw.ImageDraw, text: str, centre: tuple[float, float], font_size_px: int, fill) -> Box:
    """Draw `text` in an outlined box centred on `centre`; returns the box."""
    width_px, height_px = text_ink_size(text, font_size_px)
    half_w, half_h = width_px / 2 + max(3, font_size_px // 3), height_px / 2 + max(3, font_size_px // 3)
    box = (centre[0] - half_w, centre[1] - half_h, centre[0] + half_w, centre[1] + half_h)
    draw.rectangle(box, fill=fill, outline=INK)
    draw_text(draw, text, (round(centre[0] - width_px / 2), round(centre[1] - height_px / 2)), font_size_px, INK)
    return box


def draw_food_chain(image: Image.Image, rng: np.random.Generator) -> DiagramQuestion:
    """Organisms in boxes linked by arrows pointing from food to eater (the usual convention)."""
    draw = ImageDraw.Draw(image)
    width, height = image.size
    chain = FOOD_CHAINS[int(rng.integers(len(FOOD_CHAINS)))]
    horizontal = width >= height
    reverse = rng.random() < 0.3
    along_px, across_px = (width, height) if horizontal else (height, width)
    # The font shrinks until the boxes and minimum arrow gaps fit along the axis.
    for font_size_px in range(int(rng.integers(8, 19)), 6, -1):
        extents = [text_ink_size(name, font_size_px)[0 if horizontal else 1] + 2 * max(3, font_size_px // 3) for name in chain]
        widest_px = max(text_ink_size(name, font_size_px)[0] for name in chain)
        if sum(extents) + 22 * (len(chain) - 1) <= along_px - 12 and widest_px + 12 <= across_px:
            break
    slack = along_px - 12 - sum(extents)
    gap_px = slack / (len(chain) - 1)
    cross = across_px / 2 + rng.uniform(-0.2, 0.2) * across_px
    fill = jitter_rgb(rng, (235, 245, 225), amount=10)
    boxes, position = [], 6.0
    order = list(reversed(chain)) if reverse else list(chain)
    for name, extent in zip(order, [extents[chain.index(n)] for n in order]):
        centre_along = position + extent / 2
        centre = (centre_along, cross) if horizontal else (cross, centre_along)
        boxes.append(_label_box(draw, name, centre, font_size_px, fill))
        position += extent + gap_px
    if reverse:
        boxes.reverse()
    for a, b in zip(boxes, boxes[1:]):  # arrow from food (a) to eater (b)
        if horizontal:
            sign = 1 if b[0] > a[0] else -1
            start = (a[2] + 3, cross) if sign > 0 else (a[0] - 3, cross)
            end = (b[0] - 3, cross) if sign > 0 else (b[2] + 3, cross)
        else:
            sign = 1 if b[1] > a[1] else -1
            start = (cross, a[3] + 3) if sign > 0 else (cross, a[1] - 3)
            end = (cross, b[1] - 3) if sign > 0 else (cross, b[3] + 3)
        draw_arrow(draw, start, end, INK, width_px=2, head_px=max(5, min(9, int(abs(gap_px) / 3))))

    kind = int(rng.integers(4))
    position = int(rng.integers(1, len(chain)))
    subject = None
    if kind == 0:
        subject, correct = chain[position], chain[position - 1]
        question = f"What does the {subject} eat?"
    elif kind == 1:
        subject, correct = chain[position - 1], chain[position]
        question = f"What eats the {subject}?"
    elif kind == 2:
        question, correct = "Which organism is the producer?", chain[0]
    else:
        question, correct = "Which organism is the top predator?", chain[-1]
    distractors = [name for name in chain if name not in (correct, subject)]
    # Organisms absent from the diagram top the options up to 3 or 4.
    outsiders = [ORGANISMS[i] for i in rng.permutation(len(ORGANISMS)) if ORGANISMS[i] not in chain]
    distractors += outsiders[: max(0, int(rng.integers(2, 4)) - len(distractors))]
    return DiagramQuestion(question, correct, distractors, difficulty={"font_size_px": font_size_px, "chain_length": len(chain)})


def draw_bar_chart(image: Image.Image, rng: np.random.Generator) -> DiagramQuestion:
    """Vertical bars of fruit votes with a y axis ticked every 2 votes."""
    draw = ImageDraw.Draw(image)
    width, height = image.size
    bar_count = int(rng.integers(3, 6))
    labels = [BAR_LABELS[i] for i in rng.choice(len(BAR_LABELS), size=bar_count, replace=False)]
    values = [int(v) for v in rng.integers(1, 11, size=bar_count)]
    while values.count(max(values)) > 1 or values.count(min(values)) > 1:  # one clear answer
        values = [int(v) for v in rng.integers(1, 11, size=bar_count)]
    font_size_px = int(rng.integers(8, 15))
    label_w = max(text_ink_size(label, font_size_px)[0] for label in labels)
    left, top = 10 + text_ink_size("10", font_size_px)[0], 8 + font_size_px
    right, bottom = width - 8, height - 8 - 2 * font_size_px
    slot_px = (right - left) / bar_count
    while slot_px < label_w + 2 and font_size_px > 6:  # labels must not collide
        font_size_px -= 1
        label_w = max(text_ink_size(label, font_size_px)[0] for label in labels)
    unit_px = (bottom - top) / 10
    draw_text(draw, "Votes", (4, 2), font_size_px, INK)
    for tick in range(0, 11, 2):
        y = bottom - tick * unit_px
        draw.line([(left - 3, y), (right, y)], fill=(215, 215, 215) if tick else INK, width=1)
        text_w, text_h = text_ink_size(str(tick), font_size_px)
        draw_text(draw, str(tick), (round(left - 5 - text_w), round(y - text_h / 2)), font_size_px, INK)
    draw.line([(left, top), (left, bottom)], fill=INK, width=1)
    colour = jitter_rgb(rng, COLOURS_RGB[("blue", "green", "orange", "purple")[int(rng.integers(4))]])
    for k, (label, value) in enumerate(zip(labels, values)):
        x0 = left + k * slot_px + slot_px * 0.2
        x1 = left + (k + 1) * slot_px - slot_px * 0.2
        draw.rectangle((x0, bottom - value * unit_px, x1, bottom), fill=colour)
        text_w, _ = text_ink_size(label, font_size_px)
        draw_text_line(draw, label, (round((x0 + x1) / 2 - text_w / 2), round(bottom + 3)), font_size_px, INK)
    ranked = sorted(values, reverse=True)
    difficulty = {
        "font_size_px": font_size_px, "bar_count": bar_count, "unit_px": round(unit_px, 1), "top_gap_votes": ranked[0] - ranked[1],
    }
    kind = int(rng.integers(3))
    if kind == 2:
        target = int(rng.integers(bar_count))
        options = numeric_options(rng, values[target], 4, low=0)
        question = f"How many votes did {labels[target]} get?"
        return DiagramQuestion(question, str(values[target]), [], [str(o) for o in options], difficulty)
    pick = values.index(max(values)) if kind == 0 else values.index(min(values))
    question = "Which fruit got the most votes?" if kind == 0 else "Which fruit got the fewest votes?"
    return DiagramQuestion(question, labels[pick], [label for label in labels if label != labels[pick]], difficulty=difficulty)


def draw_thermometer(image: Image.Image, rng: np.random.Generator) -> DiagramQuestion:
    """A vertical thermometer: ticks every 5 degrees, longer and labelled every 10 (20 or 50 on
    short tubes, where labels every 10 would overlap)."""
    draw = ImageDraw.Draw(image)
    width, height = image.size
    low, high = ((-20, 40), (0, 50), (-10, 50), (0, 100))[int(rng.integers(4))]
    font_size_px = int(rng.integers(8, 15))
    tube_w = max(6, int(min(width, height) * rng.uniform(0.04, 0.08)))
    bulb_px = tube_w * 0.9
    headroom_px = font_size_px + tube_w  # the top label and the tube's rounded end
    footroom_px = int(bulb_px * 1.6) + 3  # the bulb hangs below the scale's zero
    tube_px = max(40, int(height * rng.uniform(0.55, 0.95)) - headroom_px - footroom_px)
    top = int(rng.integers(headroom_px, max(headroom_px, height - tube_px - footroom_px) + 1))
    bottom = top + tube_px
    scale_bottom = bottom - bulb_px  # the scale starts above the bulb, so no reading hides in it
    x = int(rng.integers(tube_w + 30, width - tube_w - 10))
    reading = int(rng.integers(low // 5 + 1, high // 5)) * 5
    unit_px = (scale_bottom - top) / (high - low)
    tube = (x - tube_w / 2, top - tube_w / 2, x + tube_w / 2, bottom)
    draw.rounded_rectangle(tube, radius=tube_w / 2, fill=(245, 245, 245), outline=INK)
    red = jitter_rgb(rng, (220, 30, 30))
    draw.rectangle((x - tube_w / 4, scale_bottom - (reading - low) * unit_px, x + tube_w / 4, bottom), fill=red)
    draw.ellipse((x - bulb_px, bottom - bulb_px / 2, x + bulb_px, bottom + bulb_px * 1.5), fill=red, outline=INK)
    # Label every 10 degrees where the labels fit, else every 20 or 50 (never overlapping).
    label_h = text_ink_size("0", font_size_px)[1]
    label_step = next((step for step in (10, 20, 50) if step * unit_px >= label_h * 1.4), 50)
    for degrees in range(low, high + 1, 5):
        y = scale_bottom - (degrees - low) * unit_px
        major = degrees % 10 == 0
        tick_px = tube_w if major else tube_w // 2 + 1
        draw.line([(x - tube_w / 2 - tick_px, y), (x - tube_w / 2, y)], fill=INK, width=1)
        if degrees % label_step == 0:
            text_w, text_h = text_ink_size(str(degrees), font_size_px)
            draw_text(draw, str(degrees), (round(x - tube_w / 2 - tick_px - 3 - text_w), round(y - text_h / 2)), font_size_px, INK)
    options = numeric_options(rng, reading, 4, step=5, low=low)
    difficulty = {
        "font_size_px": font_size_px, "tube_length_px": tube_px, "px_per_5_degrees": round(5 * unit_px, 1),
        "label_step_degrees": label_step,
    }
    question = "What temperature does the thermometer show?"
    return DiagramQuestion(question, f"{reading}°C", [], [f"{o}°C" for o in options], difficulty)


def draw_balance(image: Image.Image, rng: np.random.Generator) -> DiagramQuestion:
    """A seesaw with a labelled weight on each end; the heavier end sits lower."""
    draw = ImageDraw.Draw(image)
    width, height = image.size
    left_kg = int(rng.integers(1, 10))
    right_kg = left_kg if rng.random() < 0.25 else int(rng.choice([k for k in range(1, 10) if k != left_kg]))
    tilt_deg = 0.0 if left_kg == right_kg else float(rng.uniform(3, 15))
    sign = 1 if left_kg > right_kg else -1  # +1: left end goes down
    beam_px = width * rng.uniform(0.6, 0.9)
    cx, cy = width / 2 + rng.uniform(-0.05, 0.05) * width, height * rng.uniform(0.5, 0.7)
    dx = beam_px / 2 * math.cos(math.radians(tilt_deg))
    dy = beam_px / 2 * math.sin(math.radians(tilt_deg)) * sign
    left_end, right_end = (cx - dx, cy + dy), (cx + dx, cy - dy)
    fulcrum_px = max(10, height * 0.12)
    fulcrum = [(cx, cy), (cx - fulcrum_px * 0.6, cy + fulcrum_px), (cx + fulcrum_px * 0.6, cy + fulcrum_px)]
    draw.polygon(fulcrum, fill=jitter_rgb(rng, (120, 120, 130)))
    draw.line([left_end, right_end], fill=jitter_rgb(rng, (110, 70, 30)), width=max(3, int(height * 0.02)))
    font_size_px = int(rng.integers(8, 15))
    block_px = max(14, int(min(width, height) * rng.uniform(0.08, 0.16)))
    for (ex, ey), kg in ((left_end, left_kg), (right_end, right_kg)):
        x0 = ex + (block_px * 0.1 if ex < cx else -block_px * 1.1)
        draw.rectangle((x0, ey - block_px - 2, x0 + block_px, ey - 2), fill=jitter_rgb(rng, (90, 110, 160)), outline=INK)
        text = f"{kg} kg"
        text_w, text_h = text_ink_size(text, font_size_px)
        draw_text(draw, text, (round(x0 + block_px / 2 - text_w / 2), round(ey - block_px - 6 - text_h)), font_size_px, INK)
    correct = "equal" if left_kg == right_kg else ("left" if left_kg > right_kg else "right")
    difficulty = {"font_size_px": font_size_px, "tilt_deg": round(tilt_deg, 1), "beam_length_px": round(beam_px)}
    return DiagramQuestion("Which side of the balance is heavier?", correct, [], ["left", "right", "equal"], difficulty)


def draw_circuit(image: Image.Image, rng: np.random.Generator) -> DiagramQuestion:
    """A battery, a bulb and a switch in one loop; the bulb lights only if the switch is closed."""
    draw = ImageDraw.Draw(image)
    width, height = image.size
    scale = float(rng.uniform(0.4, 0.95))
    loop_w, loop_h = width * scale, height * scale * 0.8
    x0 = rng.uniform(4, width - loop_w - 4)
    y0 = rng.uniform(4 + loop_h * 0.12, height - loop_h - 4)
    x1, y1 = x0 + loop_w, y0 + loop_h
    wire_px = max(1, int(round(min(width, height) * scale / 90)))
    closed = rng.random() < 0.5
    mid_y = (y0 + y1) / 2
    cell_px = max(6, loop_h * 0.08)
    switch_px = max(8, loop_h * 0.2)
    # Wires, leaving gaps for the battery (left side) and the switch (right side).
    draw.line([(x0, mid_y - cell_px / 2), (x0, y0), (x1, y0), (x1, mid_y - switch_px / 2)], fill=INK, width=wire_px)
    draw.line([(x1, mid_y + switch_px / 2), (x1, y1), (x0, y1), (x0, mid_y + cell_px / 2)], fill=INK, width=wire_px)
    plate_px = max(6, loop_w * 0.1)
    draw.line([(x0 - plate_px / 2, mid_y - cell_px / 2), (x0 + plate_px / 2, mid_y - cell_px / 2)], fill=INK, width=wire_px + 1)
    draw.line([(x0 - plate_px / 4, mid_y + cell_px / 2), (x0 + plate_px / 4, mid_y + cell_px / 2)], fill=INK, width=wire_px + 2)
    bulb_r = max(5, loop_h * 0.1)
    bx = (x0 + x1) / 2
    draw.ellipse((bx - bulb_r, y0 - bulb_r, bx + bulb_r, y0 + bulb_r), fill=(250, 250, 235), outline=INK, width=wire_px)
    k = bulb_r * 0.7
    draw.line([(bx - k, y0 - k), (bx + k, y0 + k)], fill=INK, width=1)
    draw.line([(bx - k, y0 + k), (bx + k, y0 - k)], fill=INK, width=1)
    top, bottom = (x1, mid_y - switch_px / 2), (x1, mid_y + switch_px / 2)
    dot = max(2, wire_px + 1)
    for px, py in (top, bottom):
        draw.ellipse((px - dot, py - dot, px + dot, py + dot), fill=INK)
    if closed:
        draw.line([bottom, top], fill=INK, width=wire_px)
    else:
        lever_deg = float(rng.uniform(20, 45))
        end = (x1 + switch_px * math.sin(math.radians(lever_deg)), bottom[1] - switch_px * math.cos(math.radians(lever_deg)))
        draw.line([bottom, end], fill=INK, width=wire_px)
    difficulty = {"circuit_width_px": round(loop_w), "wire_width_px": wire_px, "switch_length_px": round(switch_px)}
    return DiagramQuestion("Will the bulb light up?", "yes" if closed else "no", [], ["yes", "no"], difficulty)


DIAGRAMS = {
    "food_chain": draw_food_chain,
    "bar_chart": draw_bar_chart,
    "thermometer": draw_thermometer,
    "balance": draw_balance,
    "circuit": draw_circuit,
}
