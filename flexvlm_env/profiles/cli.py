"""`flexvlm-profile`: measure and build the recorded tables the replay environment reads.

    flexvlm-profile requests  --preset micro --out profiles/micro_mygpu     # every (request, config), timed
    flexvlm-profile quality   --preset micro --out profiles/micro_quality   # answers and scores, batched
    flexvlm-profile stages    --preset molmoe-1b --weights random --out profiles/molmoe_stages
    flexvlm-profile validate-stages --preset molmoe-1b --weights random --stages profiles/molmoe_stages
    flexvlm-profile request-table --out requests.parquet                     # features + token counts (CPU)
    flexvlm-profile consolidate micro_quality.parquet profiles/micro_quality

Every sweep is resumable: kill it, rerun the same command, and it measures only what is missing.
`--max-minutes` stops a sweep cleanly between shards (device sessions have time limits).
"""
from __future__ import annotations

import json
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Optional, Union

import numpy as np
import tyro

from ..config import MASK_POLICIES, KnobGrid


def _as_flag(error: ValueError) -> ValueError:
    """A library error that names its argument (`per_family=0 ...`, `KnobGrid.crops=0 ...`) as the flag
    the user typed (`--per-family=0 ...`), so that the usage error points at the command line."""
    match = re.match(r"(?:\w+\.)?(\w+)=", str(error))
    if match is None:
        return error
    return ValueError(f"--{match.group(1).replace('_', '-')}={str(error)[match.end():]}")


def _at_least(flag: str, value: float, low: float) -> None:
    if not value >= low:  # `not >=`: NaN is refused too
        raise ValueError(f"{flag}={value} must be >= {low}")


def _fits(flag: str, values: tuple[int, ...], high: int, what: str) -> None:
    if max(values) > high:
        raise ValueError(f"{flag}={' '.join(map(str, values))}: {max(values)} exceeds {what}; allowed: 1..{high}")


def _table_metadata(flag: str, path: Path) -> dict:
    """Metadata of the profile table at `path` (a shard directory or a Parquet file), read without its
    rows; a ValueError naming `flag` when `path` is no such table."""
    import pyarrow as pa

    from .tables import TABLE_JSON, table_metadata

    allowed = "allowed: a table directory (with table.json) or a Parquet file written by flexvlm-profile"
    if path.is_dir() and not (path / TABLE_JSON).is_file():
        raise ValueError(f"{flag}={str(path)!r} is a directory without {TABLE_JSON}; {allowed}")
    if not path.exists():
        raise ValueError(f"{flag}={str(path)!r} does not exist; {allowed}")
    try:
        return table_metadata(path)
    except (pa.ArrowException, OSError):
        raise ValueError(f"{flag}={str(path)!r} is not a Parquet file; {allowed}") from None


@dataclass
class PoolOptions:
    """The procedural request pool a command covers."""

    families: tuple[str, ...] = ()
    """task families of the request pool (default: all nine)"""
    split: str = "val"
    """procedural split of the request pool: train, val or test"""
    per_family: int = 200
    """requests per family"""
    task_seed: int = 0
    """seed of the procedural request pool (>= 0)"""

    def __post_init__(self) -> None:
        # Every argument is checked in __post_init__, before a model loads or a table directory is
        # made: tyro turns the ValueError into a usage error (exit status 2) naming the flag.
        self.pool()

    def pool(self):
        from ..tasks.families import FAMILIES
        from .sweeps import RequestPool

        try:
            return RequestPool(families=self.families or tuple(FAMILIES), split=self.split, per_family=self.per_family,
                               task_seed=self.task_seed)
        except ValueError as error:
            raise _as_flag(error) from None

    def pool_metadata(self) -> dict:
        return {"families": list(self.pool().families), "split": self.split, "per_family": self.per_family,
                "task_seed": self.task_seed}


