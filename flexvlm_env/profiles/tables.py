"""Profile tables on disk: Parquet with units in column names and provenance in the metadata.

A table is a directory of Parquet shards (`part-00000.parquet`, ...) plus `table.json`, the
metadata every shard also carries in its schema (device, driver, torch, dtype, preset, weights
hash, code version, protocol). Shards are written to a temporary name and renamed, so a crash
leaves either a whole shard or none: a rerun reads the keys already present and measures only the
rest, and no measurement is lost or taken twice. `read_table` concatenates the shards and checks
that no key appears twice.
"""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Iterable, Sequence

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

METADATA_KEY = b"flexvlm"
TABLE_JSON = "table.json"


def code_version() -> str:
    """Package version plus the git commit when run from a checkout (`0.1.0+g1a2b3c4`)."""
    from .. import __version__

    here = Path(__file__).parent
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "."], cwd=here.parent,
                               capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit, dirty = "", ""
    # "dirty": the package differs from that commit (e.g. a working tree copied to a GPU machine).
    return (f"{__version__}+g{commit}" + (".dirty" if dirty else "")) if commit else __version__


def write_parquet(frame: pd.DataFrame, path: str | Path, metadata: dict, compression_level: int | None = None) -> Path:
    """Write `frame` with `metadata` (JSON) in the schema, atomically (temporary file + rename).
    `compression_level`: zstd level (None: pyarrow's default; 19 for tables committed to the repo)."""
    path = Path(path)
    table = pa.Table.from_pandas(frame, preserve_index=False)
    table = table.replace_schema_metadata({**(table.schema.metadata or {}), METADATA_KEY: json.dumps(metadata).encode()})
    tmp = path.with_name(path.name + ".tmp")
    pq.write_table(table, tmp, compression="zstd", compression_level=compression_level)
    os.replace(tmp, path)
    return path


