"""Pillow drawing primitives shared by the procedural families.

Shapes, text (upright or rotated), arrows and clutter, all drawn with Pillow alone. Text uses
`PIL.ImageFont.load_default(size=N)`, the scalable TrueType font Pillow (>= 10.1) embeds, so the
package ships no font files. A label is positioned by its *ink* box (the tight box around the
glyphs), not by the font's origin, so that layout code reasons about the pixels a reader must
resolve; rows of a document share a baseline instead (`draw_text_line`).
"""
from __future__ import annotations

import math
from functools import lru_cache

import numpy as np
from PIL import Image, ImageDraw, ImageFont

Box = tuple[int, int, int, int]  # (x0, y0, x1, y1) in pixels, x1/y1 exclusive
RGB = tuple[int, int, int]


@lru_cache(maxsize=None)
def font(font_size_px: int) -> ImageFont.FreeTypeFont:
    """Pillow's embedded scalable font at `font_size_px` (cached: loading costs more than drawing)."""
    return ImageFont.load_default(size=font_size_px)


def jitter_rgb(rng: np.random.Generator, rgb: RGB, amount: int = 14) -> RGB:
    """`rgb` made lighter or darker by up to `amount` plus a third of that per channel, so no two
    renders share exact pixel values while the hue, and so the colour's name, stays the same
    (independent per-channel noise would turn gray into a brownish or bluish gray)."""
    shared = int(rng.integers(-amount, amount + 1))
    offsets = rng.integers(-(amount // 3), amount // 3 + 1, size=3)
    return tuple(int(min(255, max(0, channel + shared + offset))) for channel, offset in zip(rgb, offsets))


def text_on(rgb: RGB) -> RGB:
    """Black or white, whichever reads better on a fill of colour `rgb` (luma threshold)."""
    luma = 0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2]
    return (15, 15, 15) if luma > 150 else (250, 250, 250)


def _polygon(box: Box, corners: int, rotation_rad: float, inner_ratio: float | None = None) -> list[tuple[float, float]]:
    x0, y0, x1, y1 = box
    cx, cy = (x0 + x1 - 1) / 2, (y0 + y1 - 1) / 2
    radius = (min(x1 - x0, y1 - y0) - 1) / 2
    points = []
    steps = corners * 2 if inner_ratio else corners
    for step in range(steps):
        r = radius * (inner_ratio if inner_ratio and step % 2 else 1.0)
        angle = rotation_rad + 2 * math.pi * step / steps
        points.append((cx + r * math.cos(angle), cy + r * math.sin(angle)))
    return points


def draw_shape(draw: ImageDraw.ImageDraw, shape: str, box: Box, fill: RGB, outline: RGB | None = None) -> None:
    """Draw one vocabulary shape (`vocab.SHAPES`) filling `box`."""
    x0, y0, x1, y1 = box
    corners = (x0, y0, x1 - 1, y1 - 1)
    if shape == "circle":
        draw.ellipse(corners, fill=fill, outline=outline)
    elif shape == "square":
        draw.rectangle(corners, fill=fill, outline=outline)
    elif shape == "triangle":
        draw.polygon([((x0 + x1 - 1) / 2, y0), (x1 - 1, y1 - 1), (x0, y1 - 1)], fill=fill, outline=outline)
    elif shape == "diamond":
        cx, cy = (x0 + x1 - 1) / 2, (y0 + y1 - 1) / 2
        draw.polygon([(cx, y0), (x1 - 1, cy), (cx, y1 - 1), (x0, cy)], fill=fill, outline=outline)
    elif shape == "hexagon":
        draw.polygon(_polygon(box, 6, 0.0), fill=fill, outline=outline)
    elif shape == "star":
        draw.polygon(_polygon(box, 5, -math.pi / 2, inner_ratio=0.45), fill=fill, outline=outline)
    else:
        raise ValueError(f"shape={shape!r} is not drawable")


def text_ink_size(text: str, font_size_px: int) -> tuple[int, int]:
    """(width, height) in pixels of the ink box of `text` at `font_size_px`."""
    x0, y0, x1, y1 = font(font_size_px).getbbox(text)
    return x1 - x0, y1 - y0


def draw_text(draw: ImageDraw.ImageDraw, text: str, top_left: tuple[int, int], font_size_px: int, fill: RGB) -> None:
    """Draw `text` so that its ink box starts at `top_left`."""
    face = font(font_size_px)
    x0, y0, _, _ = face.getbbox(text)
    draw.text((top_left[0] - x0, top_left[1] - y0), text, font=face, fill=fill)


def draw_text_line(draw: ImageDraw.ImageDraw, text: str, top_left: tuple[int, int], font_size_px: int, fill: RGB) -> None:
    """Draw `text` with the font's ascender line at `top_left[1]`: texts drawn at the same y share
    a baseline (rows of a document), whatever letters they contain."""
    draw.text(top_left, text, font=font(font_size_px), fill=fill, anchor="la")


def text_patch(
    text: str,
    font_size_px: int,
    fill: RGB,
    angle_deg: float = 0.0,
    background: RGB | None = None,
    padding_px: int = 0,
) -> Image.Image:
    """An RGBA patch holding `text` (on an optional plate of colour `background`), rotated by
    `angle_deg` counter-clockwise. Paste it with `paste_patch`; its size is the rotated extent."""
    width_px, height_px = text_ink_size(text, font_size_px)
    patch = Image.new("RGBA", (width_px + 2 * padding_px, height_px + 2 * padding_px), (0, 0, 0, 0))
    draw = ImageDraw.Draw(patch)
    if background is not None:
        draw.rectangle((0, 0, patch.width - 1, patch.height - 1), fill=background + (255,))
    draw_text(draw, text, (padding_px, padding_px), font_size_px, fill + (255,))
    if angle_deg:
        patch = patch.rotate(angle_deg, resample=Image.Resampling.BICUBIC, expand=True)
    return patch


def fitting_text_patch(
    text: str,
    font_size_px: int,
    max_wh: tuple[int, int],
    fill: RGB,
    angle_deg: float = 0.0,
    background: RGB | None = None,
) -> tuple[Image.Image, int]:
    """`text_patch` at the largest font size <= `font_size_px` whose patch fits in `max_wh`;
    returns (patch, font size used). The plate padding scales with the font (a third of it)."""
    for size_px in range(font_size_px, 5, -1):
        patch = text_patch(text, size_px, fill, angle_deg, background, max(2, size_px // 3) if background else 0)
        if patch.width <= max_wh[0] and patch.height <= max_wh[1]:
            break
    return patch, size_px


def paste_patch(image: Image.Image, patch: Image.Image, top_left: tuple[int, int]) -> None:
    """Alpha-composite an RGBA `patch` onto the RGB `image` at `top_left`."""
    image.paste(patch, top_left, patch)


def draw_arrow(
    draw: ImageDraw.ImageDraw,
    start: tuple[float, float],
    end: tuple[float, float],
    fill: RGB,
    width_px: int = 2,
    head_px: int = 8,
) -> None:
    """A straight arrow from `start` to `end` with a filled triangular head at `end`."""
    dx, dy = end[0] - start[0], end[1] - start[1]
    length = math.hypot(dx, dy) or 1.0
    ux, uy = dx / length, dy / length
    base = (end[0] - ux * head_px, end[1] - uy * head_px)
    draw.line([start, base], fill=fill, width=width_px)
    half = head_px * 0.55
    draw.polygon(
        [end, (base[0] - uy * half, base[1] + ux * half), (base[0] + uy * half, base[1] - ux * half)],
        fill=fill,
    )


def draw_line_clutter(draw: ImageDraw.ImageDraw, rng: np.random.Generator, size_wh: tuple[int, int], count: int) -> None:
    """`count` muted line segments and dots: visual noise that is not a vocabulary shape, so it
    never changes the answer of a question about shapes."""
    width, height = size_wh
    for _ in range(count):
        tone = int(rng.integers(150, 215))
        rgb = jitter_rgb(rng, (tone, tone, tone), amount=20)
        x, y = float(rng.uniform(0, width)), float(rng.uniform(0, height))
        if rng.random() < 0.6:
            length = float(rng.uniform(8, 50))
            angle = float(rng.uniform(0, math.pi))
            end = (x + length * math.cos(angle), y + length * math.sin(angle))
            draw.line([(x, y), end], fill=rgb, width=int(rng.integers(1, 3)))
        else:
            radius = float(rng.uniform(1, 3))
            draw.ellipse((x - radius, y - radius, x + radius, y + radius), fill=rgb)