@dataclass
class ModelOptions(PoolOptions):
    """A model and the knob grid it runs at."""

    preset: str = "micro"
    """model preset: micro or molmoe-1b"""
    weights: Optional[str] = None
    """checkpoint (directory, .safetensors, hub id), 'random' (latency only), or None (micro: shipped weights)"""
    adapter: Optional[str] = None
    """LoRA adapter directory (scripts/finetune_lora.py) applied, merged, on top of the weights"""
    device: Optional[str] = None
    """cpu, cuda, ... (default: CUDA when available)"""
    dtype: Optional[str] = None
    """float32, bfloat16 or float16 (default: bf16 on CUDA, float32 on CPU)"""
    crops: tuple[int, ...] = KnobGrid().crops
    """crops values of the grid (at most the preset's max crops)"""
    top_k: tuple[int, ...] = KnobGrid().top_k
    """top_k values of the grid (at most the preset's experts)"""
    active_blocks: tuple[int, ...] = KnobGrid().active_blocks
    """active_blocks values of the grid (at most the preset's blocks)"""
    progress: bool = True
    """show a progress bar with ETA"""

    def __post_init__(self) -> None:
        super().__post_init__()
        self.check_model()
        self.grid()

    def check_model(self) -> None:
        """What `load_model` would refuse, refused before it loads anything."""
        from ..model.args import PRESETS
        from ..model.runtime import _resolve_device, _resolve_dtype  # the loader's own checks

        if self.preset not in PRESETS:
            raise ValueError(f"--preset={self.preset!r} is not known; allowed: {sorted(PRESETS)}")
        try:
            _resolve_dtype(self.dtype, _resolve_device(self.device))
        except ValueError as error:
            raise _as_flag(error) from None
        if self.weights is None and self.preset != "micro":
            raise ValueError(f"--preset={self.preset!r} has no shipped weights: pass --weights (a checkpoint "
                             "directory, .safetensors file or hub id, e.g. allenai/MolmoE-1B-0924) or --weights random")
        # As `resolve_checkpoint` reads it: a hub id is only downloaded when no such path exists.
        from ..model.checkpoint import looks_like_hub_id

        hub_id = looks_like_hub_id(self.weights)
        if self.weights not in (None, "random") and not (Path(self.weights).expanduser().exists() or hub_id):
            raise ValueError(f"--weights={self.weights!r} does not exist; allowed: a checkpoint directory or "
                             ".safetensors file, a hub id like allenai/MolmoE-1B-0924, or random")
        if self.adapter is not None and not Path(self.adapter).expanduser().is_dir():
            raise ValueError(f"--adapter={self.adapter!r} is not a directory; allowed: an adapter directory "
                             "written by scripts/finetune_lora.py")

    def grid(self) -> KnobGrid:
        """The grid, checked against the preset's sizes (a checkpoint of the preset has the same)."""
        from ..model.args import preset_args

        try:
            grid = KnobGrid(crops=self.crops, top_k=self.top_k, active_blocks=self.active_blocks)
        except ValueError as error:
            raise _as_flag(error) from None
        args = preset_args(self.preset)
        _fits("--crops", grid.crops, args.max_crops, f"the {self.preset} preset's max crops")
        _fits("--top-k", grid.top_k, args.n_experts, f"the {self.preset} preset's {args.n_experts} experts")
        _fits("--active-blocks", grid.active_blocks, args.n_layers, f"the {self.preset} preset's {args.n_layers} blocks")
        return grid

    def model(self):
        from ..model.runtime import load_model

        return load_model(self.preset, weights=self.weights, device=self.device, dtype=self.dtype, adapter=self.adapter)


@dataclass
class SweepOptions(ModelOptions):
    """A resumable sweep that fills a table directory."""

    max_minutes: Optional[float] = None
    """stop cleanly (between shards) after this many minutes; rerun to resume"""

    def __post_init__(self) -> None:
        super().__post_init__()
        self.deadline()

    def deadline(self) -> float | None:
        if self.max_minutes is not None and not self.max_minutes > 0:
            raise ValueError(f"--max-minutes={self.max_minutes} must be > 0")
        return time.time() + self.max_minutes * 60 if self.max_minutes else None


@dataclass
class Sharded(SweepOptions):
    shard: str = "0/1"
    """INDEX/COUNT: measure every COUNT-th request from INDEX (one process per GPU, e.g.
    CUDA_VISIBLE_DEVICES=i ... --shard i/4 --out DIR/shard-i; merge with `consolidate`)"""

    def __post_init__(self) -> None:
        super().__post_init__()
        self.shard_tuple()

    def shard_tuple(self) -> tuple[int, int]:
        try:
            index, count = (int(x) for x in self.shard.split("/"))
        except ValueError:
            raise ValueError(f"--shard={self.shard!r} must be INDEX/COUNT, e.g. 0/4") from None
        if not 0 <= index < count:
            raise ValueError(f"--shard={self.shard!r}: INDEX must be in 0..COUNT-1")
        return index, count


