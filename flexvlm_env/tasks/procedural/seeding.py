"""Per-sample random streams for the procedural task source.

Every procedural sample is a pure function of (family, split, index, seed). This module turns that
tuple into a NumPy generator through a cryptographic hash, so the stream is the same in every
process and on every platform (Python's built-in `hash()` is salted per process and must not be
used), and so the train, val and test splits draw from unrelated streams. `GENERATOR_VERSION` is
part of the hash: bump it whenever a generator changes what it draws, so that old request ids never
silently point at different content.
"""
from __future__ import annotations

import hashlib

import numpy as np

GENERATOR_VERSION = 1


def sample_rng(family: str, split: str, index: int, seed: int) -> np.random.Generator:
    """Return the generator that draws everything about sample `index` of (family, split, seed)."""
    key = f"flexvlm-procedural/v{GENERATOR_VERSION}/{family}/{split}/{index}/{seed}".encode()
    digest = hashlib.blake2b(key, digest_size=16).digest()
    return np.random.default_rng(int.from_bytes(digest, "little"))
