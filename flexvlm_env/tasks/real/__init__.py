"""Real-dataset sources: the nine families' benchmark datasets, from the hub or a local directory.

`load_hub(family, split, n, seed)` streams the family's dataset from the Hugging Face hub (with
`datasets`, a dependency); `load_local(family, path, split, n, seed)` reads the same data from a local
directory in the hub's column layout. Both return `Sample`s with the family's metric and token
budget, request ids `family/hub|local/split/index`, and multiple-choice answers as letters.
`REAL_DATASETS` holds one `RealDatasetSpec` per family: hub id, configs, split mapping, columns
read and the row-to-sample mapping; docs/DATASETS.md lists them with the choices made.
"""
from __future__ import annotations

from .hub import load_hub
from .local import load_local
from .specs import REAL_DATASETS, RealDatasetSpec, real_dataset_spec

__all__ = ["REAL_DATASETS", "RealDatasetSpec", "load_hub", "load_local", "real_dataset_spec"]
