"""LUT: a training-free table from profiles, one configuration per (task family, budget bucket).

For each family and each budget fraction the table holds the configuration with the best mean
profiled quality among those whose profiled violation rate (over the family's requests and the
recorded latency residuals) is at most `max_violation_rate`; when none is, the one with the smallest
expected relative overshoot of the budget (what the env's reward subtracts), which where every
configuration misses is the fastest relative to the budgets. At decision time a budget fraction is
mapped to the largest tabulated fraction not above it (a smaller budget than any tabulated one uses
the smallest), so an unseen budget never gets a configuration tabulated for a looser one.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from flexvlm_env.config import KnobGrid
from flexvlm_env.envs.core import DEFAULT_BUDGET_FRACTIONS, FAMILY_NAMES

from .base import Controller
from .profiles import ProfileTables

DEFAULT_MAX_VIOLATION_RATE = 0.05


def budget_buckets(budget_fraction: np.ndarray, fractions: np.ndarray) -> np.ndarray:
    """Index of the largest of `fractions` (sorted) that is <= each budget fraction (0 below all)."""
    bucket = np.searchsorted(fractions, np.asarray(budget_fraction, dtype=np.float64).reshape(-1) + 1e-6, side="right") - 1
    return np.clip(bucket, 0, len(fractions) - 1)


class LUTController(Controller):
    kind = "lut"

    def __init__(self, table: np.ndarray, fractions: Sequence[float], grid: KnobGrid | None = None,
                 max_violation_rate: float = DEFAULT_MAX_VIOLATION_RATE):
        super().__init__(grid)
        self.table = np.asarray(table, dtype=np.int64)
        self.fractions = np.asarray(sorted(float(f) for f in fractions), dtype=np.float64)
        if self.table.shape != (len(FAMILY_NAMES), len(self.fractions)):
            raise ValueError(f"table has shape {self.table.shape}, expected ({len(FAMILY_NAMES)}, {len(self.fractions)})")
        outside = (self.table < 0) | (self.table >= len(self.grid))
        if outside.any():
            raise ValueError(f"table holds config indices {np.unique(self.table[outside])[:5].tolist()}; allowed: "
                             f"[0, {len(self.grid)}) (the indices of the grid's {len(self.grid)} configurations)")
        self.max_violation_rate = max_violation_rate

    @classmethod
    def fit(cls, profiles: ProfileTables, budget_fractions: Sequence[float] = DEFAULT_BUDGET_FRACTIONS,
            max_violation_rate: float = DEFAULT_MAX_VIOLATION_RATE) -> LUTController:
        if not 0.0 <= max_violation_rate <= 1.0:
            raise ValueError(f"max_violation_rate={max_violation_rate!r} must be in [0, 1]")
        fractions = sorted(float(f) for f in budget_fractions)
        # Families the profiles never saw get the fastest configuration on average (the safe choice).
        fastest = int(np.argmin(profiles.latency_ms.mean(axis=0)))
        table = np.full((len(FAMILY_NAMES), len(fractions)), fastest, dtype=np.int64)
        for f in np.unique(profiles.family_index):
            rows = profiles.family_index == f
            latency = profiles.latency_ms[rows][:, :, None] * profiles.noise_factor[None]  # [r, C, M]
            quality = profiles.quality[rows].mean(axis=0)
            mean_latency = profiles.latency_ms[rows].mean(axis=0)
            for b, fraction in enumerate(fractions):
                budget = fraction * profiles.reference_ms[rows]
                violation = (latency > budget[:, None, None]).mean(axis=(0, 2))
                feasible = violation <= max_violation_rate
                if feasible.any():
                    # best quality, then the faster of equals
                    key = np.lexsort((mean_latency, -np.where(feasible, quality, -np.inf)))
                else:
                    # No configuration meets the bound: the smallest expected overshoot (the env's
                    # penalty), then the fastest. The fewest violations would favour a configuration
                    # whose latency spreads wide, often a slower one, so a tighter budget could get a
                    # slower configuration than a looser one.
                    overshoot = np.maximum(latency / budget[:, None, None] - 1.0, 0.0).mean(axis=(0, 2))
                    key = np.lexsort((mean_latency, overshoot))
                table[f, b] = key[0]
        return cls(table, fractions, profiles.grid, max_violation_rate)

    def select_indices(self, observations):
        family = np.asarray(observations["family"], dtype=np.int64).reshape(-1)
        return self.table[family, budget_buckets(observations["budget_fraction"], self.fractions)]

    def state(self):
        return {"fractions": self.fractions.tolist(), "max_violation_rate": self.max_violation_rate}, {
            "table": torch.from_numpy(self.table)
        }

    @classmethod
    def from_state(cls, config, tensors, grid):
        return cls(tensors["table"].numpy(), config["fractions"], grid, config["max_violation_rate"])
