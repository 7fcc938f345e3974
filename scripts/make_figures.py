"""Regenerate every committed figure from the data under results/ (no model runs)."""
from __future__ import annotations

import json
from pathlib import Path

from flexvlm_env.figures import replay_tradeoff, roofline, training_curves

RESULTS = Path(__file__).resolve().parents[1] / "results"


def main() -> None:
    source = RESULTS / "bench_runtime_h100.json"
    if source.exists():
        print("wrote", roofline(json.loads(source.read_text()), RESULTS / "figures" / "roofline_h100.png"))
    log = RESULTS / "train_micro_log.jsonl"
    if log.exists():
        records = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
        print("wrote", training_curves(records, RESULTS / "figures" / "micro_training.png"))
    headroom = RESULTS / "replay_headroom.json"
    if headroom.exists():
        print("wrote", replay_tradeoff(json.loads(headroom.read_text()), RESULTS / "figures" / "replay_tradeoff.png"))


if __name__ == "__main__":
    main()
