"""Measurement sweeps that fill profile tables: request latency, batched quality, stage tables.

- `profile_requests`: every (request, config) through `VLM.generate` at batch 1 with stage timing,
  `repeats` times for a fixed subset of requests and once for the rest (the repeats are what the
  replay environment's noise model is fitted on). Before a config's requests are timed, one request
  per prefill-length bucket runs untimed, so graph capture and kernel compilation never land in a
  measurement.
- `profile_quality`: the answer and metric score of every (request, config), answered in batches
  (`QualityEvaluator`: the same greedy answers as batch 1, much faster).
- `profile_stages`: stage tables for composing latency from token counts (a model whose requests
  are too many to time one by one, e.g. `molmoe-1b` over the whole request pool): synthetic
  requests at every (crops, prefill-length bucket, top_k, active_blocks) with forced output length.

Each sweep writes to a `ShardedTable` and skips keys already there: rerun after a crash and it
finishes with every measurement exactly once. Rows are written as each configuration (stages: each
(crops, length)) is done, and the finished rows of the one in progress when the sweep is interrupted
(Ctrl-C, SIGINT, an error; quality: its finished batches), so a kill loses no finished measurement.
`deadline_s` stops a sweep cleanly between shards.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from typing import Sequence

from PIL import Image
from tqdm.auto import tqdm

from ..benchmarking import device_info
from ..config import Config, KnobGrid
from ..evaluation import DEFAULT_MAX_CACHED_BYTES, QualityEvaluator
from ..metrics import score
from ..model.runtime import VLM
from ..model.timing import STAGE_FIELDS
from ..tasks import SPLITS, load_samples
from ..tasks.families import FAMILIES
from ..tasks.sample import Sample
from .tables import ShardedTable, code_version
from .tokens import TokenCounter

REQUEST_KEY = ("request_id", "crops", "top_k", "active_blocks", "repeat")
QUALITY_KEY = ("request_id", "crops", "top_k", "active_blocks")
STAGE_KEY = ("crops", "input_tokens", "top_k", "active_blocks", "repeat")
LATENCY_COLUMNS = STAGE_FIELDS + ("total_ms",)


@dataclass(frozen=True)
class RequestPool:
    """The requests a table covers: procedural `split`, `per_family` requests of each family."""

    families: tuple[str, ...] = tuple(FAMILIES)
    split: str = "val"
    per_family: int = 200
    task_seed: int = 0

    def __post_init__(self) -> None:
        unknown = sorted(set(self.families) - set(FAMILIES))
        if unknown or not self.families:
            raise ValueError(f"families={self.families!r}: unknown {unknown}; allowed: {sorted(FAMILIES)}")
        if self.split not in SPLITS:
            raise ValueError(f"split={self.split!r} is not valid; allowed: {SPLITS}")
        if self.per_family < 1:
            raise ValueError(f"per_family={self.per_family} must be >= 1")
        if self.task_seed < 0:  # as the envs (FlexVLM-v0) refuse it: a table no env can serve
            raise ValueError(f"task_seed={self.task_seed} must be >= 0")

    def samples(self) -> list[Sample]:
        out: list[Sample] = []
        for family in self.families:
            out.extend(load_samples(family, "procedural", self.split, self.per_family, self.task_seed))
        return out


def table_metadata(vlm: VLM, kind: str, protocol: dict) -> dict:
    """Provenance shared by every table: hardware, software, model and how it was measured."""
    info = device_info(vlm.device)
    return {
        "kind": kind,
        "preset": vlm.args.name,
        "weights_sha256": vlm.weights_sha256 or ("random" if vlm.random_weights else None),
        "adapter_sha256": vlm.adapter_sha256,  # None without a LoRA adapter
        "dtype": str(vlm.dtype).replace("torch.", ""),
        "device_name": info.get("device_name"),
        "device": info,
        "code_version": code_version(),
        "block_ranking": list(vlm.block_ranking),
        "protocol": protocol,
        "created_unix_s": time.time(),
    }


def _bucket(length: int, bucket: int) -> int:
    return int(math.ceil(length / bucket) * bucket)


def _deadline_passed(deadline_s: float | None) -> bool:
    return deadline_s is not None and time.time() >= deadline_s


class RowWriter:
    """Measured rows on their way into a table. `flush` writes them as one shard; leaving the `with`
    block flushes too, also on an exception or Ctrl-C (SIGINT), so a killed sweep keeps every
    measurement it finished and a rerun measures only the rest. Only whole rows are ever added."""

    def __init__(self, table: ShardedTable):
        self.table, self.rows, self.written = table, [], 0

    def __enter__(self) -> "RowWriter":
        return self

    def __exit__(self, *exc_info) -> None:
        self.flush()

    def flush(self) -> None:
        # Take the rows first: an interruption during the write then loses them (measured again on
        # resume) instead of writing them twice (duplicate keys that `read_table` refuses).
        rows, self.rows = self.rows, []
        self.table.append(rows)
        self.written += len(rows)


def repeat_counts(samples: Sequence[Sample], repeats: int, repeat_fraction: float) -> dict[str, int]:
    """Measurements per request: `repeats` for every `round(1 / repeat_fraction)`-th request of each
    family (the same subset on every rerun and every shard, spread over families), 1 otherwise."""
    if repeats < 1:
        raise ValueError(f"repeats={repeats} must be >= 1")
    if not 0 <= repeat_fraction <= 1:
        raise ValueError(f"repeat_fraction={repeat_fraction} must be in [0, 1]")
    stride = max(1, round(1 / repeat_fraction)) if repeat_fraction > 0 else None
    seen: dict[str, int] = {}
    counts = {}
    for sample in samples:
        i = seen.get(sample.family, 0)
        seen[sample.family] = i + 1
        counts[sample.request_id] = repeats if stride is not None and i % stride == 0 else 1
    return counts


def shard_of(samples: Sequence[Sample], shard: tuple[int, int]) -> list[Sample]:
    """Requests of shard (index, count): every count-th request from position index, so that
    `count` processes on `count` GPUs measure disjoint parts of one pool."""
    index, count = shard
    if not (isinstance(count, int) and count >= 1 and isinstance(index, int) and 0 <= index < count):
        raise ValueError(f"shard={shard!r} must be (index, count) with 0 <= index < count")
    return [s for k, s in enumerate(samples) if k % count == index]


def request_shard(samples: Sequence[Sample], n_repeats: dict[str, int], shard: tuple[int, int]) -> list[Sample]:
    """Requests of shard (index, count) for a request sweep: the repeated requests and the others
    are each dealt out like `shard_of`, so every shard times about as many runs. Dealing the pool
    as a whole would put every repeated request on the even shards (they are every 10th request of
    each family): with 2 GPUs, shard 0 would time 1.8x shard 1's runs."""
    repeated = {s.request_id for s in shard_of([s for s in samples if n_repeats[s.request_id] > 1], shard)}
    single = {s.request_id for s in shard_of([s for s in samples if n_repeats[s.request_id] == 1], shard)}
    return [s for s in samples if s.request_id in repeated or s.request_id in single]  # pool order


