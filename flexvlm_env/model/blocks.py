"""Depth knob: which decoder blocks run for a given `active_blocks` and mask policy.

A plan is a sorted tuple of block indices. Block 0 always runs (it turns embeddings into the
residual stream every later block expects). Policies: `importance` keeps the most important
blocks by a ranking measured for the loaded weights (accuracy drop when a block alone is removed,
see `rank_blocks_by_drop`), `prefix` keeps the first blocks, `random` a seeded random subset. The
plan is fixed at prefill and reused for every decode step of the request.
"""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np


def validate_ranking(ranking: Sequence[int], n_blocks: int) -> tuple[int, ...]:
    ranking = tuple(int(b) for b in ranking)
    if sorted(ranking) != list(range(n_blocks)):
        raise ValueError(f"block ranking {ranking} must be a permutation of 0..{n_blocks - 1}")
    # Block 0 is always kept, so it leads the ranking whatever was measured.
    return (0,) + tuple(b for b in ranking if b != 0)


def block_plan(policy: str, active_blocks: int, n_blocks: int, ranking: Sequence[int], seed: int = 0) -> tuple[int, ...]:
    """Sorted indices of the blocks that run."""
    if not 1 <= active_blocks <= n_blocks:
        raise ValueError(f"active_blocks={active_blocks} is out of range; allowed: 1..{n_blocks}")
    if policy == "prefix":
        order = tuple(range(n_blocks))
    elif policy == "importance":
        order = validate_ranking(ranking, n_blocks)
    elif policy == "random":
        rest = np.random.default_rng(seed).permutation(np.arange(1, n_blocks))
        order = (0, *(int(b) for b in rest))
    else:
        raise ValueError(f"mask_policy={policy!r} is not valid; allowed: ('importance', 'prefix', 'random')")
    return tuple(sorted(order[:active_blocks]))


def rank_blocks_by_drop(n_blocks: int, accuracy_without: Callable[[int | None], float]) -> tuple[tuple[int, ...], dict[int, float]]:
    """Rank blocks by the accuracy lost when each one alone is removed.

    `accuracy_without(b)` returns the accuracy with block b skipped (`None`: no block skipped).
    Returns (ranking most-important first, block 0 first; {block: accuracy drop}).
    """
    base = accuracy_without(None)
    drops = {b: base - accuracy_without(b) for b in range(1, n_blocks)}
    ranked = sorted(drops, key=lambda b: (-drops[b], b))
    return (0, *ranked), drops
