"""Load a family's real dataset from a local directory holding it in the hub's column layout.

For offline machines and for repeated use of whole splits (the hub loader streams and caches
nothing). The directory holds the split as Parquet or JSONL files with the hub's columns
(`REAL_DATASETS[family].required_columns`); the first layout that matches wins, trying `<name>` as
our split name ("val") and then as the hub split name ("validation"):

    <dir>/<name>.parquet          <dir>/<name>.jsonl
    <dir>/<name>/*.parquet        <dir>/<name>/*.jsonl
    <dir>/*/<name>-*.parquet      a hub snapshot: data/validation-00000-of-00002.parquet, or one
                                  folder per config (MMMU: Accounting/validation-00000-of-00001.parquet)

Several files are read as one split, in config order for per-config folders and in name order
otherwise. Images are HF image structs {bytes, path} (what `datasets` writes to Parquet), or
paths, as a string or as {"path": ...}; a relative path is looked up under <dir>, then under the
folder of the file naming it. Record indices count rows (or nested questions) across the files
in that order, so a full hub snapshot gives the same request ids as the hub.
"""
from __future__ import annotations

import json
from functools import partial
from operator import getitem
from pathlib import Path
from typing import Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from .. import SPLITS
from ..sample import Sample
from .records import SourceRow, build_samples, check_count, iter_records, select_records
from .specs import RealDatasetSpec, real_dataset_spec

SPLIT_FILE_PATTERNS = (
    "{name}.parquet",
    "{name}.jsonl",
    "{name}/*.parquet",
    "{name}/*.jsonl",
    "*/{name}-*.parquet",
)
_LISTED_ENTRIES = 20  # directory entries shown when no split file is found


def find_split_files(spec: RealDatasetSpec, root: Path, names: tuple[str, ...]) -> tuple[list[Path], str]:
    """The files holding the split and the name they matched (see module docstring)."""
    config_rank = {config: rank for rank, config in enumerate(spec.hub_configs) if config is not None}
    tried = []
    for name in names:
        for pattern in SPLIT_FILE_PATTERNS:
            glob = pattern.format(name=name)
            tried.append(glob)
            files = [path for path in root.glob(glob) if path.is_file()]
            if files:
                # Per-config folders are concatenated in hub config order, like load_hub does.
                files.sort(key=lambda path: (config_rank.get(path.parent.name, len(config_rank)), str(path)))
                return files, name
    entries = sorted(path.name + ("/" if path.is_dir() else "") for path in root.iterdir())
    shown = ", ".join(entries[:_LISTED_ENTRIES]) + (", ..." if len(entries) > _LISTED_ENTRIES else "")
    raise FileNotFoundError(
        f"no files for split {names[0]!r} of {spec.family} in {root}: looked for {', '.join(tried)}; "
        f"the directory holds: {shown or 'nothing'}"
    )


def _missing_column_error(spec: RealDatasetSpec, where: str, column: str, present: list[str]) -> ValueError:
    return ValueError(
        f"{where}: missing column {column!r} needed for family {spec.family} (hub layout of {spec.hub_id}); "
        f"columns present: {sorted(present)}"
    )


def _parquet_rows(spec: RealDatasetSpec, path: Path, image_dirs: tuple[Path, ...]) -> Iterator[SourceRow]:
    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as exc:
        raise ValueError(f"{path}: cannot read as Parquet: {exc}") from exc
    for column in spec.required_columns:
        if column not in table.column_names:
            raise _missing_column_error(spec, str(path), column, table.column_names)
    # Columns other than the image go to Python objects at once; image bytes stay in Arrow
    # memory until a selected row asks for them.
    rows = table.select(list(spec.columns)).to_pylist()
    images = table.column(spec.image_column)
    image_is_null = images.is_null().to_pylist()
    for row_index, fields in enumerate(rows):
        yield SourceRow(
            fields=fields,
            load_image=partial(lambda column, i: column[i].as_py(), images, row_index),
            has_image=not image_is_null[row_index],
            origin=f"{path} row {row_index}",
            image_dirs=image_dirs,
        )


def _jsonl_rows(spec: RealDatasetSpec, path: Path, image_dirs: tuple[Path, ...]) -> Iterator[SourceRow]:
    with path.open(encoding="utf-8") as lines:
        for line_number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            where = f"{path} line {line_number}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{where}: not valid JSON: {exc}") from None
            if not isinstance(row, dict):
                raise ValueError(f"{where}: expected a JSON object of the dataset's columns, got {type(row).__name__}")
            for column in spec.required_columns:
                if column not in row:
                    raise _missing_column_error(spec, where, column, list(row))
            yield SourceRow(
                fields=row,
                load_image=partial(getitem, row, spec.image_column),
                has_image=row[spec.image_column] not in (None, ""),
                origin=where,
                image_dirs=image_dirs,
            )


def _read_rows(spec: RealDatasetSpec, root: Path, files: list[Path]) -> Iterator[SourceRow]:
    for path in files:
        image_dirs = (root,) if path.parent == root else (root, path.parent)
        if path.suffix == ".parquet":
            yield from _parquet_rows(spec, path, image_dirs)
        else:
            yield from _jsonl_rows(spec, path, image_dirs)


def load_local(
    family: str, path: Path, split: str = "val", n: int | None = None, seed: int | None = 0
) -> list[Sample]:
    """Load `n` samples of `family`'s real dataset from the local directory `path`.

    Args:
        family: one of `FAMILIES`.
        path: directory in one of the layouts of the module docstring.
        split: "train", "val" or "test"; files are looked up under this name, then under the
            hub split it maps to (`REAL_DATASETS`).
        n: number of samples; None loads the whole split.
        seed: None takes the first `n` rows in file order; an int draws `n` uniformly from the
            whole split (exactly, unlike the hub loader's window), the same ones for the same seed.

    Returns:
        Samples with request ids `family/local/split/index`.
    """
    spec = real_dataset_spec(family)
    if split not in SPLITS:
        raise ValueError(f"split={split!r} is not valid; expected one of {SPLITS}")
    if n is not None and (not isinstance(n, int) or n < 0):
        raise ValueError(f"n={n!r} must be a non-negative int or None")
    root = Path(path)
    if not root.is_dir():
        raise FileNotFoundError(f"local dataset directory {root} for {family} does not exist or is not a directory")
    hub_split = spec.splits.get(split)
    names = (split,) if hub_split in (None, split) else (split, hub_split)
    files, matched_name = find_split_files(spec, root, names)
    # A file named after the hub split is the whole hub split, which "val" may be carved from;
    # a file named "val" already is the carved split.
    carve_val = spec.val_every_rows is not None and matched_name == hub_split
    records = iter_records(spec, _read_rows(spec, root, files), split, carve_val=carve_val)
    selected = select_records(records, n, seed, window_records=None)
    check_count(selected, n, f"{family} {split} ({', '.join(str(file) for file in files)})")
    return build_samples(spec, selected, split, "local")