# What the protocol of a sharded request table records: a table started with the older whole-pool
# dealing has no such entry, so resuming it with this code is refused rather than mixed.
REQUEST_SHARD_ASSIGNMENT = "repeated and single requests dealt out separately"


def profile_requests(
    vlm: VLM,
    samples: Sequence[Sample],
    configs: Sequence[Config],
    table: ShardedTable,
    *,
    repeats: int = 5,
    repeat_fraction: float = 0.1,
    shard: tuple[int, int] = (0, 1),
    shard_rows: int = 2000,
    deadline_s: float | None = None,
    progress: bool = True,
) -> int:
    """Time every (request, config) of `shard` of `samples` (`repeat_counts` says how often);
    see module docstring. Rows are written at the end of each config, every `shard_rows` rows within
    one, and on interruption. Returns the rows written by this call."""
    n_repeats = repeat_counts(samples, repeats, repeat_fraction)
    samples = request_shard(samples, n_repeats, shard)
    # Prefill bucket of each (request, crops), for the untimed warm-up of each config.
    counter = TokenCounter.for_model(vlm)
    buckets: dict[tuple[str, int], int] = {}
    done = table.done_keys()
    todo_total = sum(n_repeats[s.request_id] for s in samples) * len(configs) - len(done)
    bucket = 64
    with tqdm(total=max(todo_total, 0), desc=f"profile {vlm.args.name}", unit="run", disable=not progress) as bar, \
            RowWriter(table) as writer:
        for config in configs:
            plan_key = (config.crops, config.top_k, config.active_blocks)
            pending = [
                (s, r) for s in samples for r in range(n_repeats[s.request_id])
                if (s.request_id, *plan_key, r) not in done
            ]
            if not pending:
                continue
            # Untimed warm-up: one request per prefill bucket this config will see.
            warm: dict[int, Sample] = {}
            for sample, _ in pending:
                key = (sample.request_id, config.crops)
                if key not in buckets:
                    counts = counter.request(sample.image.size, sample.prompt, config.crops, config.crop_rule)
                    buckets[key] = _bucket(counts["input_tokens"], bucket)
                warm.setdefault(buckets[key], sample)
            for sample in warm.values():
                vlm.generate(sample.image, sample.prompt, config, max_new_tokens=sample.max_new_tokens)
            for sample, repeat in pending:
                result = vlm.generate(sample.image, sample.prompt, config, max_new_tokens=sample.max_new_tokens)
                writer.rows.append(_request_row(sample, config, repeat, result))
                bar.update(1)
                if len(writer.rows) >= shard_rows:  # a config of many requests still writes as it goes
                    writer.flush()
                    if _deadline_passed(deadline_s):
                        return writer.written
            writer.flush()  # every config ends a shard: even SIGKILL loses at most the config in progress
            if _deadline_passed(deadline_s):
                break
    return writer.written


