"""Knob-robust ("elastic") training: which configuration each training batch runs at.

Every batch draws crops, top_k and a block plan, as LayerDrop / AdaLLaVA-style training does, so
that every configuration of the grid gives meaningful answers. The full configuration is drawn
with probability `p_full` (it is the one the quality bar is set on) and the smallest with
`p_smallest` (the "sandwich rule" of slimmable networks: train both ends of the range). Block plans
cover the three mask policies: the prefix, a random subset, and, once a ranking is known, the
importance plan; a random subset with block 0 is what an importance plan looks like before the
ranking exists. Draws are a pure function of (seed, step), so a resumed run draws the same knobs.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..model.blocks import block_plan


@dataclass(frozen=True)
class KnobDraw:
    crops: int
    top_k: int
    plan: tuple[int, ...]  # sorted block indices, block 0 first
    kind: str  # "full", "smallest", "prefix", "random"


@dataclass(frozen=True)
class ElasticKnobs:
    """Distribution of training configurations. `enabled=False` trains at the full config only."""

    enabled: bool = True
    crops_choices: tuple[int, ...] = (1, 2, 3, 4, 6, 9, 12)
    top_k_choices: tuple[int, ...] = (1, 2, 4, 8)
    min_blocks: int = 8
    n_blocks: int = 16
    p_full: float = 0.25
    p_smallest: float = 0.05
    p_prefix: float = 0.35  # share of the other draws whose plan is the prefix (the rest: random subsets)
    full_until_step: int = 0  # steps before this one all run at the full configuration (a curriculum phase)

    def __post_init__(self) -> None:
        for name in ("p_full", "p_smallest", "p_prefix"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name}={value} must be in [0, 1]")
        if self.p_full + self.p_smallest > 1.0:
            raise ValueError(f"p_full + p_smallest = {self.p_full + self.p_smallest} must be <= 1")
        if not 1 <= self.min_blocks <= self.n_blocks:
            raise ValueError(f"min_blocks={self.min_blocks} must be in 1..n_blocks={self.n_blocks}")
        if not self.crops_choices or not self.top_k_choices:
            raise ValueError("crops_choices and top_k_choices must be non-empty")
        if self.full_until_step < 0:
            raise ValueError(f"full_until_step={self.full_until_step} must be >= 0")

    @property
    def full(self) -> KnobDraw:
        return KnobDraw(max(self.crops_choices), max(self.top_k_choices), tuple(range(self.n_blocks)), "full")

    @property
    def smallest(self) -> KnobDraw:
        return KnobDraw(min(self.crops_choices), min(self.top_k_choices), tuple(range(self.min_blocks)), "smallest")

    def draw(self, seed: int, step: int) -> KnobDraw:
        if not self.enabled or step < self.full_until_step:
            return self.full
        rng = np.random.default_rng([seed, step, 0x6B6E6F62])  # stream separate from the data's
        u = rng.random()
        if u < self.p_full:
            return self.full
        if u < self.p_full + self.p_smallest:
            return self.smallest
        crops = int(rng.choice(self.crops_choices))
        top_k = int(rng.choice(self.top_k_choices))
        blocks = int(rng.integers(self.min_blocks, self.n_blocks + 1))
        if rng.random() < self.p_prefix:
            return KnobDraw(crops, top_k, tuple(range(blocks)), "prefix")
        rest = rng.permutation(np.arange(1, self.n_blocks))[: blocks - 1]
        return KnobDraw(crops, top_k, tuple(sorted((0, *(int(b) for b in rest)))), "random")


MASK_POLICIES = ("importance", "prefix", "random", "mixed")


def with_mask_policy(draw: KnobDraw, policy: str, ranking, seed: int = 0) -> KnobDraw:
    """`draw` with its block plan chosen by a mask policy, so that fine-tuning trains the very
    plans the model will run: "importance" (the weights' ranking), "prefix", "random" (seeded as
    `Config(mask_policy="random", mask_seed=seed)`), or "mixed" (the draw's own prefix / random-subset
    plans, as training from scratch uses before any ranking exists). The depth is kept."""
    if policy not in MASK_POLICIES:
        raise ValueError(f"mask_policy={policy!r} is not valid; allowed: {MASK_POLICIES}")
    if policy == "mixed" or draw.kind == "full":
        return draw
    n_blocks = len(ranking)
    return KnobDraw(draw.crops, draw.top_k, block_plan(policy, len(draw.plan), n_blocks, ranking, seed), draw.kind)
