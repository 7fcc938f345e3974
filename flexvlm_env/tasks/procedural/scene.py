"""Scenes of coloured shapes: the world of the attribute, caption, counting and multi-step families.

A scene is a list of `ShapeObject`s (shape, colour name, box) on a pale background. Objects are
placed without overlap, so every object is fully visible and questions about them have one answer;
answers are always computed from the objects actually placed (placement may shrink or drop
objects that do not fit).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw

from .layout import place_boxes
from .render import Box, draw_shape, jitter_rgb
from .vocab import BACKGROUNDS_RGB, COLOURS_RGB

CLUTTER_SHAPES = ("circle", "triangle", "star", "hexagon")  # never a rectangle, which reads as a sign


@dataclass(frozen=True)
class ShapeObject:
    shape: str
    colour: str
    box: Box

    @property
    def size_px(self) -> int:
        return min(self.box[2] - self.box[0], self.box[3] - self.box[1])

    @property
    def center(self) -> tuple[float, float]:
        return (self.box[0] + self.box[2]) / 2, (self.box[1] + self.box[3]) / 2


def new_background(rng: np.random.Generator, size_wh: tuple[int, int]) -> tuple[Image.Image, str]:
    """A blank canvas of a random pale background; returns (image, background name)."""
    names = tuple(BACKGROUNDS_RGB)
    name = names[int(rng.integers(len(names)))]
    return Image.new("RGB", size_wh, jitter_rgb(rng, BACKGROUNDS_RGB[name], amount=4)), name


def scatter(
    rng: np.random.Generator,
    size_wh: tuple[int, int],
    specs: Sequence[tuple[str, str, int]],
    *,
    min_side_px: int | None = 4,
    gap_px: int = 3,
) -> list[ShapeObject]:
    """Place (shape, colour, size_px) specs in order; specs that do not fit are dropped."""
    boxes = place_boxes(rng, size_wh, [(size, size) for _, _, size in specs], gap_px=gap_px, min_side_px=min_side_px)
    return [ShapeObject(shape, colour, box) for (shape, colour, _), box in zip(specs, boxes) if box is not None]


def draw_objects(image: Image.Image, rng: np.random.Generator, objects: Sequence[ShapeObject]) -> None:
    """Draw `objects` with slightly jittered colours (names stay unambiguous)."""
    draw = ImageDraw.Draw(image)
    for obj in objects:
        draw_shape(draw, obj.shape, obj.box, jitter_rgb(rng, COLOURS_RGB[obj.colour]))


def draw_clutter_shapes(
    draw: ImageDraw.ImageDraw, rng: np.random.Generator, size_wh: tuple[int, int], count: int, occupied: Sequence[Box]
) -> int:
    """Draw up to `count` small untexted shapes (6..30 px) clear of `occupied`; returns how many fit.
    Text families use them as clutter: they compete for attention but carry no answer."""
    sizes_px = [int(rng.integers(6, 31)) for _ in range(count)]
    drawn = 0
    for box in place_boxes(rng, size_wh, [(s, s) for s in sizes_px], occupied=occupied, gap_px=2):
        if box is None:
            continue
        colour = tuple(COLOURS_RGB)[int(rng.integers(len(COLOURS_RGB)))]
        shape = CLUTTER_SHAPES[int(rng.integers(len(CLUTTER_SHAPES)))]
        draw_shape(draw, shape, box, jitter_rgb(rng, COLOURS_RGB[colour]))
        drawn += 1
    return drawn
