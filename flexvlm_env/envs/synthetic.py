"""A synthetic `ReplayData` with the shape and structure of the recorded tables.

It stands in for the shipped profile tables where a known, self-contained table is wanted: the
environment tests (including a learning test, where the best configuration must be known), the
doctests, and the replay throughput benchmark (which needs the shipped size, 1800 requests x 140
configurations, before the recorded tables exist). Nothing in it is a measurement: each request
gets a hidden difficulty, a configuration's "capacity" grows with its knobs, an answer is right
when the capacity clears the difficulty, and latency grows with crops, top_k and depth in the
proportions of a MolmoE request. `metadata["source"] == "synthetic"` says so.
"""
from __future__ import annotations

import numpy as np

from ..config import KnobGrid
from ..features import IMAGE_FEATURES, PROMPT_FEATURES
from ..profiles.replay import STAGE_COLUMNS, ReplayData
from .core import FAMILY_NAMES, check_families, check_grid, check_positive_int


def synthetic_replay_data(
    n_requests: int = 1800,
    grid: KnobGrid | None = None,
    families=None,
    repeats: int = 5,
    seed: int = 0,
) -> ReplayData:
    """A `ReplayData` of `n_requests` requests (spread evenly over `families`) on `grid`.

    Args:
        n_requests: number of requests (the shipped tables hold 1800: 200 per family).
        grid: knob grid (default: the 7 x 4 x 5 grid).
        families: families to cover (default: all nine).
        repeats: recorded latency residuals per configuration (the noise the replay resamples).
        seed: seed of every random choice; the same seed gives the same tables.
    """
    n_requests = check_positive_int("n_requests", n_requests)
    repeats = check_positive_int("repeats", repeats)
    grid = check_grid(grid)
    families = check_families(families)
    rng = np.random.default_rng(seed)
    n_configs = len(grid)
    family_of = np.arange(n_requests) % len(families)
    family_names = tuple(families[i] for i in family_of)
    counters: dict[str, int] = {}
    request_ids = []
    for name in family_names:
        request_ids.append(f"{name}/synthetic/val/{counters.get(name, 0)}")
        counters[name] = counters.get(name, 0) + 1

    configs = grid.configs()
    crops = np.array([c.crops for c in configs], dtype=np.float64)
    top_k = np.array([c.top_k for c in configs], dtype=np.float64)
    blocks = np.array([c.active_blocks for c in configs], dtype=np.float64)
    # Capacity in (0, 1]: the geometric mean of each knob relative to its largest grid value.
    capacity = np.cbrt(crops / max(grid.crops) * top_k / max(grid.top_k) * blocks / max(grid.active_blocks))
    difficulty = rng.uniform(0.2, 1.0, n_requests)
    margin = capacity[None, :] - difficulty[:, None] + rng.normal(0, 0.05, (n_requests, n_configs))
    quality = (1.0 / (1.0 + np.exp(-25.0 * margin))).astype(np.float32)
    right = quality >= 0.5
    answers = np.where(right, np.array([f"answer {i}" for i in range(n_requests)], dtype=object)[:, None], "wrong")

    # Per-family scale (captions decode longest), then stage shares of a MolmoE request.
    family_scale = {name: 1.0 + 0.15 * i for i, name in enumerate(FAMILY_NAMES)}
    scale = np.array([family_scale[name] for name in family_names])[:, None] * rng.uniform(0.9, 1.1, (n_requests, 1))
    vision_ms = 4.0 * (1 + crops)[None, :] * scale
    depth = (blocks / max(grid.active_blocks))[None, :]
    width = (0.4 + 0.6 * top_k / max(grid.top_k))[None, :]
    prefill_ms = (10.0 + 1.2 * crops[None, :]) * depth * width * scale
    output_tokens = rng.integers(2, 16, (n_requests, n_configs)).astype(np.int32)
    decode_ms = output_tokens * 1.5 * depth * width * scale
    stage_ms = np.stack(
        [np.full_like(vision_ms, 1.0), vision_ms, 0.05 * vision_ms, prefill_ms, decode_ms], axis=-1
    ).astype(np.float32)
    assert stage_ms.shape[-1] == len(STAGE_COLUMNS)
    total_ms = stage_ms.sum(axis=-1)
    noise = rng.normal(0.0, 0.03, (n_configs, repeats))
    noise -= np.median(noise, axis=1, keepdims=True)  # residuals are relative to the median

    prompt = np.stack(
        [rng.integers(20, 120, n_requests), rng.integers(4, 25, n_requests), rng.integers(0, 4, n_requests), rng.integers(0, 5, n_requests)],
        axis=1,
    ).astype(np.float32)
    width_px = rng.choice([240.0, 288.0, 320.0, 384.0], n_requests)
    height_px = rng.choice([216.0, 240.0, 288.0, 320.0, 384.0], n_requests)
    image = np.stack(
        [width_px, height_px, width_px / height_px, rng.uniform(0.1, 0.4, n_requests), 0.3 * difficulty, 0.5 * difficulty],
        axis=1,
    ).astype(np.float32)
    assert prompt.shape[1] == len(PROMPT_FEATURES) and image.shape[1] == len(IMAGE_FEATURES)
    return ReplayData(
        grid=grid,
        request_ids=tuple(request_ids),
        families=family_names,
        prompt_features=prompt,
        image_features=image,
        quality=quality,
        answers=answers,
        output_tokens=output_tokens,
        stage_ms=stage_ms,
        total_ms=total_ms,
        noise_log_ratio=noise.astype(np.float32),
        metadata={"source": "synthetic", "seed": seed, "n_requests": n_requests, "repeats": repeats},
    )
