"""Task families and request sources.

`load_samples(family, source, split, n, seed)` is the one entry point: `source="procedural"`
generates samples deterministically (ships with the package, unlimited), `source="hub"` reads the
real dataset from the Hugging Face hub, and any other string is a local directory holding the real
dataset in the hub's column layout. Every source returns `Sample`s with the family's metric.
"""
from __future__ import annotations

import numbers

from pathlib import Path

from .families import FAMILIES, FamilySpec, family_spec
from .sample import Sample

SPLITS = ("train", "val", "test")


def load_samples(
    family: str,
    source: str | Path = "procedural",
    split: str = "val",
    n: int | None = None,
    seed: int = 0,
) -> list[Sample]:
    """Load `n` samples of `family` from `source` (see module docstring).

    Procedural samples are a pure function of (family, split, index, seed); `n` is required there
    because the source is unlimited. For real datasets `n=None` loads the whole split.
    """
    family_spec(family)  # validates the name with a clear error
    if split not in SPLITS:
        raise ValueError(f"split={split!r} is not valid; expected one of {SPLITS}")
    if n is not None and (isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 0):
        raise ValueError(f"n={n!r} must be a non-negative int or None")
    n = None if n is None else int(n)
    if source == "procedural":
        if n is None:
            raise ValueError("n=None: the procedural source is unlimited; pass the number of samples you want")
        from .procedural import generate_samples

        return generate_samples(family, split=split, n=n, seed=seed)
    if source == "hub":
        from .real import load_hub

        return load_hub(family, split=split, n=n, seed=seed)
    if isinstance(source, (str, Path)):
        from .real import load_local

        return load_local(family, Path(source), split=split, n=n, seed=seed)
    raise ValueError(f"source={source!r} must be 'procedural', 'hub' or a local directory path")


__all__ = ["FAMILIES", "FamilySpec", "Sample", "SPLITS", "family_spec", "load_samples"]