def _request_row(sample: Sample, config: Config, repeat: int, result) -> dict:
    latency = result.latency
    return {
        "request_id": sample.request_id, "family": sample.family,
        "crops": config.crops, "top_k": config.top_k, "active_blocks": config.active_blocks, "repeat": repeat,
        **{name: getattr(latency, name) for name in LATENCY_COLUMNS},
        "vision_tokens": result.tokens.vision, "prompt_tokens": result.tokens.prompt,
        "layout_tokens": result.tokens.layout, "input_tokens": result.tokens.input,
        "output_tokens": result.tokens.output,
        "answer": result.text, "quality": float(score(sample, result.text)),
    }


def profile_quality(
    vlm: VLM,
    samples: Sequence[Sample],
    configs: Sequence[Config],
    table: ShardedTable,
    *,
    batch_size: int = 256,
    deadline_s: float | None = None,
    progress: bool = True,
    max_cached_bytes: int = DEFAULT_MAX_CACHED_BYTES,
) -> int:
    """Answer and score every (request, config) in batches; one shard per config.
    `max_cached_bytes` bounds the prepared requests kept across one crops value's configurations."""
    done = table.done_keys()
    ordered = sorted(configs, key=lambda c: (c.crops, c.crop_rule))  # prepare each request once per crops value
    evaluator = QualityEvaluator(vlm, samples, batch_size=batch_size, max_cached_bytes=max_cached_bytes)
    with RowWriter(table) as writer:  # one shard per config, and the finished batches of one interrupted
        for config in tqdm(ordered, desc=f"quality {vlm.args.name}", unit="config", disable=not progress):
            missing = [s for s in samples if (s.request_id, config.crops, config.top_k, config.active_blocks) not in done]
            if not missing:
                continue
            # A pool that grew since the last run, or a config interrupted mid-way: answer only what is missing.
            source = evaluator if len(missing) == len(samples) else QualityEvaluator(
                vlm, missing, batch_size=batch_size, max_cached_bytes=max_cached_bytes)
            for chunk, results in source.batch_results(config):
                writer.rows.extend(_quality_row(s, config, r) for s, r in zip(source.samples[chunk], results))
            writer.flush()
            if _deadline_passed(deadline_s):
                break
    return writer.written


def _quality_row(sample: Sample, config: Config, result) -> dict:
    return {"request_id": sample.request_id, "family": sample.family, "crops": config.crops, "top_k": config.top_k,
            "active_blocks": config.active_blocks, "quality": float(score(sample, result.text)), "answer": result.text,
            "output_tokens": result.tokens.output}


