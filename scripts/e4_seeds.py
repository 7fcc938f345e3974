"""E4's seed spread: the replay evaluation repeated with FlexVLM trained from other seeds.

    python scripts/e4_seeds.py [--seeds 0 1 2]                       # the default sources
    python scripts/e4_seeds.py --sources molmoe-1b-h200              # another latency source

Default sources: seed 0 is the committed `results/e4_summary.json`; every other seed runs
`scripts/e4_system_eval.py --seed S` into `runs/e4_seedS/` (controllers trained there, reused when
rerun). Writes `results/e4_seeds.json`: per seed, the headline table (retention, violation rate,
P95 per method and fraction) and the bar verdicts with their comparisons.

Other `--sources`: every seed, 0 included, runs `e4_system_eval.py --sources ... --seed S` into
`runs/e4_<sources>_seedS/`, and the output (default `results/e4_<sources>_summary.json`) is seed 0's
summary (without the per-case replay metrics) with the per-seed table under `seeds`.
"""
from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import tyro

from flexvlm_env.experiments import system_eval as e4
from flexvlm_env.experiments.common import run_header, write_json

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Args:
    seeds: tuple[int, ...] = (0, 1, 2)
    """FlexVLM training seeds (0 with the default sources: the committed results/e4_summary.json)"""
    sources: tuple[str, ...] = e4.SOURCES
    """replay latency sources (any shipped one)"""
    runs_dir: Path = ROOT / "runs"
    """where the seeds' runs, controllers and summaries go"""
    out: Path | None = None
    """the collected table (default: results/e4_seeds.json, or results/e4_<sources>_summary.json)"""

    def __post_init__(self) -> None:  # a bad value is a usage error (tyro: exit status 2), before any training
        from flexvlm_env.profiles.loading import LATENCY_SOURCES

        unknown = [s for s in self.sources if s not in LATENCY_SOURCES]
        if unknown:
            raise ValueError(f"--sources={unknown[0]!r} is not a shipped latency source; allowed: {sorted(LATENCY_SOURCES)}")
        if not self.sources:
            raise ValueError(f"--sources needs one or more of {sorted(LATENCY_SOURCES)}")
        if not self.seeds or any(s < 0 for s in self.seeds):
            raise ValueError(f"--seeds={list(self.seeds)} must be one or more seeds >= 0")

    @property
    def default_sources(self) -> bool:
        return tuple(self.sources) == tuple(e4.SOURCES)


def summary_for(seed: int, args: Args) -> dict:
    if seed == 0 and args.default_sources:
        return json.loads((ROOT / "results/e4_summary.json").read_text())
    tag = "" if args.default_sources else "_" + "+".join(args.sources)
    out_dir = args.runs_dir / f"e4{tag}_seed{seed}"
    summary = out_dir / "e4_summary.json"
    if not summary.exists():
        subprocess.run([sys.executable, str(ROOT / "scripts/e4_system_eval.py"), "--seed", str(seed), "--out-dir", str(out_dir),
                        "--controllers-dir", str(out_dir / "controllers"), "--runs-dir", str(out_dir),
                        "--sources", *args.sources], check=True)
    return json.loads(summary.read_text())


def main(args: Args) -> Path:
    if not args.seeds or any(s < 0 for s in args.seeds):
        raise SystemExit(f"--seeds={list(args.seeds)}: give one or more seeds >= 0")
    from flexvlm_env.profiles.loading import check_source

    for source in args.sources:
        check_source("--sources", source)
    summaries = {str(seed): summary_for(seed, args) for seed in args.seeds}
    seeds = {s: {"headline": v["headline"], "bars": v["bars"]} for s, v in summaries.items()}
    if args.default_sources:
        out = args.out or ROOT / "results/e4_seeds.json"
        path = write_json(out, {**run_header("e4-seeds", args), "seeds": seeds})
    else:
        out = args.out or ROOT / f"results/e4_{'+'.join(args.sources)}_summary.json"
        first = summaries[str(args.seeds[0])]
        keep = {k: v for k, v in first.items() if k not in ("replay", "live")}
        note = (f"E4 replay on latency source(s) {', '.join(args.sources)}, the protocol of results/e4_summary.json; "
                f"headline and bars of seed {args.seeds[0]}, every seed's under 'seeds'. Command: "
                f"python scripts/e4_seeds.py --sources {' '.join(args.sources)} --seeds {' '.join(map(str, args.seeds))}")
        path = write_json(out, {**keep, "seeds_args": run_header("e4-seeds", args)["args"], "note": note, "seeds": seeds})
    for source in next(iter(seeds.values()))["bars"]:
        verdicts = {s: (v["bars"][source].get("retention_bar_strict"), v["bars"][source].get("retention_bar_at_equal_violation"))
                    for s, v in seeds.items()}
        print(source, "(strict, at equal violation) per seed:", verdicts)
    print("wrote", path)
    return path


if __name__ == "__main__":
    main(tyro.cli(Args))
