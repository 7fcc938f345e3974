"""Icon-like drawings of everyday objects, built from Pillow primitives.

Each icon fills a square box and is recognisable at about 16 px and above. Coordinates are written
in unit-box fractions (0..1) so one drawing scales to any size. `okvqa` asks questions about the
facts these objects carry; the drawings only have to make the object recognisable.
"""
from __future__ import annotations

from typing import Callable

import numpy as np
from PIL import ImageDraw

from .render import RGB, Box, jitter_rgb

DrawFn = Callable[[ImageDraw.ImageDraw, "Unit", np.random.Generator], None]


class Unit:
    """Maps unit-box coordinates (0..1) to the pixels of `box`; `bg` is the background colour."""

    def __init__(self, box: Box, bg: RGB):
        self.x0, self.y0 = box[0], box[1]
        self.side = min(box[2] - box[0], box[3] - box[1])
        self.bg = bg

    def xy(self, *points: float) -> list[tuple[float, float]]:
        return [(self.x0 + points[i] * self.side, self.y0 + points[i + 1] * self.side) for i in range(0, len(points), 2)]

    def rect(self, x0: float, y0: float, x1: float, y1: float) -> tuple[float, float, float, float]:
        (a, b), (c, d) = self.xy(x0, y0, x1, y1)
        return a, b, c, d

    def width(self, fraction: float) -> int:
        return max(1, round(fraction * self.side))


def _sun(d, u, rng):
    colour = jitter_rgb(rng, (250, 200, 20))
    for k in range(8):
        angle = k * np.pi / 4
        c, s = np.cos(angle), np.sin(angle)
        d.line(u.xy(0.5 + 0.32 * c, 0.5 + 0.32 * s, 0.5 + 0.48 * c, 0.5 + 0.48 * s), fill=colour, width=u.width(0.06))
    d.ellipse(u.rect(0.25, 0.25, 0.75, 0.75), fill=colour)


def _moon(d, u, rng):
    d.ellipse(u.rect(0.1, 0.1, 0.9, 0.9), fill=jitter_rgb(rng, (240, 220, 120)))
    d.ellipse(u.rect(0.32, 0.02, 1.0, 0.8), fill=u.bg)  # bite out a crescent


def _tree(d, u, rng):
    d.rectangle(u.rect(0.42, 0.55, 0.58, 1.0), fill=jitter_rgb(rng, (120, 75, 30)))
    d.ellipse(u.rect(0.12, 0.0, 0.88, 0.7), fill=jitter_rgb(rng, (40, 150, 50)))


def _flower(d, u, rng):
    d.line(u.xy(0.5, 0.5, 0.5, 1.0), fill=(40, 140, 40), width=u.width(0.06))
    petal = jitter_rgb(rng, ((230, 60, 120), (200, 60, 200), (240, 90, 60))[int(rng.integers(3))])
    for k in range(5):
        angle = k * 2 * np.pi / 5
        cx, cy = 0.5 + 0.2 * np.cos(angle), 0.3 + 0.2 * np.sin(angle)
        d.ellipse(u.rect(cx - 0.13, cy - 0.13, cx + 0.13, cy + 0.13), fill=petal)
    d.ellipse(u.rect(0.4, 0.2, 0.6, 0.4), fill=(250, 210, 30))


def _apple(d, u, rng):
    d.ellipse(u.rect(0.1, 0.22, 0.9, 0.98), fill=jitter_rgb(rng, (210, 30, 30)))
    d.line(u.xy(0.5, 0.3, 0.55, 0.05), fill=(100, 60, 20), width=u.width(0.06))
    d.ellipse(u.rect(0.56, 0.05, 0.82, 0.2), fill=(50, 150, 40))


def _carrot(d, u, rng):
    d.polygon(u.xy(0.3, 0.3, 0.7, 0.3, 0.5, 1.0), fill=jitter_rgb(rng, (245, 125, 20)))
    for dx in (-0.12, 0.0, 0.12):
        d.line(u.xy(0.5, 0.3, 0.5 + dx * 1.5, 0.02), fill=(40, 150, 40), width=u.width(0.07))