@dataclass
class Requests(Sharded):
    """Time every (request, config) at batch 1 with stage timing."""

    out: Path = Path("profiles/requests")
    """table directory (created; resumed if it exists)"""
    repeats: int = 5
    """measurements of each (request, config) in the repeated subset (>= 1)"""
    repeat_fraction: float = 0.1
    """fraction of requests (every k-th of each family) measured `repeats` times; the rest once (0..1)"""

    def __post_init__(self) -> None:
        super().__post_init__()
        _at_least("--repeats", self.repeats, 1)
        if not 0 <= self.repeat_fraction <= 1:
            raise ValueError(f"--repeat-fraction={self.repeat_fraction} must be in [0, 1]")


@dataclass
class Quality(Sharded):
    """Answer and score every (request, config) in batches."""

    out: Path = Path("profiles/quality")
    """table directory (created; resumed if it exists)"""
    batch_size: int = 256
    """requests per batch"""
    mask_policy: str = "importance"
    """which blocks run at reduced depth: importance, prefix or random (experiment M5; one table per policy)"""
    mask_seed: int = 0
    """seed of the random mask policy (>= 0)"""
    cache_gib: float = 4.0
    """memory (GiB, on the model's device) for prepared requests kept across the configurations
    of one crops value; past it each batch is prepared when it is answered (a 224 px micro request
    at 12 crops holds about 8 MB)"""

    def __post_init__(self) -> None:
        super().__post_init__()
        self.max_cached_bytes()
        _at_least("--batch-size", self.batch_size, 1)
        if self.mask_policy not in MASK_POLICIES:
            raise ValueError(f"mask_policy={self.mask_policy!r} is not valid; allowed: {MASK_POLICIES}")
        _at_least("--mask-seed", self.mask_seed, 0)

    def max_cached_bytes(self) -> int:
        if not self.cache_gib >= 0:
            raise ValueError(f"--cache-gib={self.cache_gib} must be >= 0 (0: keep nothing)")
        return int(self.cache_gib * 2**30)


@dataclass
class Stages(SweepOptions):
    """Stage tables: synthetic requests at every (crops, prefill bucket the pool needs, top_k, blocks)."""

    out: Path = Path("profiles/stages")
    """table directory (created; resumed if it exists)"""
    repeats: int = 3
    """measurements per point (>= 1)"""
    output_tokens: int = 32
    """forced output length (EOS ignored) of each measurement (>= 1)"""

    def __post_init__(self) -> None:
        super().__post_init__()
        _at_least("--repeats", self.repeats, 1)
        _at_least("--output-tokens", self.output_tokens, 1)


@dataclass
class ValidateStages(ModelOptions):
    """Compare latency composed from a stage table with end-to-end runs of requests it never saw."""

    stages: Path = Path("profiles/stages")
    """stage table directory or file (`flexvlm-profile stages`); it must cover the grid"""
    n_requests: int = 200
    """held-out requests (random pool requests at random grid configs and output lengths)"""
    seed: int = 0
    """seed of the request, config and output-length draws"""
    repeats: int = 3
    """timed runs per held-out request; their median is compared (the composition predicts the
    typical latency, the replay noise model its spread)"""
    json_out: Path = Path("profiles/replay_latency_validation.json")
    """summary JSON; the per-request rows go beside it (.parquet). Under profiles/ like the tables, so a run
    rewrites a committed results/replay_latency_validation*.json only when this names it"""

    def __post_init__(self) -> None:
        super().__post_init__()
        _at_least("--n-requests", self.n_requests, 1)
        _at_least("--repeats", self.repeats, 1)
        if self.json_out.is_dir():
            raise ValueError(f"--json-out={str(self.json_out)!r} is a directory; allowed: the JSON file to write")
        self.check_stages()

    def check_stages(self) -> None:
        """A non-empty stage table measured at every grid value, or the composition fails mid-run."""
        from .tables import read_table

        kind = _table_metadata("--stages", self.stages).get("kind")
        if kind != "stages":
            raise ValueError(f"--stages={str(self.stages)!r} is a {kind!r} table; allowed: a stage table "
                             "(flexvlm-profile stages)")
        try:
            stages = read_table(self.stages)
        except ValueError as error:
            raise ValueError(f"--stages={str(self.stages)!r}: {error}") from None
        if stages.empty:
            raise ValueError(f"--stages={str(self.stages)!r} holds no measurements yet; rerun its `stages` sweep")
        grid = self.grid()
        for name in ("crops", "top_k", "active_blocks"):
            measured = set(stages[name].tolist())
            missing = [v for v in getattr(grid, name) if v not in measured]
            if missing:
                raise ValueError(f"--{name.replace('_', '-')}={' '.join(map(str, getattr(grid, name)))}: {missing} not "
                                 f"in the stage table; allowed: values it measured, {sorted(measured)}")


