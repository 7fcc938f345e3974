"""The three inference knobs a controller sets per request, and the grid they range over.

A `Config` is what an agent's `select_config` returns and what `VLM.generate` applies:
`crops` (vision tokens), `top_k` (experts per token: width) and `active_blocks` (depth). Values
are checked here for type and sign; the model checks them against its own sizes (number of
experts, blocks, maximum crops) when the config is applied, so a bad value always fails with the
knob's name, the value and the legal range.
"""
from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import Sequence

MASK_POLICIES = ("importance", "prefix", "random")
CROP_RULES = ("exact", "native")


def _check_int(name: str, value, low: int, high: int | None = None) -> int:
    """`value` as a Python int (NumPy integers too: controllers often emit them), checked to lie in low..high."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name}={value!r} must be an int (got {type(value).__name__})")
    if value < low or (high is not None and value > high):
        allowed = f"{low}..{high}" if high is not None else f">= {low}"
        raise ValueError(f"{name}={value!r} is out of range; allowed: {allowed}")
    return int(value)


@dataclass(frozen=True)
class Config:
    """One inference configuration.

    Attributes:
        crops: number of image crops besides the global view. With `crop_rule="exact"` (the knob's
            default) the image is tiled into exactly this many crops (rows x cols closest to its
            aspect ratio); with `"native"` it is MolmoE's upper bound and the tiling follows the
            image size, as the reference processor does.
        top_k: experts per token in every MoE block (int), or one value per block (tuple).
        active_blocks: decoder blocks that run; the others are identity and hold no KV cache.
            Which ones run is given by `mask_policy` (block 0 always runs).
        mask_policy: `importance` (ranking shipped with the weights), `prefix` (the first blocks)
            or `random` (a fixed random order, `mask_seed`).
        crop_rule: `exact` or `native` (see `crops`).
        mask_seed: seed of the `random` mask policy.
    """

    crops: int = 12
    top_k: int | tuple[int, ...] = 8
    active_blocks: int = 16
    mask_policy: str = "importance"
    crop_rule: str = "exact"
    mask_seed: int = 0

    def __post_init__(self) -> None:
        # Stored as Python ints, so that a Config from NumPy values hashes, compares and serializes as any other.
        object.__setattr__(self, "crops", _check_int("crops", self.crops, 1))
        if isinstance(self.top_k, (list, tuple)):
            if not self.top_k:
                raise ValueError("top_k=() must hold one value per block, got an empty sequence")
            object.__setattr__(self, "top_k", tuple(_check_int(f"top_k[{i}]", k, 1) for i, k in enumerate(self.top_k)))
        else:
            object.__setattr__(self, "top_k", _check_int("top_k", self.top_k, 1))
        object.__setattr__(self, "active_blocks", _check_int("active_blocks", self.active_blocks, 1))
        if self.mask_policy not in MASK_POLICIES:
            raise ValueError(f"mask_policy={self.mask_policy!r} is not valid; allowed: {MASK_POLICIES}")
        if self.crop_rule not in CROP_RULES:
            raise ValueError(f"crop_rule={self.crop_rule!r} is not valid; allowed: {CROP_RULES}")
        object.__setattr__(self, "mask_seed", _check_int("mask_seed", self.mask_seed, 0))

    def top_k_per_block(self, n_blocks: int) -> tuple[int, ...]:
        """top_k expanded to one value per decoder block."""
        if isinstance(self.top_k, tuple):
            if len(self.top_k) != n_blocks:
                raise ValueError(
                    f"top_k has {len(self.top_k)} values but the model has {n_blocks} blocks; "
                    f"pass one int or exactly {n_blocks} values"
                )
            return self.top_k
        return (self.top_k,) * n_blocks

    def validate_for(self, *, n_experts: int, n_blocks: int, max_crops: int) -> None:
        """Check the knobs against a model's sizes; raise ValueError naming the knob otherwise."""
        _check_int("crops", self.crops, 1, max_crops)
        for i, k in enumerate(self.top_k_per_block(n_blocks)):
            _check_int("top_k" if not isinstance(self.top_k, tuple) else f"top_k[{i}]", k, 1, n_experts)
        _check_int("active_blocks", self.active_blocks, 1, n_blocks)

    def as_tuple(self) -> tuple:
        return (self.crops, self.top_k, self.active_blocks)


@dataclass(frozen=True)
class KnobGrid:
    """The discrete knob values a controller chooses from (DESIGN.md section 2: 7 x 4 x 5 = 140)."""

    crops: tuple[int, ...] = (1, 2, 3, 4, 6, 9, 12)
    top_k: tuple[int, ...] = (1, 2, 4, 8)
    active_blocks: tuple[int, ...] = (8, 10, 12, 14, 16)

    def __post_init__(self) -> None:
        for name in ("crops", "top_k", "active_blocks"):
            values = tuple(getattr(self, name))
            if not values or list(values) != sorted(set(values)):
                raise ValueError(f"KnobGrid.{name}={values!r} must be non-empty, strictly increasing")
            for v in values:
                _check_int(f"KnobGrid.{name}", v, 1)
            object.__setattr__(self, name, values)

    @property
    def shape(self) -> tuple[int, int, int]:
        return (len(self.crops), len(self.top_k), len(self.active_blocks))

    def __len__(self) -> int:
        a, b, c = self.shape
        return a * b * c

    def config(self, index: Sequence[int], **kwargs) -> Config:
        """The Config at a grid index (crops_i, top_k_i, blocks_i)."""
        i, j, k = (int(x) for x in index)
        for name, idx, n in zip(("crops", "top_k", "active_blocks"), (i, j, k), self.shape):
            if not 0 <= idx < n:
                raise ValueError(f"grid index for {name}={idx} is out of range 0..{n - 1}")
        return Config(crops=self.crops[i], top_k=self.top_k[j], active_blocks=self.active_blocks[k], **kwargs)

    def configs(self, **kwargs) -> list[Config]:
        """All configurations in row-major (crops, top_k, active_blocks) order."""
        return [
            Config(crops=c, top_k=t, active_blocks=b, **kwargs)
            for c in self.crops
            for t in self.top_k
            for b in self.active_blocks
        ]

    @property
    def full(self) -> Config:
        return Config(crops=self.crops[-1], top_k=self.top_k[-1], active_blocks=self.active_blocks[-1])
