"""From rows of a real dataset to Samples: split carving, flattening, selection, image decoding.

Both loaders (hub and local) produce the same stream of `SourceRow`s in the hub's row order;
everything after that is shared and lives here. A row becomes one or more `Record`s (one per
question for datasets that store several questions per image), each with an `index` that is its
position in the full hub split (counting every row, or every question of nested datasets, whether
or not it survives split carving and filtering), so the request id `family/source/split/index`
addresses the same item for every `n` and `seed`. Images are decoded only for the records that
are finally selected.
"""
from __future__ import annotations

import io
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import numpy as np
from PIL import Image

from ..families import family_spec
from ..sample import Sample
from .specs import DatasetRowError, RealDatasetSpec


@dataclass(frozen=True)
class SourceRow:
    """One row as read from the hub or a local file, image not yet decoded.

    Attributes:
        fields: the row's columns (the image column may be absent: see `load_image`).
        load_image: returns the raw image value (HF image struct {bytes, path}, a path string,
            or a PIL image); deferred so that unselected rows never touch their image bytes.
        has_image: whether the image value is present (ScienceQA has image-less rows).
        origin: where the row came from, for error messages ("<file> row 12").
        image_dirs: directories a relative image path is resolved against, in order.
    """

    fields: Mapping[str, Any]
    load_image: Callable[[], Any]
    has_image: bool
    origin: str
    image_dirs: tuple[Path, ...] = ()


@dataclass(frozen=True)
class Record:
    """One future Sample: its address in the hub split and the row content it maps from."""

    index: int
    fields: Mapping[str, Any]
    row: SourceRow
    origin: str


def iter_records(spec: RealDatasetSpec, rows: Iterable[SourceRow], split: str, carve_val: bool) -> Iterator[Record]:
    """The records of `split` among `rows`, lazily (a hub stream stops once enough are taken).

    `carve_val`: `rows` is the whole hub split that our "val" is carved from
    (`spec.val_every_rows`); keep only the rows of `split`.
    """
    question_index = 0
    for row_index, row in enumerate(rows):
        in_split = True
        if carve_val:
            is_val_row = row_index % spec.val_every_rows == 0
            in_split = is_val_row if split == "val" else not is_val_row
        if spec.skip_rows_without_image and not row.has_image:
            in_split = False
        if spec.questions_column is None:
            if in_split:
                yield Record(row_index, row.fields, row, row.origin)
            continue
        questions = row.fields[spec.questions_column]
        if isinstance(questions, (str, bytes, Mapping)) or not hasattr(questions, "__iter__"):
            raise ValueError(
                f"{row.origin}: column {spec.questions_column!r} must be a list of question dicts, "
                f"got {type(questions).__name__}"
            )
        for position, question in enumerate(questions):
            origin = f"{row.origin}, {spec.questions_column}[{position}]"
            if not isinstance(question, Mapping):
                raise ValueError(f"{origin}: expected a dict with keys {list(spec.question_keys)}, got {question!r}")
            missing = [key for key in spec.question_keys if key not in question]
            if missing:
                raise ValueError(
                    f"{origin}: missing key {missing[0]!r} of {spec.family}'s {spec.questions_column!r} "
                    f"entries; keys present: {sorted(question)}"
                )
            if in_split:
                yield Record(question_index, {**row.fields, **question}, row, origin)
            question_index += 1


def select_records(
    records: Iterator[Record], n: int | None, seed: int | None, window_records: int | None
) -> list[Record]:
    """Pick the records to load (docs/DATASETS.md, "n and seed").

    n=None: every record, in a seeded random order (hub order when seed is None).
    seed=None: the first n records in hub order.
    Otherwise: n records drawn uniformly without replacement, in drawn order, from the first
    `window_records` records (all of them when None). May return fewer than n if the split is
    smaller; the caller reports that.
    """
    if n is not None and seed is None:
        return list(islice(records, n))
    candidates = list(records if n is None or window_records is None else islice(records, window_records))
    if seed is None:
        return candidates
    order = np.random.default_rng(seed).permutation(len(candidates))
    return [candidates[i] for i in order[: len(candidates) if n is None else n]]


def decode_image(value: Any, *, request_id: str, origin: str, image_dirs: Sequence[Path]) -> Image.Image:
    """An RGB PIL image from an HF image struct, a path or a PIL image; clear errors otherwise."""
    if isinstance(value, Image.Image):
        return value.convert("RGB")
    data: bytes | None = None
    path: str | None = None
    if isinstance(value, Mapping):
        data, path = value.get("bytes"), value.get("path")
    elif isinstance(value, (bytes, bytearray)):
        data = bytes(value)
    elif isinstance(value, (str, Path)):
        path = str(value)
    elif value is not None:
        raise ValueError(f"{request_id} ({origin}): unsupported image value of type {type(value).__name__}")
    if data is None and not path:
        raise ValueError(f"{request_id} ({origin}): the row has no image (neither bytes nor a path)")

    if data is not None:
        source: Any = io.BytesIO(data)
        described = f"embedded image bytes ({path})" if path else "embedded image bytes"
    else:
        candidates = [Path(path)] if Path(path).is_absolute() else [directory / path for directory in image_dirs]
        found = next((candidate for candidate in candidates if candidate.is_file()), None)
        if found is None:
            looked = ", ".join(str(candidate) for candidate in candidates) or "nowhere (no base directory)"
            raise ValueError(f"{request_id} ({origin}): image file {path!r} not found; looked at {looked}")
        source, described = found, f"image file {found}"
    try:
        with Image.open(source) as image:
            image.load()  # decode now, so a truncated file fails here and not in the model
            return image.convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise ValueError(f"{request_id} ({origin}): cannot read {described}: {exc}") from exc


def build_samples(spec: RealDatasetSpec, records: Sequence[Record], split: str, source_tag: str) -> list[Sample]:
    """Samples for `records`: map the row content, then decode the image; errors name the request."""
    family = family_spec(spec.family)
    samples = []
    for record in records:
        request_id = f"{spec.family}/{source_tag}/{split}/{record.index}"
        try:
            fields = spec.to_fields(record.fields)
        except DatasetRowError as exc:
            raise ValueError(f"{request_id} ({record.origin}): {exc}") from None
        image = decode_image(
            record.row.load_image(), request_id=request_id, origin=record.origin, image_dirs=record.row.image_dirs
        )
        samples.append(
            Sample(
                request_id=request_id,
                image=image,
                prompt=fields.prompt,
                answers=fields.answers,
                family=spec.family,
                metric=family.metric,
                max_new_tokens=family.max_new_tokens,
                options=fields.options,
            )
        )
    return samples


def check_count(selected: Sequence[Record], n: int | None, description: str) -> None:
    """Raise if fewer than `n` records were available (silently returning fewer would skew a study)."""
    if n is not None and len(selected) < n:
        raise ValueError(f"n={n} exceeds the {len(selected)} samples available in {description}")
