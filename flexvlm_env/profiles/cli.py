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
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Optional, Union

import numpy as np
import tyro

from ..config import MASK_POLICIES, KnobGrid


@dataclass
class Common:
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
    families: tuple[str, ...] = ()
    """task families of the request pool (default: all nine)"""
    split: str = "val"
    """procedural split of the request pool"""
    per_family: int = 200
    """requests per family"""
    task_seed: int = 0
    """seed of the procedural request pool"""
    crops: tuple[int, ...] = KnobGrid().crops
    """crops values of the grid"""
    top_k: tuple[int, ...] = KnobGrid().top_k
    """top_k values of the grid"""
    active_blocks: tuple[int, ...] = KnobGrid().active_blocks
    """active_blocks values of the grid"""
    max_minutes: Optional[float] = None
    """stop cleanly (between shards) after this many minutes; rerun to resume"""
    progress: bool = True
    """show a progress bar with ETA"""

    def __post_init__(self) -> None:
        # Every argument checked here, before a model loads or a table directory is made.
        self.grid()
        self.pool()
        self.deadline()

    def grid(self) -> KnobGrid:
        return KnobGrid(crops=self.crops, top_k=self.top_k, active_blocks=self.active_blocks)

    def pool(self):
        from ..tasks.families import FAMILIES
        from .sweeps import RequestPool

        return RequestPool(families=self.families or tuple(FAMILIES), split=self.split, per_family=self.per_family, task_seed=self.task_seed)

    def model(self):
        from ..model.runtime import load_model

        return load_model(self.preset, weights=self.weights, device=self.device, dtype=self.dtype, adapter=self.adapter)

    def deadline(self) -> float | None:
        if self.max_minutes is not None and self.max_minutes <= 0:
            raise ValueError(f"--max-minutes={self.max_minutes} must be > 0")
        return time.time() + self.max_minutes * 60 if self.max_minutes else None


@dataclass
class Sharded(Common):
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
    """measurements of each (request, config) in the repeated subset"""
    repeat_fraction: float = 0.1
    """fraction of requests (every k-th of each family) measured `repeats` times; the rest once"""


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
    """seed of the random mask policy"""
    cache_gib: float = 4.0
    """memory (GiB, on the model's device) for prepared requests kept across the configurations
    of one crops value; past it each batch is prepared when it is answered (a 224 px micro request
    at 12 crops holds about 8 MB)"""

    def __post_init__(self) -> None:
        super().__post_init__()
        self.max_cached_bytes()
        if self.mask_policy not in MASK_POLICIES:
            raise ValueError(f"mask_policy={self.mask_policy!r} is not valid; allowed: {MASK_POLICIES}")

    def max_cached_bytes(self) -> int:
        if not self.cache_gib >= 0:
            raise ValueError(f"--cache-gib={self.cache_gib} must be >= 0 (0: keep nothing)")
        return int(self.cache_gib * 2**30)


@dataclass
class Stages(Common):
    """Stage tables: synthetic requests at every (crops, prefill bucket the pool needs, top_k, blocks)."""

    out: Path = Path("profiles/stages")
    """table directory (created; resumed if it exists)"""
    repeats: int = 3
    """measurements per point"""
    output_tokens: int = 32
    """forced output length (EOS ignored) of each measurement"""


@dataclass
class ValidateStages(Common):
    """Compare latency composed from a stage table with end-to-end runs of requests it never saw."""

    stages: Path = Path("profiles/stages")
    """stage table directory or file"""
    n_requests: int = 200
    """held-out requests (random pool requests at random grid configs and output lengths)"""
    seed: int = 0
    """seed of the request, config and output-length draws"""
    repeats: int = 3
    """timed runs per held-out request; their median is compared (the composition predicts the
    typical latency, the replay noise model its spread)"""
    json_out: Path = Path("results/replay_latency_validation.json")
    """summary JSON"""


@dataclass
class RequestTable(Common):
    """Per (request, crops): controller features and token counts for the given presets (CPU only)."""

    out: Path = Path("requests.parquet")
    """Parquet file"""
    presets: tuple[str, ...] = ("micro", "molmoe-1b")
    """presets whose token counts to record (columns `<preset>/input_tokens`, ...)"""


@dataclass
class Consolidate:
    """Merge table directories (one, or the --shard parts of one sweep) into one Parquet file (what ships)."""

    out: tyro.conf.Positional[Path]
    """the Parquet file to write"""
    directories: tyro.conf.Positional[tuple[Path, ...]]
    """table directories to merge (their metadata must agree but for the shard)"""


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
        return {"written": str(consolidate(cmd.directories, cmd.out))}
    if isinstance(cmd, RequestTable):
        return {"written": str(write_request_table(cmd))}
    grid = cmd.grid()
    if isinstance(cmd, ValidateStages):
        return validate_stages(cmd)
    deadline = cmd.deadline()
    vlm = cmd.model()
    samples = cmd.pool().samples()
    pool = {"families": list(cmd.pool().families), "split": cmd.split, "per_family": cmd.per_family, "task_seed": cmd.task_seed}
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
    meta = {"kind": "requests", "pool": {"families": list(cmd.pool().families), "split": cmd.split,
            "per_family": cmd.per_family, "task_seed": cmd.task_seed}, "presets": list(cmd.presets),
            "code_version": code_version(), "key": ["request_id", "crops"]}
    cmd.out.parent.mkdir(parents=True, exist_ok=True)
    return write_parquet(pd.DataFrame(rows), cmd.out, meta)


def validate_stages(cmd: ValidateStages) -> dict:
    """See `ValidateStages`. Writes the summary JSON (and the per-request rows beside it)."""
    import pandas as pd

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
    for i in rng.choice(len(samples), size=min(cmd.n_requests, len(samples)), replace=False):
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
    print(json.dumps(run(cmd), indent=1, default=str))


if __name__ == "__main__":
    main()
