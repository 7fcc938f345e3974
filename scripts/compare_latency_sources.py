"""How far a composed replay latency source is from a measured one, per (request, configuration).

    python scripts/compare_latency_sources.py   # micro-h200 (stage tables) vs micro-h200-measured

Percent error |composed - measured| / measured of the per-(request, config) latencies the replay
uses (measured: median of the repeats where the request was repeated, its single run otherwise),
over all pairs and per family (`profiles.compose.error_summary`, so `n_requests` counts pairs
here), and each stage's median, written to `--out` (JSON) and printed.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tyro

from flexvlm_env.profiles import load_replay_data
from flexvlm_env.profiles.compose import error_summary
from flexvlm_env.profiles.replay import STAGE_COLUMNS


@dataclass
class Args:
    composed: str = "micro-h200"
    """composed latency source (stage tables)"""
    measured: str = "micro-h200-measured"
    """measured latency source (every (request, config) timed end to end)"""
    out: Path = Path("results/replay_latency_measured_vs_composed_micro_h200.json")


def main(args: Args) -> dict:
    composed = load_replay_data("micro", args.composed)
    measured = load_replay_data("micro", args.measured)
    families = np.asarray(measured.families)
    result = {
        "what": f"composed latency source {args.composed!r} vs measured {args.measured!r}: percent error of the "
                "per-(request, config) latencies (n_requests counts (request, config) pairs)",
        "composed_table": composed.metadata["latency_table"].get("device_name"),
        "measured_table": measured.metadata["latency_table"].get("device_name"),
        "requests": measured.n_requests, "configs": len(measured.grid),
        "all": error_summary(measured.total_ms.ravel(), composed.total_ms.ravel()),
        "per_family": {f: error_summary(measured.total_ms[families == f].ravel(), composed.total_ms[families == f].ravel())
                       for f in dict.fromkeys(families.tolist())},
        "stage_median_ms": {stage: {"composed": float(np.median(composed.stage_ms[..., i])),
                                    "measured": float(np.median(measured.stage_ms[..., i]))}
                            for i, stage in enumerate(STAGE_COLUMNS)},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(json.dumps({k: result[k] for k in ("all", "stage_median_ms")}, indent=1))
    return result


if __name__ == "__main__":
    main(tyro.cli(Args))
