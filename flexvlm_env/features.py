"""Cheap per-request features a controller sees before choosing a configuration.

A controller must decide in well under 1% of a request's latency, so these features are what can
be computed from the request in about a millisecond on a CPU: the prompt's length and form, and the
image's size and how much fine detail it holds (text and many small objects are what make extra
crops worth their cost). The same function feeds the live environment (timed there as controller
overhead) and the recorded tables (stored once per request, so the replay environment reads them).
"""
from __future__ import annotations

import re

import numpy as np
from PIL import Image

PROMPT_FEATURES = ("prompt_chars", "prompt_words", "prompt_digits", "prompt_options")
IMAGE_FEATURES = ("image_width_px", "image_height_px", "image_aspect", "image_contrast", "image_detail", "image_edge_frac")
_THUMB_PX = 64
_OPTION = re.compile(r"(?m)^\s*(?:\(?[A-Ha-h][\).:]|\d+[\).])\s")


def prompt_features(prompt: str) -> np.ndarray:
    """[chars, words, digits, options]: length and form of the question (option lists mark the
    multiple-choice families, digits the counting and document ones)."""
    if not isinstance(prompt, str):
        raise ValueError(f"prompt must be a str, got {type(prompt).__name__}")
    return np.array(
        [len(prompt), len(prompt.split()), sum(c.isdigit() for c in prompt), len(_OPTION.findall(prompt))],
        dtype=np.float32,
    )


def image_features(image: Image.Image) -> np.ndarray:
    """[width px, height px, aspect, contrast, detail, edge fraction] from a 64x64 grayscale thumbnail.

    `detail` is the mean absolute difference between neighbouring thumbnail pixels (in [0, 1]):
    small text and clutter raise it. `edge_frac` is the fraction of neighbour differences above
    0.1, which separates a few large shapes from many small ones at similar mean detail.
    """
    if not isinstance(image, Image.Image):
        raise ValueError(f"image must be a PIL.Image.Image, got {type(image).__name__}")
    width, height = image.size
    thumb = np.asarray(image.convert("L").resize((_THUMB_PX, _THUMB_PX), Image.BILINEAR), dtype=np.float32) / 255.0
    dx = np.abs(np.diff(thumb, axis=1))
    dy = np.abs(np.diff(thumb, axis=0))
    detail = 0.5 * (dx.mean() + dy.mean())
    edge_frac = 0.5 * ((dx > 0.1).mean() + (dy > 0.1).mean())
    return np.array([width, height, width / height, thumb.std(), detail, edge_frac], dtype=np.float32)


def request_features(image: Image.Image, prompt: str) -> dict[str, float]:
    """Both feature vectors as a name -> value dict (the column layout of the recorded tables)."""
    values = np.concatenate([prompt_features(prompt), image_features(image)])
    return dict(zip(PROMPT_FEATURES + IMAGE_FEATURES, (float(v) for v in values)))
