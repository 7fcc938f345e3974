"""Reward objects: what a step is worth, given the answer's quality, its latency and its budget.

As in CompilerGym, a reward is an object that says whether it is `deterministic` and
`platform_dependent`. Those class attributes describe the formula itself, which is a pure function
of (quality, latency, budget); whether the *env's* rewards are deterministic also depends on where
its latency comes from, so the environments combine both and report `env.reward_deterministic`
and `env.reward_platform_dependent` (the live env: measured latency, so False / True).

The same call works on Python floats (the single env) and NumPy arrays (the vectorized replay
env), so the two cannot drift apart.
"""
from __future__ import annotations

import math
import numbers

PENALTIES = ("linear", "squared")


class QualityMinusOvershoot:
    """`quality − λ · max(0, latency − budget) / budget` (DESIGN.md section 4).

    With `penalty="squared"` the relative overshoot is squared before weighting, which forgives
    small overshoots and punishes large ones harder.

    Example:
        >>> reward = QualityMinusOvershoot(lam=1.0)
        >>> reward(quality=0.8, latency_ms=150.0, budget_ms=100.0)  # 50 % over budget
        0.30000000000000004
        >>> reward(quality=0.8, latency_ms=90.0, budget_ms=100.0)  # within budget: quality only
        0.8
        >>> QualityMinusOvershoot(lam=2.0, penalty="squared")(1.0, 150.0, 100.0)
        0.5
    """

    deterministic = True  # a pure function of its three inputs
    platform_dependent = False

    def __init__(self, lam: float = 1.0, penalty: str = "linear"):
        # numbers.Real: NumPy scalars too (a float32 read from a table is a natural lam)
        if isinstance(lam, bool) or not isinstance(lam, numbers.Real) or not math.isfinite(lam) or lam < 0:
            raise ValueError(f"lam={lam!r} must be a finite number >= 0")
        if penalty not in PENALTIES:
            raise ValueError(f"penalty={penalty!r} is not valid; allowed: {PENALTIES}")
        self.lam = float(lam)
        self.penalty = penalty
        self._squared = penalty == "squared"

    def __call__(self, quality, latency_ms, budget_ms):
        """Reward of one step (floats) or of a batch (arrays of the same shape)."""
        overshoot = (latency_ms - budget_ms) / budget_ms
        # `x * (x > 0)` is max(0, x) for floats and arrays alike (no np.maximum call on scalars).
        overshoot = overshoot * (overshoot > 0)
        if self._squared:
            overshoot = overshoot * overshoot
        return quality - self.lam * overshoot

    def __repr__(self) -> str:
        return f"QualityMinusOvershoot(lam={self.lam}, penalty={self.penalty!r})"
