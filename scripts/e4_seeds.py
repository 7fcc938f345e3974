"""E4's seed spread: the replay evaluation repeated with FlexVLM trained from other seeds.

    python scripts/e4_seeds.py [--seeds 0 1 2]

Seed 0 is the committed `results/e4_summary.json`; every other seed runs
`scripts/e4_system_eval.py --seed S` into `runs/e4_seedS/` (controllers trained there, reused when
rerun). Writes `results/e4_seeds.json`: per seed, the headline table (retention, violation rate,
P95 per method and fraction) and the bar verdicts with their comparisons.
"""
from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import tyro

from flexvlm_env.experiments.common import run_header, write_json

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Args:
    seeds: tuple[int, ...] = (0, 1, 2)
    """FlexVLM training seeds (0: the committed results/e4_summary.json)"""
    runs_dir: Path = ROOT / "runs"
    """where the other seeds' runs, controllers and summaries go"""
    out: Path = ROOT / "results/e4_seeds.json"
    """the collected table"""


def summary_for(seed: int, args: Args) -> dict:
    if seed == 0:
        return json.loads((ROOT / "results/e4_summary.json").read_text())
    out_dir = args.runs_dir / f"e4_seed{seed}"
    summary = out_dir / "e4_summary.json"
    if not summary.exists():
        subprocess.run([sys.executable, str(ROOT / "scripts/e4_system_eval.py"), "--seed", str(seed), "--out-dir", str(out_dir),
                        "--controllers-dir", str(out_dir / "controllers"), "--runs-dir", str(out_dir)], check=True)
    return json.loads(summary.read_text())


def main(args: Args) -> Path:
    if not args.seeds or any(s < 0 for s in args.seeds):
        raise SystemExit(f"--seeds={list(args.seeds)}: give one or more seeds >= 0")
    seeds = {}
    for seed in args.seeds:
        summary = summary_for(seed, args)
        seeds[str(seed)] = {"headline": summary["headline"], "bars": summary["bars"]}
    path = write_json(args.out, {**run_header("e4-seeds", args), "seeds": seeds})
    for source in next(iter(seeds.values()))["bars"]:
        verdicts = {s: (v["bars"][source].get("retention_bar_strict"), v["bars"][source].get("retention_bar_at_equal_violation"))
                    for s, v in seeds.items()}
        print(source, "(strict, at equal violation) per seed:", verdicts)
    print("wrote", path)
    return path


if __name__ == "__main__":
    main(tyro.cli(Args))