@dataclass
class RequestTable(PoolOptions):
    """Per (request, crops): controller features and token counts for the given presets (CPU only)."""

    crops: tuple[int, ...] = KnobGrid().crops
    """crops values (at most each preset's max crops)"""
    out: Path = Path("requests.parquet")
    """Parquet file"""
    presets: tuple[str, ...] = ("micro", "molmoe-1b")
    """presets whose token counts to record (columns `<preset>/input_tokens`, ...)"""

    def __post_init__(self) -> None:
        super().__post_init__()
        from ..model.args import PRESETS

        unknown = [p for p in self.presets if p not in PRESETS]
        if unknown or not self.presets:
            raise ValueError(f"--presets={' '.join(self.presets)}: unknown {unknown}; allowed: one or more of {sorted(PRESETS)}")
        try:
            KnobGrid(crops=self.crops)
        except ValueError as error:
            raise _as_flag(error) from None
        for preset in self.presets:
            _fits("--crops", self.crops, PRESETS[preset].max_crops, f"the {preset} preset's max crops")
        if self.out.is_dir():
            raise ValueError(f"--out={str(self.out)!r} is a directory; allowed: the Parquet file to write")


@dataclass
class Consolidate:
    """Merge table directories (one, or the --shard parts of one sweep) into one Parquet file (what ships)."""

    out: tyro.conf.Positional[Annotated[Path, tyro.conf.arg(metavar="OUT")]]
    """the Parquet file to write (its directory is created)"""
    directories: tyro.conf.Positional[Annotated[tuple[Path, ...], tyro.conf.arg(metavar="TABLE [TABLE ...]")]]
    """table directories (or Parquet files) to merge (their metadata must agree but for the shard)"""

    def __post_init__(self) -> None:
        if not self.directories:
            raise ValueError("TABLE: no table given; allowed: one or more table directories or Parquet files")
        for path in self.directories:
            _table_metadata("TABLE", path)
        if self.out.is_dir():
            raise ValueError(f"OUT={str(self.out)!r} is a directory; allowed: the Parquet file to write")


Command = Union[
    Annotated[Requests, tyro.conf.subcommand("requests")],
    Annotated[Quality, tyro.conf.subcommand("quality")],
    Annotated[Stages, tyro.conf.subcommand("stages")],
    Annotated[ValidateStages, tyro.conf.subcommand("validate-stages")],
    Annotated[RequestTable, tyro.conf.subcommand("request-table")],
    Annotated[Consolidate, tyro.conf.subcommand("consolidate")],
]


