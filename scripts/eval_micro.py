"""Quality of the shipped `micro` weights across the knob grid: `results/micro_quality.json`.

    python scripts/eval_micro.py                       # CPU: about 50 minutes on 2 cores for the first (112 px) micro, longer at 224 px
    python scripts/eval_micro.py --requests-per-family 20 --grid-requests-per-family 4 --latency-repeats 1  # quick: results/quick/

Three measurements, all greedy generation scored with each family's metric on the procedural
`val` split (fixed seed):
1. the quality table: the full configuration, each knob swept with the other two at full, and the
   smallest configuration, on `--requests-per-family` requests per family;
2. per-request quality at all 140 grid configurations on the first `--grid-requests-per-family`
   of those requests (what adaptivity needs);
3. each configuration's latency relative to the full one on this machine: the median over
   `--latency-requests` requests (one per family in turn) of `--latency-repeats` timed runs with the
   output forced to `--latency-tokens` tokens, so that the ratio reflects the knobs and not how
   long an answer happened to be.
Then the adaptivity figures: the share of requests that reach their full-configuration quality at
some configuration whose latency is <= 50% of the full one's, and the share that lose quality at
every configuration below full; and each quality bar of the issue, checked.

`--quality-table` replaces 1 and 2 by a recorded quality table (`flexvlm-profile quality`, every
request at every configuration, answered in batches on a GPU in minutes), and `--latency-source`
replaces 3 by a shipped replay latency source (e.g. `micro-h200`): then the whole evaluation is a
few seconds on a CPU (written under results/quick/ unless --out is given: the committed result times latency here).

Every argument is checked before the model loads (a bad one is a usage error, exit status 2), so a
typo does not surface at the end of a half-hour run.
"""
from __future__ import annotations

import json
import platform
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import tyro

import flexvlm_env
from flexvlm_env.config import Config, KnobGrid
from flexvlm_env.evaluation import QualityEvaluator
from flexvlm_env.experiments.common import QUICK_SUBDIR
from flexvlm_env.model.runtime import load_model
from flexvlm_env.tasks import FAMILIES, SPLITS
from flexvlm_env.tasks.procedural import GENERATOR_VERSION, generate_samples

DEFAULT_OUT = "results/micro_quality.json"
# What a smaller run would shrink (the latency ones only when it times here)
SAMPLE_SIZES = ("requests_per_family", "grid_requests_per_family")
LATENCY_SAMPLE_SIZES = ("latency_requests", "latency_repeats")


