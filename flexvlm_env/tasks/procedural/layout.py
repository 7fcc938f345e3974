"""Image sizes and non-overlapping placement for the procedural families.

Image sizes mix aspect ratios (4:3, 3:4, 1:1, 16:9, 1:2, 2:1) so that the model's crop tiling
(rows x cols closest to the aspect ratio) varies from request to request. Placement draws a batch
of candidate positions at once and keeps the first that clears every placed box, which keeps a
scene of dozens of objects in the sub-millisecond range.
"""
from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np

from .render import Box

# (width, height) in pixels. Long sides 256..384 px: designed for the first micro, whose global view was
# 112 px and whose crops together saw up to about 224x280 px, so small content needed crops while large
# did not. The shipped micro's crops are 224 px (twice the canvas for the same crop count).
IMAGE_SIZES_PX: tuple[tuple[int, int], ...] = (
    (320, 240), (384, 288),  # 4:3
    (240, 320), (288, 384),  # 3:4
    (256, 256), (320, 320),  # 1:1
    (384, 216),              # 16:9
    (192, 384),              # 1:2
    (384, 192),              # 2:1
)


def sample_image_size(rng: np.random.Generator, sizes_px: Sequence[tuple[int, int]] = IMAGE_SIZES_PX) -> tuple[int, int]:
    """Draw one (width, height) uniformly from `sizes_px`."""
    width, height = sizes_px[int(rng.integers(len(sizes_px)))]
    return int(width), int(height)


def place_boxes(
    rng: np.random.Generator,
    canvas_wh: tuple[int, int],
    sizes_wh: Iterable[tuple[int, int]],
    *,
    gap_px: int = 3,
    margin_px: int = 4,
    occupied: Iterable[Box] = (),
    min_side_px: int | None = None,
    candidates: int = 48,
    rounds: int = 4,
) -> list[Box | None]:
    """Place boxes of the given sizes, in order, without overlap (at least `gap_px` apart).

    A box that finds no free spot is shrunk by 15% and retried while its short side stays
    >= `min_side_px`; with `min_side_px=None` it is never shrunk. A box that still does not fit
    comes back as None, so callers place must-have content first and compute answers from what
    was actually placed.
    """
    width, height = canvas_wh
    placed = np.array(list(occupied), dtype=np.int64).reshape(-1, 4)
    boxes: list[Box | None] = []
    for box_w, box_h in sizes_wh:
        box_w = min(int(box_w), width - 2 * margin_px)
        box_h = min(int(box_h), height - 2 * margin_px)
        found: Box | None = None
        while found is None:
            for _ in range(rounds):
                xs = rng.integers(margin_px, width - margin_px - box_w + 1, size=candidates)
                ys = rng.integers(margin_px, height - margin_px - box_h + 1, size=candidates)
                if placed.shape[0] == 0:
                    free = np.ones(candidates, dtype=bool)
                else:
                    overlap = (
                        (xs[:, None] < placed[:, 2] + gap_px)
                        & (xs[:, None] + box_w + gap_px > placed[:, 0])
                        & (ys[:, None] < placed[:, 3] + gap_px)
                        & (ys[:, None] + box_h + gap_px > placed[:, 1])
                    )
                    free = ~overlap.any(axis=1)
                if free.any():
                    i = int(free.argmax())
                    found = (int(xs[i]), int(ys[i]), int(xs[i]) + box_w, int(ys[i]) + box_h)
                    break
            if found is not None or min_side_px is None or min(box_w, box_h) * 0.85 < min_side_px:
                break
            box_w, box_h = max(1, round(box_w * 0.85)), max(1, round(box_h * 0.85))
        boxes.append(found)
        if found is not None:
            placed = np.vstack([placed, np.array(found, dtype=np.int64)[None]])
    return boxes