def run(cmd) -> dict:
    """Execute one parsed command; returns a small summary (also printed by `main`)."""
    from . import sweeps
    from .tables import ShardedTable, consolidate

    if isinstance(cmd, Consolidate):
        cmd.out.parent.mkdir(parents=True, exist_ok=True)
        return {"written": str(consolidate(cmd.directories, cmd.out))}
    if isinstance(cmd, RequestTable):
        return {"written": str(write_request_table(cmd))}
    grid = cmd.grid()
    if isinstance(cmd, ValidateStages):
        return validate_stages(cmd)
    deadline = cmd.deadline()
    vlm = cmd.model()
    samples = cmd.pool().samples()
    pool = cmd.pool_metadata()
    if isinstance(cmd, Requests):
        shard = cmd.shard_tuple()
        protocol = sweeps.grid_protocol(grid, pool=pool, repeats=cmd.repeats, repeat_fraction=cmd.repeat_fraction,
                                        warmup="one untimed request per (config, prefill bucket)", estimator="median",
                                        shard=list(shard),
                                        **({"shard_assignment": sweeps.REQUEST_SHARD_ASSIGNMENT} if shard != (0, 1) else {}))
        table = ShardedTable(cmd.out, sweeps.REQUEST_KEY, sweeps.table_metadata(vlm, "requests", protocol))
        n = sweeps.profile_requests(vlm, samples, grid.configs(), table, repeats=cmd.repeats,
                                    repeat_fraction=cmd.repeat_fraction, shard=shard, deadline_s=deadline,
                                    progress=cmd.progress)
    elif isinstance(cmd, Quality):
        shard, cache_bytes = cmd.shard_tuple(), cmd.max_cached_bytes()  # both refused before any request is answered
        protocol = sweeps.grid_protocol(grid, pool=pool, decoding="greedy, batched, stop at EOS or the family budget",
                                        mask_policy=cmd.mask_policy, mask_seed=cmd.mask_seed,
                                        # recorded only when sharded: unsharded tables made before --shard still resume
                                        **({"shard": list(shard)} if shard != (0, 1) else {}))
        table = ShardedTable(cmd.out, sweeps.QUALITY_KEY, sweeps.table_metadata(vlm, "quality", protocol))
        # Config validates the policy name: a clear error before any request is answered.
        configs = grid.configs(mask_policy=cmd.mask_policy, mask_seed=cmd.mask_seed)
        n = sweeps.profile_quality(vlm, sweeps.shard_of(samples, shard), configs, table, batch_size=cmd.batch_size,
                                   deadline_s=deadline, progress=cmd.progress, max_cached_bytes=cache_bytes)
    elif isinstance(cmd, Stages):
        pairs = sweeps.stage_plan(vlm, samples, grid.crops)
        protocol = sweeps.grid_protocol(grid, pool=pool, repeats=cmd.repeats, output_tokens=cmd.output_tokens,
                                        warmup="one untimed run per point", pairs=[list(p) for p in pairs])
        table = ShardedTable(cmd.out, sweeps.STAGE_KEY, sweeps.table_metadata(vlm, "stages", protocol))
        n = sweeps.profile_stages(vlm, pairs, grid, table, repeats=cmd.repeats, output_tokens=cmd.output_tokens,
                                  deadline_s=deadline, progress=cmd.progress)
    else:
        raise ValueError(f"unknown command {type(cmd).__name__}")
    expected = _expected_rows(cmd, samples, grid, table)
    present = len(table.done_keys())
    return {"table": str(cmd.out), "rows_written_now": n, "rows_present": present, "rows_expected": expected,
            "complete": present >= expected}


def _expected_rows(cmd, samples, grid, table) -> int:
    from .sweeps import repeat_counts, request_shard, shard_of

    if isinstance(cmd, Requests):
        counts = repeat_counts(samples, cmd.repeats, cmd.repeat_fraction)
        return sum(counts[s.request_id] for s in request_shard(samples, counts, cmd.shard_tuple())) * len(grid)
    if isinstance(cmd, Quality):
        return len(shard_of(samples, cmd.shard_tuple())) * len(grid)
    pairs = table.metadata["protocol"]["pairs"]
    return len(pairs) * len(grid.top_k) * len(grid.active_blocks) * cmd.repeats


def write_request_table(cmd: RequestTable) -> Path:
    import pandas as pd

    from ..features import request_features
    from .tables import code_version, write_parquet
    from .tokens import TokenCounter

    samples = cmd.pool().samples()
    counters = {p: TokenCounter.for_preset(p) for p in cmd.presets}
    rows = []
    for sample in samples:
        base = {"request_id": sample.request_id, "family": sample.family, "max_new_tokens": sample.max_new_tokens,
                **request_features(sample.image, sample.prompt)}
        for crops in cmd.crops:
            row = {**base, "crops": crops}
            for preset, counter in counters.items():
                for name, value in counter.request(sample.image.size, sample.prompt, crops).items():
                    row[f"{preset}/{name}"] = value
            rows.append(row)
    meta = {"kind": "requests", "pool": cmd.pool_metadata(), "presets": list(cmd.presets),
            "code_version": code_version(), "key": ["request_id", "crops"]}
    cmd.out.parent.mkdir(parents=True, exist_ok=True)
    return write_parquet(pd.DataFrame(rows), cmd.out, meta)