def synthetic_request(vlm: VLM, crops: int, input_tokens: int, aspect: float = 4 / 3,
                      bucket: int = 64) -> tuple[Image.Image, str]:
    """An image and a prompt whose request is as long as possible without exceeding `input_tokens`
    at `crops`, and so falls in the same `bucket`-token prefill bucket (the prompt grows a word at a
    time, and a word may be several tokens). When the image layout alone is longer, the shortest
    prompt is returned (the measured length is recorded either way)."""
    height = 288  # the procedural images' typical size (host preprocessing scales with it)
    image = Image.new("RGB", (int(round(height * aspect)), height), (128, 96, 64))

    counter = TokenCounter.for_model(vlm)

    def length(words: int) -> int:
        return counter.request(image.size, " ".join(["count"] * words), crops)["input_tokens"]

    if length(1) >= input_tokens:
        return image, "count"
    # Largest word count whose length is <= input_tokens (length grows with the word count).
    low, high = 1, 2
    while length(high) <= input_tokens:
        low, high = high, high * 2
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (middle, high) if length(middle) <= input_tokens else (low, middle)
    if length(low) <= input_tokens - bucket:
        raise ValueError(f"no prompt of repeated words reaches ({input_tokens - bucket}, {input_tokens}] tokens at crops={crops}")
    return image, " ".join(["count"] * low)


def stage_plan(vlm: VLM, samples: Sequence[Sample], crops_values: Sequence[int], bucket: int = 64) -> list[tuple[int, int]]:
    """(crops, input length) pairs a stage table must cover for `samples`: for each crops value,
    one length inside every prefill bucket the requests fall into (the bucket's upper end)."""
    counter = TokenCounter.for_model(vlm)
    pairs = set()
    for crops in crops_values:
        for sample in samples:
            n = counter.request(sample.image.size, sample.prompt, crops)["input_tokens"]
            pairs.add((crops, _bucket(n, bucket)))
    return sorted(pairs)


def profile_stages(
    vlm: VLM,
    pairs: Sequence[tuple[int, int]],
    grid: KnobGrid,
    table: ShardedTable,
    *,
    repeats: int = 3,
    output_tokens: int = 32,
    deadline_s: float | None = None,
    progress: bool = True,
) -> int:
    """Stage measurements at every (crops, input length) x (top_k, active_blocks), output forced to
    `output_tokens` (EOS ignored), `repeats` times each; see module docstring."""
    for name, value in (("repeats", repeats), ("output_tokens", output_tokens)):
        if value < 1:  # 0 would measure nothing and leave a table that reads as complete
            raise ValueError(f"{name}={value} must be >= 1")
    done = table.done_keys()
    with RowWriter(table) as writer:
        for crops, length in tqdm(pairs, desc=f"stages {vlm.args.name}", unit="length", disable=not progress):
            image, prompt = synthetic_request(vlm, crops, length)  # the bucket's last length
            for top_k in grid.top_k:
                for blocks in grid.active_blocks:
                    config = Config(crops=crops, top_k=top_k, active_blocks=blocks)
                    todo = [r for r in range(repeats) if (crops, length, top_k, blocks, r) not in done]
                    if not todo:
                        continue
                    vlm.generate(image, prompt, config, max_new_tokens=output_tokens, ignore_eos=True)  # warm-up
                    for repeat in todo:
                        result = vlm.generate(image, prompt, config, max_new_tokens=output_tokens, ignore_eos=True)
                        writer.rows.append(_stage_row(crops, length, top_k, blocks, repeat, result))
            writer.flush()  # one shard per (crops, length)
            if _deadline_passed(deadline_s):
                break
    return writer.written


def _stage_row(crops: int, length: int, top_k: int, blocks: int, repeat: int, result) -> dict:
    lat = result.latency
    return {
        "crops": crops, "input_tokens": length, "top_k": top_k, "active_blocks": blocks, "repeat": repeat,
        "measured_input_tokens": result.tokens.input, "vision_tokens": result.tokens.vision,
        "output_tokens": result.tokens.output,
        **{name: getattr(lat, name) for name in LATENCY_COLUMNS},
        "decode_ms_per_token": list(lat.decode_ms_per_token),
    }


def grid_protocol(grid: KnobGrid, **extra) -> dict:
    return {"grid": asdict(grid), **extra}
