"""E1: stage-aware latency decomposition (issue 10; ../shared/EXPERIMENTS.md "E1").

Two modes, so that a GPU is held only while it measures:

- `--mode measure`: load `--preset` on `--device` and time every input regime (crops x prompt
  length x forced output length) at each knob setting, a prefill-length sweep, a long decode and a
  torch.profiler operator breakdown of the LLM (`flexvlm_env.experiments.latency_decomposition`).
  Writes `<out-dir>/e1_raw_<preset>_<device>.json`. `--time-limit-s` stops it cleanly (the sections
  it cut short are listed under `truncated`).
- `--mode analyse`: merge every raw device file found in `--inputs` (files or folders; those outside
  `--results` are copied there) into `<results>/e1_summary.json` (headline numbers per device),
  `<results>/e1_data.json.gz` and `<results>/figures/e1_*.png`. CPU only, seconds.
- `--mode all` (default): measure, then analyse everything in `--results` plus the new file.

    # GPU (both presets), then on the CPU host:
    python scripts/e1_latency_decomposition.py --mode measure --preset molmoe-1b --device cuda --out-dir "$OUT/e1"
    python scripts/e1_latency_decomposition.py --mode analyse --inputs results <fetched>/e1
    # CPU run of micro, measured and analysed here:
    OMP_NUM_THREADS=1 python scripts/e1_latency_decomposition.py --preset micro --device cpu --warmup 1 --repeats 3

`--quick`: one crops value, one prompt, 4 output tokens, 2 repeats (seconds on a CPU).
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal


from flexvlm_env.experiments import latency_decomposition as e1
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
    """torch CPU threads (0: torch's default); 1 keeps CPU runs comparable on a shared host."""
    warmup: int = 2
    """discarded runs before each (regime, knobs)'s timed repeats (they also capture CUDA graphs)."""
    repeats: int = 5
    """timed repeats per (regime, knobs); rows report medians."""
    profile_decode_steps: int = 16
    """decode tokens per profiled request (operator breakdown)."""
    time_limit_s: float = 0.0
    """stop measuring cleanly after this many seconds (0: no limit)."""
    quick: bool = False
    """a seconds-long smoke run (one regime per knob setting; micro on a CPU)."""
    out_dir: Path = ROOT / "results"
    """where measure writes e1_raw_<preset>_<device>.json."""
    inputs: tuple[Path, ...] = ()
    """analyse: raw files or folders holding e1_raw_*.json or .json.gz (default: --results, plus --out-dir in mode all)."""
    results: Path = ROOT / "results"
    """analyse: where e1_summary.json, e1_data.json.gz and figures/e1_*.png go."""


def validate(args: Args) -> None:
    if args.preset not in ("micro", "molmoe-1b"):
        raise SystemExit(f"--preset {args.preset!r} is not valid; allowed: micro, molmoe-1b")
    if args.warmup < 0 or args.repeats < 1 or args.profile_decode_steps < 1:
        raise SystemExit(f"--warmup {args.warmup} must be >= 0, --repeats {args.repeats} and "
                         f"--profile-decode-steps {args.profile_decode_steps} >= 1")
    if args.time_limit_s < 0:
        raise SystemExit(f"--time-limit-s {args.time_limit_s} must be >= 0 (0: no limit)")


def output_dirs(args: Args) -> None:
    """--quick with the default folders writes under the git-ignored results/quick/: the raw file and the analysis,
    which merges every raw file it finds and rewrites the summary, data and figures."""
    quick_out_dir(args)
    quick_out_dir(args, "results")


def main(args: Args) -> dict | None:
    output_dirs(args)
    validate(args)
    start = time.time()
    deadline = start + args.time_limit_s if args.time_limit_s else None
    if args.mode in ("measure", "all"):
        vlm = e1.load_for_latency(args.preset, args.weights, args.device, args.dtype, args.threads)
        base = e1.quick_spec() if args.quick else e1.Spec()
        spec = e1.Spec(**{**base.__dict__, "warmup": args.warmup if not args.quick else base.warmup,
                          "repeats": args.repeats if not args.quick else base.repeats,
                          "profile_decode_steps": args.profile_decode_steps if not args.quick else base.profile_decode_steps})
        raw = e1.measure(vlm, spec, deadline_s=deadline)
        raw["quick"] = args.quick
        path = e1.write_json(Path(args.out_dir) / f"{e1.RAW_PREFIX}{e1.run_key(raw)}.json", raw)
        print(f"wrote {path} ({raw['measure_s']}s, truncated: {raw['truncated'] or 'nothing'})")
    if args.mode in ("analyse", "all"):
        inputs = e1.raw_inputs(args)
        records = e1.collect_raw(inputs, args.results, e1.RAW_PREFIX, "e1_raw")
        summary, data = e1.analyse(records, args, root=ROOT)
        for path in e1.write_results(summary, data, args.results):
            print("wrote", path)
        for key, h in summary["headline"].items():
            print(f"{key}: decode share at longest output {h['decode_share_at_longest_output_full']:.2f}, "
                  f"FLOPs-latency Pearson {h['flops_vs_total_latency_pearson']}, decode ms/token {json.dumps(h['decode_ms_per_output_token'])}")
        return summary
    return None


if __name__ == "__main__":
    main(parse_script_args(Args, validate))