def validate_stages(cmd: ValidateStages) -> dict:
    """See `ValidateStages`. Writes the summary JSON (and the per-request rows beside it)."""
    import pandas as pd
    from tqdm.auto import tqdm

    from ..benchmarking import device_info
    from ..model.timing import STAGE_FIELDS
    from .compose import StageModel, error_summary
    from .tables import read_table

    stages = read_table(cmd.stages)
    model = StageModel.fit(stages)
    vlm = cmd.model()
    samples = cmd.pool().samples()
    grid = cmd.grid()
    rng = np.random.default_rng(cmd.seed)
    rows = []
    chosen = rng.choice(len(samples), size=min(cmd.n_requests, len(samples)), replace=False)
    for i in tqdm(chosen, desc=f"validate {vlm.args.name}", unit="request", disable=not cmd.progress):
        sample = samples[int(i)]
        config = grid.configs()[int(rng.integers(len(grid)))]
        n_out = int(rng.integers(1, sample.max_new_tokens + 1))
        kwargs = dict(max_new_tokens=n_out, ignore_eos=True)
        vlm.generate(sample.image, sample.prompt, config, **kwargs)  # untimed: graph capture on first use
        runs = [vlm.generate(sample.image, sample.prompt, config, **kwargs) for _ in range(cmd.repeats)]
        result = sorted(runs, key=lambda r: r.latency.total_ms)[len(runs) // 2]  # the median run
        composed = model.compose(config.crops, config.top_k, config.active_blocks, [result.tokens.input], [n_out])[0]
        rows.append({"request_id": sample.request_id, "crops": config.crops, "top_k": config.top_k,
                     "active_blocks": config.active_blocks, "input_tokens": result.tokens.input, "output_tokens": n_out,
                     "measured_total_ms": result.latency.total_ms, "composed_total_ms": float(composed.sum()),
                     **{f"composed_{n}": float(v) for n, v in zip(STAGE_FIELDS, composed)},
                     **{f"measured_{n}": getattr(result.latency, n) for n in STAGE_FIELDS}})
    frame = pd.DataFrame(rows)
    info = device_info(vlm.device)
    summary = {"preset": vlm.args.name, "device": info.get("device_name"), "device_info": info,
               "stage_table": str(cmd.stages), "stage_table_metadata": stages.attrs.get("metadata", {}),
               **error_summary(frame["measured_total_ms"], frame["composed_total_ms"]),
               "per_stage_median_abs_pct_error": {
                   n: float(np.median(np.abs(frame[f"composed_{n}"] - frame[f"measured_{n}"]) / frame[f"measured_{n}"].clip(lower=1e-6) * 100))
                   for n in ("vision_encoder_ms", "prefill_ms", "decode_ms")},
               "protocol": {"n_requests": len(frame), "seed": cmd.seed, "output_tokens": "uniform in 1..family budget, EOS ignored",
                            "config": "uniform over the grid", "warmup": "one untimed run of the same request first",
                            "measured": f"median total of {cmd.repeats} timed runs (the median run's stages)"}}
    cmd.json_out.parent.mkdir(parents=True, exist_ok=True)
    cmd.json_out.write_text(json.dumps(summary, indent=1))
    frame.to_parquet(cmd.json_out.with_suffix(".parquet"), index=False)
    return {k: summary[k] for k in ("n_requests", "median_abs_pct_error", "p95_abs_pct_error")}


def main(argv=None) -> None:
    cmd = tyro.cli(Command, args=argv)  # a ValueError of a command's __post_init__ is a usage error (exit 2)
    try:
        print(json.dumps(run(cmd), indent=1, default=str))
    except KeyboardInterrupt:  # the sweeps have written every finished row (sweeps.RowWriter): say so, no traceback
        out = getattr(cmd, "out", None)
        print(f"flexvlm-profile: interrupted; the rows measured so far are in {out}: rerun the same command to "
              "measure the rest", file=sys.stderr)
        raise SystemExit(130) from None


if __name__ == "__main__":
    main()
