"""M2: latency repeatability (issue 10; ../shared/EXPERIMENTS.md "M2").

One fixed request (seeded noise image, ~40-token prompt, `--output-tokens` forced) at a low, a
medium and a high configuration: `--warmup` discarded runs, then `--repeats` consecutive timed runs
(`flexvlm_env.experiments.repeatability`). Reports CoV per stage and in total, histograms, drift,
and how many repeats the mean (within 1 %) and the tails (P95, P99 within 5 %) need, by bootstrap.
The issue's bar: CoV of total latency <= 2 % on the H100 at batch 1 for molmoe-1b.

- `--mode measure`: writes `<out-dir>/m2_raw_<preset>_<device>.json` (`--time-limit-s` stops cleanly).
- `--mode analyse`: merges every raw file found in `--inputs` (copied into `--results` when
  elsewhere) into `<results>/m2_summary.json`, `<results>/m2_data.json`, `<results>/figures/m2_*.png`.
- `--mode all` (default): both.

    python scripts/m2_repeatability.py --mode measure --preset molmoe-1b --device cuda --out-dir "$OUT/m2"
    python scripts/m2_repeatability.py --mode analyse --inputs results <fetched>/m2
    OMP_NUM_THREADS=1 python scripts/m2_repeatability.py --preset micro --device cpu --repeats 50

`--quick`: 1 warm-up and 6 repeats of 4 output tokens per config (seconds on a CPU).
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal


from flexvlm_env.experiments import latency_decomposition as e1
from flexvlm_env.experiments import repeatability as m2
from flexvlm_env.experiments.common import parse_script_args, quick_out_dir

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Args:
    mode: Literal["measure", "analyse", "all"] = "all"
    """measure (write a raw device file), analyse (merge raw files into the results) or all (both)."""
    preset: str = "micro"
    """model preset to time: micro or molmoe-1b."""
    weights: str = "auto"
    """auto (micro: shipped weights; molmoe-1b: seeded random weights), random, or a checkpoint."""
    device: str = "cpu"
    """torch device to measure on (cuda for the GPU runs)."""
    dtype: str = "auto"
    """auto (bf16 on CUDA, float32 on CPU), float32, bfloat16 or float16."""
    threads: int = 1
    """torch CPU threads (0: torch's default)."""
    configs: tuple[str, ...] = ("low:1,1,8", "medium:4,4,12", "high:12,8,16")
    """configurations as name:crops,top_k,active_blocks."""
    warmup: int = 5
    """discarded runs per config before timing (they also capture the CUDA graphs)."""
    repeats: int = 100
    """timed runs per config (the catalogue asks for 50-100)."""
    output_tokens: int = 32
    """forced output tokens of the fixed request."""
    prompt_tokens: int = 40
    """approximate prompt length of the fixed request (tokens)."""
    time_limit_s: float = 0.0
    """stop measuring cleanly after this many seconds (0: no limit)."""
    quick: bool = False
    """a seconds-long smoke run (1 warm-up, 6 repeats of 4 tokens per config)."""
    out_dir: Path = ROOT / "results"
    """where measure writes m2_raw_<preset>_<device>.json."""
    inputs: tuple[Path, ...] = ()
    """analyse: raw files or folders holding m2_raw_*.json or .json.gz (default: --results, plus --out-dir in mode all)."""
    results: Path = ROOT / "results"
    """analyse: where m2_summary.json, m2_data.json and figures/m2_*.png go."""


def validate(args: Args) -> None:
    if args.preset not in ("micro", "molmoe-1b"):
        raise SystemExit(f"--preset {args.preset!r} is not valid; allowed: micro, molmoe-1b")
    if args.warmup < 0 or args.repeats < 2 or args.output_tokens < 1:
        raise SystemExit(f"--warmup {args.warmup} must be >= 0, --repeats {args.repeats} >= 2, --output-tokens {args.output_tokens} >= 1")
    if args.time_limit_s < 0:
        raise SystemExit(f"--time-limit-s {args.time_limit_s} must be >= 0 (0: no limit)")
    from flexvlm_env.config import Config
    from flexvlm_env.model.args import preset_args

    sizes = preset_args(args.preset)
    try:
        for name, crops, top_k, blocks in m2.parse_configs(args.configs):  # within the preset's knob ranges
            Config(crops, top_k, blocks).validate_for(n_experts=sizes.n_experts, n_blocks=sizes.n_layers,
                                                      max_crops=sizes.max_crops)
    except ValueError as error:
        raise SystemExit(f"--configs: {error}") from None


def output_dirs(args: Args) -> None:
    """--quick with the default folders writes under the git-ignored results/quick/: the raw file and the analysis,
    which merges every raw file it finds and rewrites the summary, data and figures."""
    quick_out_dir(args)
    quick_out_dir(args, "results")


def main(args: Args) -> dict | None:
    output_dirs(args)
    validate(args)
    configs = m2.parse_configs(args.configs)
    if args.mode in ("measure", "all"):
        vlm = e1.load_for_latency(args.preset, args.weights, args.device, args.dtype, args.threads)
        warmup, repeats, output_tokens = (1, 6, 4) if args.quick else (args.warmup, args.repeats, args.output_tokens)
        deadline = time.time() + args.time_limit_s if args.time_limit_s else None
        raw = m2.measure(vlm, configs, warmup=warmup, repeats=repeats, output_tokens=output_tokens, prompt_tokens=args.prompt_tokens,
                         deadline_s=deadline)
        raw["quick"] = args.quick
        path = m2.write_json(Path(args.out_dir) / f"{m2.RAW_PREFIX}{e1.run_key(raw)}.json", raw)
        print(f"wrote {path} ({raw['measure_s']}s, truncated: {raw['truncated'] or 'nothing'})")
    if args.mode in ("analyse", "all"):
        inputs = e1.raw_inputs(args)
        records = e1.collect_raw(inputs, args.results, m2.RAW_PREFIX, "m2_raw")
        summary, data = m2.analyse(records, args, root=ROOT)
        for path in m2.write_results(summary, data, args.results):
            print("wrote", path)
        for key, run in summary["runs"].items():
            covs = ", ".join(f"{n} {100 * c['cov_total']:.2f}%" for n, c in run["configs"].items())
            print(f"{key}: CoV of total latency {covs}")
        return summary
    return None


if __name__ == "__main__":
    main(parse_script_args(Args, validate))