def _cheese(d, u, rng):
    d.polygon(u.xy(0.05, 0.85, 0.95, 0.85, 0.95, 0.25), fill=jitter_rgb(rng, (245, 205, 60)))
    for cx, cy, r in ((0.7, 0.65, 0.07), (0.83, 0.48, 0.05), (0.5, 0.74, 0.05)):
        d.ellipse(u.rect(cx - r, cy - r, cx + r, cy + r), fill=(215, 170, 40))


def _fish(d, u, rng):
    body = jitter_rgb(rng, ((250, 140, 30), (60, 120, 220), (120, 120, 140))[int(rng.integers(3))])
    d.polygon(u.xy(0.72, 0.5, 1.0, 0.22, 1.0, 0.78), fill=body)
    d.ellipse(u.rect(0.0, 0.25, 0.8, 0.75), fill=body)
    d.ellipse(u.rect(0.16, 0.38, 0.26, 0.48), fill=(20, 20, 20))


def _bird(d, u, rng):
    body = jitter_rgb(rng, ((60, 110, 210), (200, 50, 40), (90, 90, 90))[int(rng.integers(3))])
    d.ellipse(u.rect(0.1, 0.35, 0.75, 0.8), fill=body)
    d.ellipse(u.rect(0.55, 0.15, 0.88, 0.48), fill=body)
    d.polygon(u.xy(0.86, 0.28, 1.0, 0.34, 0.86, 0.4), fill=(250, 170, 20))
    d.ellipse(u.rect(0.7, 0.24, 0.77, 0.31), fill=(20, 20, 20))
    d.polygon(u.xy(0.2, 0.5, 0.5, 0.5, 0.3, 0.25), fill=jitter_rgb(rng, (40, 40, 40)))
    d.line(u.xy(0.4, 0.8, 0.38, 0.98), fill=(200, 120, 20), width=u.width(0.04))
    d.line(u.xy(0.5, 0.8, 0.52, 0.98), fill=(200, 120, 20), width=u.width(0.04))


def _car(d, u, rng):
    body = jitter_rgb(rng, ((210, 40, 40), (40, 90, 210), (40, 150, 60))[int(rng.integers(3))])
    d.rectangle(u.rect(0.22, 0.28, 0.72, 0.52), fill=body)
    d.rectangle(u.rect(0.3, 0.33, 0.64, 0.5), fill=(180, 220, 250))
    d.rectangle(u.rect(0.0, 0.5, 1.0, 0.78), fill=body)
    for cx in (0.24, 0.76):
        d.ellipse(u.rect(cx - 0.13, 0.66, cx + 0.13, 0.92), fill=(25, 25, 25))


def _boat(d, u, rng):
    d.polygon(u.xy(0.0, 0.68, 1.0, 0.68, 0.82, 0.92, 0.18, 0.92), fill=jitter_rgb(rng, (130, 80, 40)))
    d.line(u.xy(0.5, 0.05, 0.5, 0.68), fill=(60, 40, 20), width=u.width(0.05))
    d.polygon(u.xy(0.54, 0.08, 0.54, 0.62, 0.92, 0.62), fill=jitter_rgb(rng, (235, 235, 235)), outline=(80, 80, 80))


def _house(d, u, rng):
    d.rectangle(u.rect(0.15, 0.45, 0.85, 1.0), fill=jitter_rgb(rng, (230, 200, 150)))
    d.polygon(u.xy(0.02, 0.48, 0.5, 0.05, 0.98, 0.48), fill=jitter_rgb(rng, (170, 50, 40)))
    d.rectangle(u.rect(0.42, 0.68, 0.58, 1.0), fill=(110, 70, 30))
    d.rectangle(u.rect(0.22, 0.55, 0.36, 0.68), fill=(150, 200, 240))


def _umbrella(d, u, rng):
    canopy = ((200, 40, 120), (40, 90, 200), (230, 120, 20))[int(rng.integers(3))]
    d.pieslice(u.rect(0.0, 0.05, 1.0, 0.95), 180, 360, fill=jitter_rgb(rng, canopy))
    d.line(u.xy(0.5, 0.5, 0.5, 0.92), fill=(50, 50, 50), width=u.width(0.05))
    d.arc(u.rect(0.3, 0.8, 0.5, 1.0), 0, 180, fill=(50, 50, 50), width=u.width(0.05))


