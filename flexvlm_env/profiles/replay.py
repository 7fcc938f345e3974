"""What the replay environment reads: recorded quality and latency as arrays [request, config].

`ReplayData` joins a quality table (answer and metric score of every request at every grid
configuration) with a latency source (recorded GPU measurements of the same requests, or stage
tables composed from each request's token counts) into dense arrays, so that one environment step
is a few array lookups. Latency noise is resampled from the recorded repeats: `noise_log_ratio[c]`
holds log(repeat / median of its (request, config)) for the repeated subset, and a step multiplies
the median by exp of one of them, drawn with the environment's RNG (so replay is deterministic
given the seed).

Config index `c` is the row-major position in `grid.configs()` (crops, top_k, active_blocks).
"""
from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from ..config import Config, KnobGrid
from ..features import IMAGE_FEATURES, PROMPT_FEATURES
from ..model.timing import STAGE_FIELDS
from ..tasks.families import FAMILIES

STAGE_COLUMNS = STAGE_FIELDS  # column order of `stage_ms`
REQUEST_SPLITS = ("all", "train", "heldout")
HELDOUT_FRACTION = 0.5


def request_split_mask(request_ids: Sequence[str], families: Sequence[str], split: str) -> np.ndarray:
    """bool[R]: the requests of `split` ("all", "train" or "heldout") of a recorded pool.

    The recorded pool is one procedural split (val), so controllers that learn from profiles need
    their own train/held-out partition of it. Within each family, requests are ranked by a hash of
    their id and the first half is held out: the partition is balanced per family and never changes
    with the order of the table. Tables of the same requests put each id on the same side; a table of
    another subset of them may not (the halves are cut by rank within the table), so a controller
    trained on one table's train half is evaluated on another table's held-out half only when both
    hold the same requests (the shipped tables all hold the procedural val pool).
    """
    if split not in REQUEST_SPLITS:
        raise ValueError(f"split={split!r} is not known; allowed: {list(REQUEST_SPLITS)}")
    mask = np.ones(len(request_ids), dtype=bool)
    if split == "all":
        return mask
    heldout = np.zeros(len(request_ids), dtype=bool)
    families = np.asarray(families)
    for family in sorted(set(families.tolist())):
        members = np.flatnonzero(families == family)
        order = sorted(members.tolist(), key=lambda i: hashlib.sha256(request_ids[i].encode()).hexdigest())
        heldout[order[: int(round(len(order) * HELDOUT_FRACTION))]] = True
    return heldout if split == "heldout" else ~heldout


@dataclass(frozen=True, eq=False)
class ReplayData:
    """Dense recorded tables for `FlexVLMReplay-v0` (see module docstring).

    Attributes:
        grid: the knob grid the tables cover; config index c is `grid.configs()[c]`.
        request_ids: `family/source/split/index` of each request (R of them).
        families: family name of each request.
        prompt_features: float32 [R, len(PROMPT_FEATURES)].
        image_features: float32 [R, len(IMAGE_FEATURES)].
        quality: float32 [R, C], the family metric of the recorded answer, in [0, 1].
        answers: object [R, C], the recorded answer text.
        output_tokens: int32 [R, C], tokens generated (EOS included) in the latency source.
        stage_ms: float32 [R, C, 5], median stage times in `STAGE_COLUMNS` order.
        total_ms: float32 [R, C], median end-to-end time.
        noise_log_ratio: float32 [C, M], recorded log(repeat / median) residuals per config (M >= 1;
            zeros mean no noise).
        metadata: what produced the tables (quality source, latency source, device, versions).
    """

    grid: KnobGrid
    request_ids: tuple[str, ...]
    families: tuple[str, ...]
    prompt_features: np.ndarray
    image_features: np.ndarray
    quality: np.ndarray
    answers: np.ndarray
    output_tokens: np.ndarray
    stage_ms: np.ndarray
    total_ms: np.ndarray
    noise_log_ratio: np.ndarray
    metadata: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        n_req, n_cfg = len(self.request_ids), len(self.grid)
        expected = {
            "prompt_features": (n_req, len(PROMPT_FEATURES)),
            "image_features": (n_req, len(IMAGE_FEATURES)),
            "quality": (n_req, n_cfg),
            "answers": (n_req, n_cfg),
            "output_tokens": (n_req, n_cfg),
            "stage_ms": (n_req, n_cfg, len(STAGE_COLUMNS)),
            "total_ms": (n_req, n_cfg),
        }
        if n_req == 0:
            raise ValueError("ReplayData needs at least one request")
        if len(self.families) != n_req:
            raise ValueError(f"families has {len(self.families)} entries for {n_req} requests")
        unknown = sorted(set(self.families) - set(FAMILIES))
        if unknown:
            raise ValueError(f"families {unknown} are not known; expected names from {sorted(FAMILIES)}")
        for name, shape in expected.items():
            got = getattr(self, name).shape
            if got != shape:
                raise ValueError(f"ReplayData.{name} has shape {got}, expected {shape}")
        if self.noise_log_ratio.ndim != 2 or self.noise_log_ratio.shape[0] != n_cfg or self.noise_log_ratio.shape[1] < 1:
            raise ValueError(f"ReplayData.noise_log_ratio has shape {self.noise_log_ratio.shape}, expected ({n_cfg}, M>=1)")
        if not np.isfinite(self.quality).all() or self.quality.min() < 0 or self.quality.max() > 1:
            raise ValueError("ReplayData.quality must be finite and in [0, 1]")
        if not np.isfinite(self.total_ms).all() or self.total_ms.min() <= 0:
            raise ValueError("ReplayData.total_ms must be finite and > 0")

    @property
    def n_requests(self) -> int:
        return len(self.request_ids)

    @property
    def full_index(self) -> int:
        """Config index of the full configuration (the grid's largest value of every knob)."""
        return len(self.grid) - 1

    def config_index(self, config: Config) -> int:
        """Index of `config` in the grid, or a ValueError naming the knob that is off the grid."""
        values = (config.crops, config.top_k, config.active_blocks)
        index = []
        for name, value, allowed in zip(("crops", "top_k", "active_blocks"), values, (self.grid.crops, self.grid.top_k, self.grid.active_blocks)):
            if value not in allowed:
                raise ValueError(f"{name}={value!r} is not on the recorded grid; allowed: {allowed}")
            index.append(allowed.index(value))
        return (index[0] * self.grid.shape[1] + index[1]) * self.grid.shape[2] + index[2]

    def family_full_latency_ms(self) -> dict[str, float]:
        """Median full-configuration latency of each family's requests (the budget reference)."""
        families = np.asarray(self.families)
        full = self.total_ms[:, self.full_index]
        return {f: float(np.median(full[families == f])) for f in sorted(set(self.families))}
