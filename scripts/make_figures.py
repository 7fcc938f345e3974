"""Regenerate every committed figure from the data under results/ (no model runs).

    python scripts/make_figures.py [--only e1 m2 ...]

A bad argument (an unknown id, a missing results folder or summary) is a usage error, exit status 2,
reported before any figure is drawn.
"""
from __future__ import annotations

import importlib
import json
from dataclasses import dataclass
from pathlib import Path

from flexvlm_env.experiments import MODULES
from flexvlm_env.experiments.common import parse_script_args
from flexvlm_env.figures import replay_tradeoff, roofline, training_curves

RESULTS = Path(__file__).resolve().parents[1] / "results"


@dataclass
class Args:
    results: Path = RESULTS
    """results directory (data in, figures/ out)"""
    only: tuple[str, ...] = ()
    """experiment ids to redo (default: all whose data exist)"""


def validate(args: Args) -> None:
    """Raise a ValueError naming the argument unless every figure asked for can be drawn."""
    unknown = sorted(set(args.only) - set(MODULES))
    if unknown:
        raise ValueError(f"--only {unknown}: unknown experiment ids; allowed: {sorted(MODULES)}")
    if not args.results.is_dir():
        raise ValueError(f"--results={args.results} is not a directory (the results folder: data in, figures/ out)")
    missing = [e for e in args.only if not (args.results / f"{e}_summary.json").exists()]
    if missing:  # asked for by name: its data must be there
        raise ValueError(f"--only {missing}: no {missing[0]}_summary.json in {args.results}; run its script first")


def main(args: Args) -> None:
    validate(args)
    if not args.only:
        for card in ("h100", "h200"):  # one runtime benchmark per card (issue [fast-runtime])
            source = args.results / f"bench_runtime_{card}.json"
            if source.exists():
                print("wrote", roofline(json.loads(source.read_text()), args.results / "figures" / f"roofline_{card}.png"))
        log = args.results / "train_micro_log.jsonl"
        if log.exists():
            records = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
            print("wrote", training_curves(records, args.results / "figures" / "micro_training.png"))
        headroom = args.results / "replay_headroom.json"
        if headroom.exists():
            print("wrote", replay_tradeoff(json.loads(headroom.read_text()), args.results / "figures" / "replay_tradeoff.png"))
    for experiment in args.only or MODULES:
        if not (args.results / f"{experiment}_summary.json").exists():
            print(f"{experiment}: no {experiment}_summary.json yet, skipped")
            continue
        module = importlib.import_module(MODULES[experiment])
        for path in module.plot_from_results(args.results):
            print("wrote", path)


if __name__ == "__main__":
    main(parse_script_args(Args, validate))