def _cup(d, u, rng):
    d.arc(u.rect(0.6, 0.4, 0.92, 0.75), 270, 90, fill=(60, 60, 60), width=u.width(0.07))
    d.rectangle(u.rect(0.15, 0.3, 0.72, 0.9), fill=jitter_rgb(rng, (240, 240, 240)), outline=(60, 60, 60), width=u.width(0.04))
    d.rectangle(u.rect(0.2, 0.34, 0.67, 0.45), fill=(110, 70, 40))  # coffee seen at the rim


def _clock(d, u, rng):
    d.ellipse(u.rect(0.05, 0.05, 0.95, 0.95), fill=(250, 250, 250), outline=jitter_rgb(rng, (40, 40, 40)), width=u.width(0.06))
    for k in range(12):
        angle = k * np.pi / 6
        c, s = np.cos(angle), np.sin(angle)
        d.line(u.xy(0.5 + 0.36 * c, 0.5 + 0.36 * s, 0.5 + 0.42 * c, 0.5 + 0.42 * s), fill=(40, 40, 40), width=u.width(0.03))
    hour, minute = rng.uniform(0, 2 * np.pi, size=2)
    d.line(u.xy(0.5, 0.5, 0.5 + 0.22 * np.sin(hour), 0.5 - 0.22 * np.cos(hour)), fill=(20, 20, 20), width=u.width(0.06))
    d.line(u.xy(0.5, 0.5, 0.5 + 0.34 * np.sin(minute), 0.5 - 0.34 * np.cos(minute)), fill=(20, 20, 20), width=u.width(0.04))


def _snowman(d, u, rng):
    outline = (90, 90, 110)
    for box in ((0.15, 0.45, 0.85, 1.0), (0.25, 0.2, 0.75, 0.6), (0.33, 0.0, 0.67, 0.3)):
        d.ellipse(u.rect(*box), fill=(250, 250, 252), outline=outline, width=u.width(0.03))
    d.polygon(u.xy(0.5, 0.14, 0.68, 0.17, 0.5, 0.2), fill=(245, 120, 20))
    for cx in (0.44, 0.56):
        d.ellipse(u.rect(cx - 0.025, 0.08, cx + 0.025, 0.12), fill=(20, 20, 20))


def _traffic_light(lit: str) -> DrawFn:
    lamps = {"red": (230, 30, 30), "yellow": (250, 200, 20), "green": (30, 200, 60)}

    def draw(d, u, rng):
        d.rectangle(u.rect(0.3, 0.0, 0.7, 0.9), fill=jitter_rgb(rng, (45, 45, 45)))
        d.line(u.xy(0.5, 0.9, 0.5, 1.0), fill=(45, 45, 45), width=u.width(0.08))
        for row, name in enumerate(("red", "yellow", "green")):
            cy = 0.15 + row * 0.3
            fill = lamps[name] if name == lit else (85, 85, 85)
            d.ellipse(u.rect(0.38, cy - 0.12, 0.62, cy + 0.12), fill=fill)

    return draw


ICONS: dict[str, DrawFn] = {
    "sun": _sun, "moon": _moon, "tree": _tree, "flower": _flower, "apple": _apple, "carrot": _carrot,
    "cheese": _cheese, "fish": _fish, "bird": _bird, "car": _car, "boat": _boat, "house": _house,
    "umbrella": _umbrella, "cup": _cup, "clock": _clock, "snowman": _snowman,
    "red traffic light": _traffic_light("red"), "yellow traffic light": _traffic_light("yellow"),
    "green traffic light": _traffic_light("green"),
}


def draw_icon(draw: ImageDraw.ImageDraw, name: str, box: Box, background_rgb: RGB, rng: np.random.Generator) -> None:
    """Draw icon `name` (a key of `ICONS`) in the square `box` on a background of `background_rgb`."""
    ICONS[name](draw, Unit(box, background_rgb), rng)
