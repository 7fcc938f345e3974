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


def check_source(argument: str, value: str, kind: str = "latency") -> None:
    """Raise a ValueError naming `argument`, `value` and the shipped choices unless `value` is a key of
    LATENCY_SOURCES (`kind="latency"`) or QUALITY_SOURCES (`kind="quality"`)."""
    table = {"latency": LATENCY_SOURCES, "quality": QUALITY_SOURCES}[kind]
    if value not in table:
        what = "latency source" if kind == "latency" else "quality table"
        raise ValueError(f"{argument}={value!r} is not a shipped {what}; allowed: {sorted(table)}")


def load_replay_data(quality: str = "micro", latency: str = "molmoe-1b-h100") -> ReplayData:
    """Dense replay arrays for the shipped quality table and latency source (cached per pair).

    Args:
        quality: `micro` (the shipped model's answers and scores).
        latency: a key of `LATENCY_SOURCES` (see module docstring).
    """
    check_source("quality", quality, "quality")
    check_source("latency", latency)
    return _load(quality, latency)


@functools.lru_cache(maxsize=4)
def _load(quality: str, latency: str) -> ReplayData:
    requests, requests_meta = read_parquet(_resolve("requests", REQUESTS_TABLE))
    answers, quality_meta = read_parquet(_resolve(f"quality={quality}", QUALITY_SOURCES[quality]))
    preset, table_file, how = LATENCY_SOURCES[latency]
    latency_table = read_table(_resolve(f"latency={latency}", table_file))
    metadata = {"quality_source": quality, "latency_source": latency, "quality_table": quality_meta,
                "latency_table": latency_table.attrs.get("metadata", {}), "requests_table": requests_meta}
    if how == "measured":
        return build_replay_data_measured(requests, answers, latency_table, metadata=metadata)
    return build_replay_data(requests, answers, latency_table, preset, answered_by=quality_meta.get("preset", quality),
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


def simulate(request_id: str, config: Config, quality: str = "micro", latency: str = "molmoe-1b-h100") -> dict:
    """Quality, answer and the (median) latency record of one request at one config, from the tables.

    Returns `{quality, answer, output_tokens, preprocess_ms, vision_encoder_ms, projector_ms,
    prefill_ms, decode_ms, total_ms}`.
    """
    data = load_replay_data(quality, latency)
    try:
        i = data.request_ids.index(request_id)
    except ValueError:
        raise ValueError(f"request_id={request_id!r} is not in the recorded pool (e.g. {data.request_ids[0]!r})") from None
    j = data.config_index(config)
    return {
        "quality": float(data.quality[i, j]), "answer": str(data.answers[i, j]), "output_tokens": int(data.output_tokens[i, j]),
        **{name: float(v) for name, v in zip(STAGE_COLUMNS, data.stage_ms[i, j])}, "total_ms": float(data.total_ms[i, j]),
    }
