"""Load a family's real dataset from the Hugging Face hub with `datasets` (the `[hub]` extra).

The hub is always read in streaming mode: `datasets.load_dataset(..., streaming=True)` fetches
only the requested split's Parquet files, and only as far as the rows consumed, whereas the
non-streaming mode downloads and prepares every split of the config first (lmms-lab/VQAv2 would
fetch its test-dev and test splits, 555k questions, to serve 100 validation questions). Nothing
is cached between calls: for repeated use of a whole split, download the split's files once and
use `load_local`, which reads the hub's snapshot layout (docs/DATASETS.md).

Seeded sampling with a given `n` draws uniformly from the first
`max(SHUFFLE_WINDOW_PER_SAMPLE * n, SHUFFLE_WINDOW_MIN_RECORDS)` records of the split, not from
the whole split, so that n=100 reads about a thousand rows; `n=None` reads the whole split.
"""
from __future__ import annotations

import importlib
from functools import partial
from operator import getitem
from typing import Any, Iterator

from ..sample import Sample
from .records import SourceRow, build_samples, check_count, iter_records, select_records
from .specs import RealDatasetSpec, real_dataset_spec

HUB_EXTRA_HINT = "pip install datasets (a dependency of flexvlm: reinstall it)"
SHUFFLE_WINDOW_MIN_RECORDS = 1000
SHUFFLE_WINDOW_PER_SAMPLE = 10


def _import_datasets() -> Any:
    try:
        return importlib.import_module("datasets")
    except ImportError as exc:
        raise ImportError(
            f"loading real datasets from the Hugging Face hub needs the `datasets` package: {HUB_EXTRA_HINT} "
            "(or pass a local directory in the hub's layout as the source)"
        ) from exc


def _keep_images_encoded(datasets: Any, dataset: Any) -> Any:
    """Cast image columns to undecoded {bytes, path} structs: only the selected rows get decoded."""
    features = getattr(dataset, "features", None) or {}
    for name, feature in features.items():
        if isinstance(feature, datasets.Image):
            dataset = dataset.cast_column(name, datasets.Image(decode=False))
    return dataset


def _stream_rows(datasets: Any, spec: RealDatasetSpec, hub_split: str) -> Iterator[SourceRow]:
    # A generator: each config is opened only when the rows before it have been consumed.
    for config in spec.hub_configs:
        dataset = datasets.load_dataset(spec.hub_id, name=config, split=hub_split, streaming=True)
        dataset = _keep_images_encoded(datasets, dataset)
        where = f"hub dataset {spec.hub_id}" + (f" config {config}" if config else "") + f" split {hub_split}"
        for row_index, row in enumerate(dataset):
            if row_index == 0:
                missing = [column for column in spec.required_columns if column not in row]
                if missing:
                    raise ValueError(
                        f"{where}: missing column {missing[0]!r} needed for family {spec.family}; "
                        f"columns present: {sorted(row)}"
                    )
            yield SourceRow(
                fields=row,
                load_image=partial(getitem, row, spec.image_column),
                has_image=row[spec.image_column] is not None,
                origin=f"{where} row {row_index}",
            )


def load_hub(family: str, split: str = "val", n: int | None = None, seed: int | None = 0) -> list[Sample]:
    """Load `n` samples of `family`'s real dataset split from the Hugging Face hub.

    Args:
        family: one of `FAMILIES`.
        split: "train", "val" or "test"; which hub split each reads is in `REAL_DATASETS`.
        n: number of samples; None loads the whole split (into memory).
        seed: None takes the first `n` in hub order; an int draws `n` at random from the first
            `max(10 * n, 1000)` records (module docstring), the same ones for the same seed.

    Returns:
        Samples with request ids `family/hub/split/index`, index = position in the hub split.
    """
    spec = real_dataset_spec(family)
    hub_split = spec.hub_split(split)
    if n is not None and (not isinstance(n, int) or n < 0):
        raise ValueError(f"n={n!r} must be a non-negative int or None")
    if n == 0:
        return []
    datasets = _import_datasets()
    rows = _stream_rows(datasets, spec, hub_split)
    records = iter_records(spec, rows, split, carve_val=spec.val_every_rows is not None)
    window_records = None if n is None else max(SHUFFLE_WINDOW_PER_SAMPLE * n, SHUFFLE_WINDOW_MIN_RECORDS)
    selected = select_records(records, n, seed, window_records)
    check_count(selected, n, f"{family} {split} (hub {spec.hub_id}, split {hub_split})")
    return build_samples(spec, selected, split, "hub")
