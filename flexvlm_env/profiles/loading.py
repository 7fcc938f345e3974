"""Load the shipped recorded tables into `ReplayData`, and query them one request at a time.

Shipped tables (`flexvlm_env/assets/profiles/`, Parquet with provenance in the metadata):

- `requests_val.parquet`: one row per (request, crops) of the procedural val pool (200 per family):
  controller features and, per preset, the request's token counts at that crop count.
- `micro_quality_val.parquet`: the `micro` model's greedy answer, its metric score and output
  length for every (request, config) of the default grid.
- `<preset>_<card>_stages.parquet`: stage tables measured on a lent GPU (`flexvlm-profile stages`),
  from which `compose.StageModel` builds each request's latency from its own token counts.

Latency sources (`latency=`): `molmoe-1b-h100` (default: what a MolmoE-1B deployment on an H100
would take for these requests, with output lengths from re-tokenizing micro's answers with the
MolmoE tokenizer; measured with the runtime of commit 2a61d3e), `molmoe-1b-h200` (the same on an
H200 with the engine of commit 32925bc, which takes 31-43% less time per decode token and 22% less time
to the first token at 12 crops than the H100 table's engine did on that card) and `micro-h200` (the
micro model itself on an H200), all compositions of stage
tables validated against end-to-end runs (`results/replay_latency_validation*.json`); and
`micro-h200-measured`, every (request, config) timed once on an H200 plus repeats of a 10% subset
(`flexvlm-profile requests`; `micro_h200_requests.parquet`). Both micro H200 tables were recorded with
the current engine (2026-11-30); `data.metadata` names the code version of every table.

Your own tables load the same way, by path: a `flexvlm-profile quality` table for `quality=`, a `flexvlm-profile
stages` or `requests` table for `latency=`, and, for a request pool other than the shipped one, its
`flexvlm-profile request-table` for `requests=` (each a Parquet file or a shard directory; `load_replay_data`).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np
import pandas as pd

from ..config import Config, KnobGrid
from ..features import IMAGE_FEATURES, PROMPT_FEATURES
from .compose import StageModel, residual_matrix
from .replay import STAGE_COLUMNS, ReplayData
from .tables import read_parquet, read_table
from .tokens import TokenCounter

QUALITY_SOURCES = {"micro": "micro_quality_val.parquet"}
# name -> (preset, shipped file, how latency is obtained: composed from stage tables, or measured
# per (request, config) by `flexvlm-profile requests`)
LATENCY_SOURCES = {
    "molmoe-1b-h100": ("molmoe-1b", "molmoe-1b_h100_stages.parquet", "composed"),
    "molmoe-1b-h200": ("molmoe-1b", "molmoe-1b_h200_stages.parquet", "composed"),
    "micro-h200": ("micro", "micro_h200_stages.parquet", "composed"),
    "micro-h200-measured": ("micro", "micro_h200_requests.parquet", "measured"),
}
REQUESTS_TABLE = "requests_val.parquet"


def profiles_dir() -> Path:
    return Path(str(resources.files("flexvlm_env") / "assets" / "profiles"))


def _resolve(name: str, table: Path | str) -> Path:
    path = profiles_dir() / table
    if not path.exists():
        hint = ""
        if name == "latency=micro-h200-measured":
            hint = ("; it is not measured yet: `scripts/profile_gpu.sh requests` then `flexvlm-profile consolidate "
                    f"{path} runs/profiles/micro_h200_requests` makes it (latency='micro-h200' composes the same from stage tables)")
        raise FileNotFoundError(f"{name}: the shipped table {path} is missing from this install{hint}")
    return path


# What `flexvlm-profile` command makes each kind of table a path may name (for error messages).
_MADE_BY = {"quality": "flexvlm-profile quality", "latency": "flexvlm-profile stages or requests",
            "requests": "flexvlm-profile request-table"}


# The shipped names each kind of table argument takes (a request table has none: None means the shipped one).
SHIPPED = {"latency": LATENCY_SOURCES, "quality": QUALITY_SOURCES, "requests": {}}


def check_source(argument: str, value: str, kind: str = "latency") -> None:
    """Raise a ValueError naming `argument`, `value` and what is allowed unless `value` is a shipped name of its
    `kind` (`SHIPPED`) or the path of an existing table (a Parquet file or a `flexvlm-profile` shard directory;
    its kind is checked when it is read)."""
    table = SHIPPED[kind]
    if isinstance(value, (str, Path)) and (value in table or Path(value).exists()):
        return
    if kind == "requests":
        raise ValueError(f"{argument}={value!r} is not an existing path of a `{_MADE_BY[kind]}` table "
                         "(None: the shipped request table)")
    what = "latency source" if kind == "latency" else "quality table"
    raise ValueError(f"{argument}={value!r} is neither a shipped {what} (allowed: {sorted(table)}) nor an existing "
                     f"path of a `{_MADE_BY[kind]}` table (a Parquet file or its shard directory)")


def load_replay_data(quality: str = "micro", latency: str = "molmoe-1b-h100", requests: str | None = None) -> ReplayData:
    """Dense replay arrays for a quality table and a latency source (cached per combination).

    Args:
        quality: `micro` (the shipped model's answers and scores), or the path of a table `flexvlm-profile quality`
            made (your checkpoint, adapter or request pool).
        latency: a key of `LATENCY_SOURCES` (see module docstring), or the path of a table `flexvlm-profile stages`
            made (latency composed from stage timings, for the preset named in its metadata) or `flexvlm-profile
            requests` made (every (request, config) timed end to end): your GPU.
        requests: the request table (features and token counts per request and crop count) of the quality table's
            request pool: None for the shipped one (the procedural val pool, 200 requests per family, task seed 0:
            `flexvlm-profile`'s default pool), or the path of a table `flexvlm-profile request-table` made for the
            same pool.
    """
    check_source("quality", quality, "quality")
    check_source("latency", latency)
    if requests is not None:
        check_source("requests", requests, "requests")
    return _load(_source_key(quality, QUALITY_SOURCES), _source_key(latency, LATENCY_SOURCES),
                 None if requests is None else _source_key(requests, {}))


def _source_key(value: str | Path, shipped: dict) -> tuple:
    """A shipped name, or a path with its modification time (so that a table rewritten in place is read again)."""
    if isinstance(value, str) and value in shipped:
        return ("shipped", value)
    path = Path(value).resolve()
    return ("path", str(path), path.stat().st_mtime_ns)


# The tables each argument takes (`_table_kind`), and how the others are named in its error.
_ACCEPTS = {"quality": {"quality"}, "latency": {"stages", "requests"}, "requests": {"request-table"}}
_DESCRIBED = {"request-table": "a `flexvlm-profile request-table` (features and token counts)",
              "requests": "a `flexvlm-profile requests` sweep (measured latency)",
              "requests-empty": "a `flexvlm-profile requests` sweep with no rows yet (rerun it: it resumes)"}


def _table_kind(frame: pd.DataFrame) -> str | None:
    """Which `flexvlm-profile` table `frame` is: its metadata's kind, except that kind "requests" is a request-table
    (keyed per request and crops), a timed `requests` sweep, or one interrupted before its first shard."""
    metadata = frame.attrs.get("metadata", {})
    if metadata.get("kind") != "requests":
        return metadata.get("kind")
    if metadata.get("key") == ["request_id", "crops"]:
        return "request-table"
    return "requests" if "total_ms" in frame.columns else "requests-empty"


def _read_own(kind: str, path: str) -> pd.DataFrame:
    """A table a user made with `flexvlm-profile`, checked to be of the kind its argument takes."""
    try:
        frame = read_table(path)
    except (OSError, ValueError) as error:  # pyarrow's ArrowInvalid is a ValueError
        raise ValueError(f"{kind}={path!r} is not a readable `{_MADE_BY[kind]}` table (a Parquet file or its shard "
                         f"directory): {type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}") from None
    found = _table_kind(frame)
    if found not in _ACCEPTS[kind]:
        what = _DESCRIBED.get(found, f"a table of kind {found!r}")
        raise ValueError(f"{kind}={path!r} holds {what}; a {kind} table comes from `{_MADE_BY[kind]}`")
    metadata = frame.attrs.get("metadata", {})
    if kind == "latency" and not metadata.get("preset"):
        raise ValueError(f"latency={path!r}: its metadata names no model preset, which says whose token counts to use")
    return frame


def _pool(metadata: dict) -> dict | None:
    """The request pool a table's metadata records (a request table's `pool`, a sweep's `protocol.pool`), if any."""
    return metadata.get("pool") or (metadata.get("protocol") or {}).get("pool")


def _check_same_pool(name: str, metadata: dict, other_name: str, other_metadata: dict) -> None:
    """Raise unless two tables were made on one request pool. Request ids (`tally_qa/procedural/val/3`) name neither
    the task seed nor the generator, so ids alone would join another pool's requests; a pool's first n requests
    are those of a larger pool of the same split and seed, so the families and sizes may differ."""
    pool, other = _pool(metadata), _pool(other_metadata)
    if pool is None or other is None:  # a table made before pools were recorded: the id check below still runs
        return
    differ = {key: (pool.get(key), other.get(key)) for key in ("split", "task_seed") if pool.get(key) != other.get(key)}
    if differ:
        what = ", ".join(f"{key} {a!r} against {b!r}" for key, (a, b) in differ.items())
        raise ValueError(f"{name} and {other_name} were made on different request pools ({what}): the same request ids "
                         f"name different requests; profile both on one pool (the same --split and --task-seed); "
                         f"for a pool other than the shipped one, requests= takes its `{_MADE_BY['requests']}`")


@functools.lru_cache(maxsize=4)
def _load(quality: tuple, latency: tuple, requests_key: tuple | None) -> ReplayData:
    if requests_key is None:
        requests, requests_meta = read_parquet(_resolve("requests", REQUESTS_TABLE))
    else:
        requests = _read_own("requests", requests_key[1])
        requests_meta = requests.attrs.get("metadata", {})
    if quality[0] == "shipped":
        answers, quality_meta = read_parquet(_resolve(f"quality={quality[1]}", QUALITY_SOURCES[quality[1]]))
    else:
        answers = _read_own("quality", quality[1])
        quality_meta = answers.attrs.get("metadata", {})
    if latency[0] == "shipped":
        preset, table_file, how = LATENCY_SOURCES[latency[1]]
        latency_table = read_table(_resolve(f"latency={latency[1]}", table_file))
    else:
        latency_table = _read_own("latency", latency[1])
        preset = latency_table.attrs["metadata"]["preset"]
        how = "composed" if latency_table.attrs["metadata"]["kind"] == "stages" else "measured"
    if how == "composed" and f"{preset}/input_tokens" not in requests.columns:
        raise ValueError(f"latency={latency[1]!r} composes {preset}'s latency, but the request table has no {preset} token "
                         f"counts; make it with `{_MADE_BY['requests']} --presets {preset}`")
    requests_name = "the shipped one" if requests_key is None else repr(requests_key[1])
    _check_same_pool(f"quality={quality[1]!r}", quality_meta, f"the request table ({requests_name})", requests_meta)
    if how == "measured":
        _check_same_pool(f"latency={latency[1]!r}", latency_table.attrs.get("metadata", {}), f"quality={quality[1]!r}",
                         quality_meta)
    unknown = set(answers["request_id"].unique()) - set(requests["request_id"])
    if unknown:
        raise ValueError(f"quality={quality[1]!r} answers {len(unknown)} requests that the request table "
                         f"({requests_name}) does not hold, e.g. "
                         f"{sorted(unknown)[:3]}; make the table of its pool with `{_MADE_BY['requests']}` (the "
                         "same --families, --split, --per-family and --task-seed) and give it as requests=")
    metadata = {"quality_source": quality[1], "latency_source": latency[1], "quality_table": quality_meta,
                "latency_table": latency_table.attrs.get("metadata", {}), "requests_table": requests_meta}
    if how == "measured":
        return build_replay_data_measured(requests, answers, latency_table, metadata=metadata)
    return build_replay_data(requests, answers, latency_table, preset, answered_by=quality_meta.get("preset", quality[1]),
                             metadata=metadata)


@dataclass(frozen=True)
class _Recorded:
    """The quality table as dense arrays, with the request table's per-request rows: what every
    latency source shares."""

    grid: KnobGrid
    ids: np.ndarray
    per_request: pd.DataFrame  # the request table's first row of each request, in `ids` order
    quality: np.ndarray
    texts: np.ndarray
    answers: pd.DataFrame  # the quality table rows, and their dense (request, config) indices
    rows: np.ndarray
    configs: np.ndarray

    @classmethod
    def of(cls, requests: pd.DataFrame, answers: pd.DataFrame, grid: KnobGrid | None = None) -> "_Recorded":
        grid = grid or KnobGrid(
            crops=tuple(sorted(answers["crops"].unique().tolist())),
            top_k=tuple(sorted(answers["top_k"].unique().tolist())),
            active_blocks=tuple(sorted(answers["active_blocks"].unique().tolist())),
        )
        ids = pd.unique(answers["request_id"])
        if len(answers) != len(ids) * len(grid):
            raise ValueError(f"the quality table has {len(answers)} rows; a dense table needs {len(ids)} requests x {len(grid)} configs")
        r, c = _dense_index(answers, grid, ids)
        quality = np.zeros((len(ids), len(grid)), np.float32)
        quality[r, c] = answers["quality"].to_numpy(np.float32)
        texts = np.empty((len(ids), len(grid)), dtype=object)
        texts[r, c] = answers["answer"].to_numpy(object)
        per_request = requests.drop_duplicates("request_id").set_index("request_id").loc[ids]
        return cls(grid, ids, per_request, quality, texts, answers, r, c)

    def replay_data(self, output_tokens, stage_ms, total_ms, noise_log_ratio, metadata: dict) -> ReplayData:
        return ReplayData(
            grid=self.grid,
            request_ids=tuple(self.ids),
            families=tuple(self.per_request["family"]),
            prompt_features=self.per_request[list(PROMPT_FEATURES)].to_numpy(np.float32),
            image_features=self.per_request[list(IMAGE_FEATURES)].to_numpy(np.float32),
            quality=self.quality,
            answers=self.texts,
            output_tokens=output_tokens,
            stage_ms=stage_ms,
            total_ms=total_ms,
            noise_log_ratio=noise_log_ratio,
            metadata=metadata,
        )


def build_replay_data(requests: pd.DataFrame, answers: pd.DataFrame, stages: pd.DataFrame, preset: str,
                      answered_by: str = "micro", metadata: dict | None = None, grid: KnobGrid | None = None) -> ReplayData:
    """Join a request table, a quality table and a stage table into `ReplayData`.

    `preset` names the model whose latency the stage table measured: its token counts are read
    from the request table's `<preset>/...` columns, and its output lengths are the quality
    table's answers re-tokenized with its tokenizer (the quality table's own `output_tokens` when
    the preset is `answered_by`, the model that answered).
    """
    recorded = _Recorded.of(requests, answers, grid)
    grid, ids = recorded.grid, recorded.ids
    shape = (len(ids), len(grid))
    if preset == answered_by:
        output = np.zeros(shape, np.int32)
        output[recorded.rows, recorded.configs] = answers["output_tokens"].to_numpy(np.int32)
    else:
        counter = TokenCounter.for_preset(preset)
        unique, inverse = np.unique(recorded.texts.astype(str), return_inverse=True)
        lengths = np.array(counter.output_tokens(unique, [10**9] * len(unique)), dtype=np.int32)
        max_new = recorded.per_request["max_new_tokens"].to_numpy()
        output = np.minimum(lengths[inverse.reshape(shape)], max_new[:, None]).astype(np.int32)

    input_tokens = requests.pivot(index="request_id", columns="crops", values=f"{preset}/input_tokens").loc[ids]
    model = StageModel.fit(stages)
    stage_ms = np.zeros((*shape, len(STAGE_COLUMNS)), np.float32)
    for j, config in enumerate(grid.configs()):
        inputs = input_tokens[config.crops].to_numpy()
        stage_ms[:, j] = model.compose(config.crops, config.top_k, config.active_blocks, inputs, output[:, j])
    return recorded.replay_data(
        output, stage_ms, stage_ms.sum(axis=2), model.noise_matrix(grid),
        {**(metadata or {}), "preset": preset, "composition": "stage tables (flexvlm_env.profiles.compose)"},
    )


def _dense_index(answers: pd.DataFrame, grid: KnobGrid, ids) -> tuple[np.ndarray, np.ndarray]:
    row = pd.Series(np.arange(len(ids)), index=ids)
    ci = {v: i for i, v in enumerate(grid.crops)}
    ki = {v: i for i, v in enumerate(grid.top_k)}
    bi = {v: i for i, v in enumerate(grid.active_blocks)}
    r = row[answers["request_id"]].to_numpy()
    c = ((answers["crops"].map(ci) * len(grid.top_k) + answers["top_k"].map(ki)) * len(grid.active_blocks)
         + answers["active_blocks"].map(bi)).to_numpy()
    return r, c


def build_replay_data_measured(requests: pd.DataFrame, answers: pd.DataFrame, measured: pd.DataFrame,
                               metadata: dict | None = None) -> ReplayData:
    """`ReplayData` whose latency is measured per (request, config) (`flexvlm-profile requests`):
    the run with the median total of each (request, config) (the only run for most requests), and
    noise residuals log(repeat / median) from the repeated subset, pooled per config. Quality and
    answers come from the quality table; latency and output lengths from the measured runs."""
    recorded = _Recorded.of(requests, answers)
    grid, ids = recorded.grid, recorded.ids
    missing = set(ids) - set(measured["request_id"].unique())
    if missing:
        raise ValueError(f"the latency table lacks {len(missing)} requests of the quality table, e.g. {sorted(missing)[:3]}")
    measured = measured[measured["request_id"].isin(set(ids))]
    keys = ["request_id", "crops", "top_k", "active_blocks"]
    ordered = measured.sort_values(keys + ["total_ms"]).reset_index(drop=True)
    size = ordered.groupby(keys, sort=False)["total_ms"].transform("size")
    rank = ordered.groupby(keys, sort=False).cumcount()
    median_runs = ordered[rank == size // 2]
    if len(median_runs) != len(ids) * len(grid):
        raise ValueError(f"the latency table covers {len(median_runs)} (request, config) pairs; "
                         f"{len(ids)} x {len(grid)} are needed")
    r, c = _dense_index(median_runs, grid, ids)
    shape = (len(ids), len(grid))
    stage_ms = np.zeros((*shape, len(STAGE_COLUMNS)), np.float32)
    stage_ms[r, c] = median_runs[list(STAGE_COLUMNS)].to_numpy(np.float32)
    total_ms = np.zeros(shape, np.float32)
    total_ms[r, c] = median_runs["total_ms"].to_numpy(np.float32)
    output = np.zeros(shape, np.int32)
    output[r, c] = median_runs["output_tokens"].to_numpy(np.int32)
    repeated = ordered[size > 1]
    log_ratio = np.log(repeated["total_ms"] / repeated.groupby(keys, sort=False)["total_ms"].transform("median"))
    _, config_of = _dense_index(repeated, grid, ids)
    noise = residual_matrix([log_ratio.to_numpy()[config_of == j] for j in range(len(grid))])
    return recorded.replay_data(
        output, stage_ms, total_ms, noise,
        {**(metadata or {}), "preset": measured.attrs.get("metadata", {}).get("preset"),
         "composition": "measured per (request, config)"},
    )


def simulate(request_id: str, config: Config, quality: str = "micro", latency: str = "molmoe-1b-h100",
             requests: str | None = None) -> dict:
    """Quality, answer and the (median) latency record of one request at one config, from the tables
    (`load_replay_data`'s arguments).

    Returns `{quality, answer, output_tokens, preprocess_ms, vision_encoder_ms, projector_ms,
    prefill_ms, decode_ms, total_ms}`. The tables hold one block-mask policy and crop rule (the quality
    table's protocol): a config asking for others raises ValueError rather than answer for the recorded ones.
    """
    data = load_replay_data(quality, latency, requests)
    protocol = data.metadata.get("quality_table", {}).get("protocol", {})
    recorded = {"mask_policy": protocol.get("mask_policy"), "crop_rule": protocol.get("crop_rule")}
    for name, value in recorded.items():
        if value is not None and getattr(config, name) != value:
            raise ValueError(f"config.{name}={getattr(config, name)!r}: the tables were recorded with {name}={value!r} "
                             f"(quality={quality!r}); profile a quality table with that {name} to replay it")
    try:
        i = data.request_ids.index(request_id)
    except ValueError:
        raise ValueError(f"request_id={request_id!r} is not in the recorded pool (e.g. {data.request_ids[0]!r})") from None
    j = data.config_index(config)
    return {
        "quality": float(data.quality[i, j]), "answer": str(data.answers[i, j]), "output_tokens": int(data.output_tokens[i, j]),
        **{name: float(v) for name, v in zip(STAGE_COLUMNS, data.stage_ms[i, j])}, "total_ms": float(data.total_ms[i, j]),
    }