@dataclass
class Args:
    out: str = DEFAULT_OUT
    """where to write the results (by default the committed result, which is the shipped weights' full evaluation with
    latency timed on this machine: a run of other --weights, with a --latency-source, or with fewer requests or
    repeats writes results/quick/micro_quality.json instead)"""
    weights: str | None = None
    """checkpoint: a micro .safetensors file or a directory holding model.safetensors (default: the shipped weights)"""
    split: str = "val"
    """procedural split: train, val or test"""
    seed: int = 0
    """procedural seed (>= 0)"""
    requests_per_family: int = 200
    """requests per family for the quality table"""
    grid_requests_per_family: int = 40
    """requests per family evaluated at all grid configurations (adaptivity)"""
    latency_requests: int = 9
    """requests timed per configuration (one per family in turn)"""
    latency_repeats: int = 3
    """timed runs per request and configuration (after one warm-up)"""
    latency_tokens: int = 16
    """forced output tokens in the latency runs"""
    batch_size: int = 200
    """requests per generation batch"""
    device: str = "cpu"
    """device the quality and latency runs use: cpu, cuda or cuda:N"""
    threads: int = 0
    """torch CPU threads (0: torch's default)"""
    quality_table: str | None = None
    """a recorded quality table (directory or Parquet file from `flexvlm-profile quality`) of these
    weights on this split: used instead of generating (all its requests count for adaptivity)"""
    latency_source: str | None = None
    """a shipped replay latency source (flexvlm_env.profiles.LATENCY_SOURCES, e.g. micro-h200): its
    median latency per configuration instead of timing on this machine"""

    def __post_init__(self) -> None:
        for name in ("requests_per_family", "grid_requests_per_family", "latency_requests", "latency_repeats",
                     "latency_tokens", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')}={getattr(self, name)} must be >= 1")
        if self.quality_table is None and self.grid_requests_per_family > self.requests_per_family:
            raise ValueError(f"--grid-requests-per-family={self.grid_requests_per_family} must be <= "
                             f"--requests-per-family={self.requests_per_family} (they are its first requests)")
        if self.threads < 0:
            raise ValueError(f"--threads={self.threads} must be >= 0 (0: torch's default)")
        if self.split not in SPLITS:
            raise ValueError(f"--split={self.split!r} is not valid; allowed: {', '.join(SPLITS)}")
        if self.seed < 0:
            raise ValueError(f"--seed={self.seed} must be >= 0")
        check_device(self.device)
        if self.weights is not None and not Path(self.weights).exists():
            raise ValueError(f"--weights={self.weights!r} does not exist; allowed: a micro .safetensors file or a "
                             "directory holding model.safetensors (default: the shipped weights)")
        if self.quality_table is not None:
            check_quality_table(self.quality_table, self.split, self.seed)
        if self.latency_source is not None:
            from flexvlm_env.profiles.loading import check_source

            check_source("--latency-source", self.latency_source)
        if self.out == DEFAULT_OUT and (self.weights is not None or self.latency_source is not None or self.reduced()):
            self.out = str(Path(DEFAULT_OUT).parent / QUICK_SUBDIR / Path(DEFAULT_OUT).name)

    def reduced(self) -> bool:
        """Fewer requests or timed runs than the committed evaluation (a quick check)."""
        sizes = (SAMPLE_SIZES if self.quality_table is None else ()) + (
            LATENCY_SAMPLE_SIZES if self.latency_source is None else ())
        return any(getattr(self, name) < getattr(Args, name) for name in sizes)


def check_device(device: str) -> None:
    """Raise a ValueError naming --device unless it is one load_model can use on this machine."""
    if device != "cpu" and not re.fullmatch(r"cuda(:\d+)?", device):
        raise ValueError(f"--device={device!r} is not valid; allowed: cpu, cuda, cuda:N")
    if device != "cpu" and not torch.cuda.is_available():
        raise ValueError(f"--device={device!r} was given but CUDA is not available here; allowed: cpu")


def check_quality_table(path: str, split: str, seed: int) -> None:
    """Raise a ValueError naming --quality-table unless `path` is a `flexvlm-profile quality` table of the
    procedural `split` and `seed` (read from its metadata, without its rows)."""
    from flexvlm_env.profiles.tables import table_metadata

    allowed = "allowed: a `flexvlm-profile quality` table (its shard directory or consolidated Parquet file)"
    if not Path(path).exists():
        raise ValueError(f"--quality-table={path!r} does not exist; {allowed}")
    try:
        meta = table_metadata(path)
    except (OSError, ValueError) as error:  # pyarrow's ArrowInvalid is a ValueError
        raise ValueError(f"--quality-table={path!r} is not readable ({type(error).__name__}); {allowed}") from None
    if meta.get("kind") != "quality":
        raise ValueError(f"--quality-table={path!r} is a {meta.get('kind')!r} table; {allowed}")
    pool = meta.get("protocol", {}).get("pool", {})
    if (pool.get("split"), pool.get("task_seed")) != (split, seed):
        raise ValueError(f"--quality-table={path!r} covers split {pool.get('split')!r} seed {pool.get('task_seed')}, "
                         f"not --split={split!r} --seed={seed}")


def table_configs(grid: KnobGrid) -> list[tuple[str, Config]]:
    full = grid.full
    configs = [("full", full)]
    configs += [(f"crops={c}", Config(c, full.top_k, full.active_blocks)) for c in grid.crops if c != full.crops]
    configs += [(f"top_k={k}", Config(full.crops, k, full.active_blocks)) for k in grid.top_k if k != full.top_k]
    configs += [(f"active_blocks={b}", Config(full.crops, full.top_k, b)) for b in grid.active_blocks if b != full.active_blocks]
    configs.append(("smallest", Config(min(grid.crops), min(grid.top_k), min(grid.active_blocks))))
    return configs


def knob_tuple(config: Config) -> tuple[int, int, int]:
    return (config.crops, config.top_k, config.active_blocks)


def per_family(scores: np.ndarray, families: list[str]) -> dict[str, float]:
    return {f: float(np.mean([s for s, g in zip(scores, families) if g == f])) for f in FAMILIES}


def measure_latency(vlm, samples, configs, args: Args) -> dict[tuple[int, int, int], float]:
    """Median end-to-end latency (ms) per config over the timed requests."""
    chosen = [samples[i * args.grid_requests_per_family] for i in range(len(FAMILIES))]
    chosen = [chosen[i % len(chosen)] for i in range(args.latency_requests)]
    latency = {}
    for config in configs:
        times = []
        for sample in chosen:
            vlm.generate(sample.image, sample.prompt, config, max_new_tokens=args.latency_tokens, ignore_eos=True)
            for _ in range(args.latency_repeats):
                result = vlm.generate(sample.image, sample.prompt, config, max_new_tokens=args.latency_tokens, ignore_eos=True)
                times.append(result.latency.total_ms)
        latency[knob_tuple(config)] = float(np.median(times))
    return latency


def check_bars(table: list[dict], adaptivity: dict, grid: KnobGrid) -> dict:
    by_name = {row["name"]: row for row in table}
    full = by_name["full"]
    bars = {
        "full_mean_ge_0.70": full["mean"] >= 0.70,
        "full_every_family_ge_0.50": min(full["per_family"].values()) >= 0.50,
        "smallest_le_60pct_of_full": by_name["smallest"]["mean"] <= 0.6 * full["mean"],
        "frac_full_quality_at_half_latency_ge_0.25": adaptivity["frac_full_quality_at_half_latency"] >= 0.25,
        "frac_need_full_ge_0.15": adaptivity["frac_need_full"] >= 0.15,
    }
    for knob, values in (("crops", grid.crops), ("top_k", grid.top_k), ("active_blocks", grid.active_blocks)):
        rows = [by_name["full"] if v == max(values) else by_name[f"{knob}={v}"] for v in sorted(values)]
        means = [r["mean"] for r in rows]
        smallest = rows[0]["per_family"]
        losses = {f: full["per_family"][f] - smallest[f] for f in FAMILIES}
        bars[f"{knob}_mean_non_decreasing"] = all(b >= a for a, b in zip(means, means[1:]))
        bars[f"{knob}_smallest_loses_ge_10pts_in_2_families"] = sum(v >= 0.10 for v in losses.values()) >= 2
        bars[f"{knob}_loss_per_family_at_smallest"] = {f: round(v, 4) for f, v in losses.items()}
    return bars


def table_row(name: str, config: Config, scores: np.ndarray, families: list[str]) -> dict:
    by_family = per_family(scores, families)
    return {"name": name, "crops": config.crops, "top_k": config.top_k, "active_blocks": config.active_blocks,
            "per_family": by_family, "mean": float(np.mean(list(by_family.values())))}


def scores_from_table(path: str, weights_sha256: str | None) -> tuple[dict, list[str]]:
    """{(crops, top_k, blocks): per-request scores} and the requests' families, from a quality table (its kind,
    split and seed checked with the arguments: `check_quality_table`)."""
    from flexvlm_env.profiles.tables import read_table

    frame = read_table(path)
    meta = frame.attrs.get("metadata", {})
    if weights_sha256 and meta.get("weights_sha256") != weights_sha256:
        raise ValueError(f"--quality-table {path} was answered by weights {meta.get('weights_sha256')}, not {weights_sha256}")
    frame = frame.sort_values(["request_id"]).reset_index(drop=True)
    ids = sorted(frame["request_id"].unique())
    families = [i.split("/")[0] for i in ids]
    scores = {key: group.set_index("request_id").loc[ids, "quality"].to_numpy()
              for key, group in frame.groupby(["crops", "top_k", "active_blocks"])}
    return scores, families


def main(args: Args) -> None:
    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.perf_counter()
    vlm = load_model("micro", args.weights, device=args.device, dtype="float32")
    grid = KnobGrid()
    grid_configs = sorted(grid.configs(), key=lambda c: c.crops)

    if args.quality_table:
        # 1 and 2 from the recorded table: every request at every configuration.
        grid_scores, families = scores_from_table(args.quality_table, vlm.weights_sha256)
        table = [table_row(name, c, grid_scores[knob_tuple(c)], families) for name, c in table_configs(grid)]
        requests_per_family = len(families) // len(set(families))
        samples = subset = None
    else:
        samples = [s for f in FAMILIES for s in generate_samples(f, args.split, args.requests_per_family, seed=args.seed)]
        families = [s.family for s in samples]
        requests_per_family = args.requests_per_family

        # 1. Quality table.
        evaluator = QualityEvaluator(vlm, samples, batch_size=args.batch_size)
        table = []
        configs = sorted(table_configs(grid), key=lambda item: item[1].crops)  # crops-major: prepare once per value
        for name, config in configs:
            table.append(table_row(name, config, evaluator.scores(config), families))
            print(f"{name:18s} mean {table[-1]['mean']:.3f}", flush=True)
        order = {name: i for i, (name, _) in enumerate(table_configs(grid))}
        table.sort(key=lambda row: order[row["name"]])

        # 2. Every grid configuration on the adaptivity subset.
        subset = [s for i, s in enumerate(samples) if i % args.requests_per_family < args.grid_requests_per_family]
        grid_eval = QualityEvaluator(vlm, subset, batch_size=args.batch_size)
        grid_scores = {knob_tuple(c): grid_eval.scores(c) for c in grid_configs}
        print(f"grid of {len(grid_configs)} configurations on {len(subset)} requests done", flush=True)

    # 3. Latency per configuration, relative to full.
    if args.latency_source:
        from flexvlm_env.profiles import load_replay_data

        data = load_replay_data("micro", args.latency_source)
        latency = {knob_tuple(c): float(np.median(data.total_ms[:, data.config_index(c)])) for c in grid_configs}
    else:
        if subset is None:
            subset = [s for f in FAMILIES for s in generate_samples(f, args.split, args.grid_requests_per_family, seed=args.seed)]
        latency = measure_latency(vlm, subset, grid_configs, args)
    full_key = knob_tuple(grid.full)
    ratio = {k: v / latency[full_key] for k, v in latency.items()}
    full_q = grid_scores[full_key]
    cheap = [k for k in grid_scores if k != full_key and ratio[k] <= 0.5]
    others = [k for k in grid_scores if k != full_key]
    reaches = np.zeros(len(full_q), dtype=bool)
    for k in cheap:
        reaches |= grid_scores[k] >= full_q - 1e-9
    need_full = np.ones(len(full_q), dtype=bool)
    for k in others:
        need_full &= grid_scores[k] < full_q - 1e-9
    answered = full_q > 0
    adaptivity = {
        "frac_full_quality_at_half_latency": float(reaches.mean()),
        "frac_full_quality_at_half_latency_among_full_quality_gt_0": float(reaches[answered].mean()) if answered.any() else None,
        "frac_need_full": float(need_full.mean()),
        "requests": len(full_q),
        "configs_at_half_latency": len(cheap),
        "latency_source": (f"replay source {args.latency_source}: median over the recorded requests per configuration"
                           if args.latency_source else
                           f"measured on this machine ({args.device}, {platform.processor() or platform.machine()}, "
                           f"{torch.get_num_threads()} threads): median end-to-end latency per configuration over "
                           f"{args.latency_requests} requests x {args.latency_repeats} runs, output forced to {args.latency_tokens} tokens"),
        "quality_source": (f"recorded table {args.quality_table}" if args.quality_table
                           else f"generated here ({args.device}, float32), {args.grid_requests_per_family} requests per family"),
    }
    result = {
        "model": "micro",
        "weights_sha256": vlm.weights_sha256,
        "block_ranking": list(vlm.block_ranking),
        "split": args.split,
        "seed": args.seed,
        "generator_version": GENERATOR_VERSION,
        "requests_per_family": requests_per_family,
        "configs": table,
        "adaptivity": adaptivity,
        "bars": check_bars(table, adaptivity, grid),
        "grid": [{"crops": k[0], "top_k": k[1], "active_blocks": k[2], "latency_ms": latency[k], "latency_ratio": ratio[k],
                  "mean_quality": float(np.mean(v))} for k, v in grid_scores.items()],
        "device": args.device,
        "versions": {"flexvlm": flexvlm_env.__version__, "torch": torch.__version__, "python": platform.python_version()},
        "args": asdict(args),
        "wall_s": time.perf_counter() - started,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out}")
    print(json.dumps({"full": table[0]["mean"], "adaptivity": adaptivity, "bars": {k: v for k, v in result["bars"].items() if isinstance(v, bool)}}, indent=1))


if __name__ == "__main__":
    main(tyro.cli(Args))