def read_parquet(path: str | Path) -> tuple[pd.DataFrame, dict]:
    """(frame, metadata) of one Parquet file written by `write_parquet`."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"profile table {path} does not exist")
    table = pq.read_table(path)
    raw = (table.schema.metadata or {}).get(METADATA_KEY)
    return table.to_pandas(), (json.loads(raw) if raw else {})


class ShardedTable:
    """A resumable table: a directory of shards sharing one metadata dict and one key.

    Args:
        directory: where the shards live (created if needed).
        key: the columns that identify one measurement (e.g. request_id, crops, top_k,
            active_blocks, repeat); `done_keys()` returns the set already written.
        metadata: provenance. Resuming into a directory written with different values of the
            `must_match` fields raises instead of mixing measurements of different setups.
    """

    must_match = ("kind", "preset", "weights_sha256", "adapter_sha256", "device_name", "dtype", "protocol")

    def __init__(self, directory: str | Path, key: Sequence[str], metadata: dict):
        self.directory = Path(directory)
        self.key = tuple(key)
        self.directory.mkdir(parents=True, exist_ok=True)
        # Compare and store what JSON keeps (tuples become lists), or a rerun would never match.
        metadata = json.loads(json.dumps(metadata))
        meta_path = self.directory / TABLE_JSON
        if meta_path.exists():
            existing = json.loads(meta_path.read_text())
            for name in self.must_match:
                if name in metadata and name in existing and existing[name] != metadata[name]:
                    raise ValueError(
                        f"{self.directory} holds a table with {name}={existing[name]!r}; this run has "
                        f"{name}={metadata[name]!r}. Resume with the same setup or choose another --out directory"
                    )
        else:
            tmp = meta_path.with_name(TABLE_JSON + ".tmp")
            tmp.write_text(json.dumps({**metadata, "key": list(self.key)}, indent=1))
            os.replace(tmp, meta_path)
        self.metadata = {**metadata, "key": list(self.key)}

    def shards(self) -> list[Path]:
        return sorted(self.directory.glob("part-*.parquet"))

    def done_keys(self) -> set[tuple]:
        done: set[tuple] = set()
        for shard in self.shards():
            frame = pq.read_table(shard, columns=list(self.key)).to_pandas()
            done.update(map(tuple, frame.itertuples(index=False, name=None)))
        return done

    def append(self, rows: Iterable[dict]) -> Path | None:
        """Write `rows` as the next shard (nothing if empty)."""
        frame = pd.DataFrame(list(rows))
        if frame.empty:
            return None
        missing = [k for k in self.key if k not in frame.columns]
        if missing:
            raise ValueError(f"rows lack the key columns {missing}")
        shards = self.shards()
        index = int(shards[-1].stem.split("-")[1]) + 1 if shards else 0
        return write_parquet(frame, self.directory / f"part-{index:05d}.parquet", self.metadata)

    def read(self) -> pd.DataFrame:
        return read_table(self.directory)


def table_metadata(path: str | Path) -> dict:
    """The metadata of a table directory (its table.json) or Parquet file (its schema), without reading its rows."""
    path = Path(path)
    if path.is_dir():
        meta_path = path / TABLE_JSON
        if not meta_path.exists():
            raise FileNotFoundError(f"{path} is not a profile table (no {TABLE_JSON})")
        return json.loads(meta_path.read_text())
    raw = (pq.read_schema(path).metadata or {}).get(METADATA_KEY)
    return json.loads(raw) if raw else {}


def read_table(path: str | Path) -> pd.DataFrame:
    """All rows of a sharded table directory (or one Parquet file), duplicate keys rejected.
    The metadata is in `frame.attrs["metadata"]`."""
    path = Path(path)
    if path.is_file():
        frame, metadata = read_parquet(path)
    else:
        metadata = table_metadata(path)
        shards = sorted(path.glob("part-*.parquet"))
        frame = pd.concat([pq.read_table(s).to_pandas() for s in shards], ignore_index=True) if shards else pd.DataFrame()
    key = metadata.get("key")
    if key and not frame.empty and frame.duplicated(subset=key).any():
        dup = frame[frame.duplicated(subset=key, keep=False)].head(3)
        raise ValueError(f"{path} holds duplicate measurements for key {key}:\n{dup}")
    frame.attrs["metadata"] = metadata
    return frame


def consolidate(directories, out_file: str | Path) -> Path:
    """Merge sharded table directories into one Parquet file (what ships), keeping the metadata.

    Several directories are the `--shard` parts of one sweep: their metadata must agree except for
    the shard and the device details of each process, and no key may appear twice."""
    if isinstance(directories, (str, Path)):
        directories = [directories]
    if not directories:
        raise ValueError("consolidate needs at least one table directory")
    frames = [read_table(d) for d in directories]
    metadata = frames[0].attrs["metadata"]
    for directory, frame in zip(directories[1:], frames[1:]):
        other = frame.attrs["metadata"]
        for name in ShardedTable.must_match:
            mine = metadata.get(name)
            theirs = other.get(name)
            if name == "protocol" and isinstance(mine, dict) and isinstance(theirs, dict):
                mine = {k: v for k, v in mine.items() if k != "shard"}
                theirs = {k: v for k, v in theirs.items() if k != "shard"}
            if mine != theirs:
                raise ValueError(f"{directory} has {name}={theirs!r}, {directories[0]} has {mine!r}: not parts of one sweep")
    merged = pd.concat([f for f in frames if not f.empty], ignore_index=True) if len(frames) > 1 else frames[0]
    key = metadata.get("key")
    if key and merged.duplicated(subset=key).any():
        raise ValueError(f"the tables {list(map(str, directories))} measure some keys {key} more than once")
    if len(frames) > 1:
        metadata = {**metadata, "merged_from": [str(d) for d in directories],
                    "protocol": {**metadata.get("protocol", {}), "shard": "merged"}}
    merged.attrs = {}
    return write_parquet(merged, out_file, metadata)
