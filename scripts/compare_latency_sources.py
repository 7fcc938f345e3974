"""How far a composed replay latency source is from a measured one, per (request, configuration).

    python scripts/compare_latency_sources.py   # micro-h200 (stage tables) vs micro-h200-measured

Relative error |composed / measured - 1| of the per-(request, config) latencies the replay uses
(measured: median of the repeats where the request was repeated, its single run otherwise), over
all pairs, per family and per stage (medians), written to `--out` (JSON) and printed.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tyro

from flexvlm_env.profiles import load_replay_data
from flexvlm_env.profiles.replay import STAGE_COLUMNS


@dataclass
class Args:
    composed: str = "micro-h200"
    """composed latency source (stage tables)"""
    measured: str = "micro-h200-measured"
    """measured latency source (every (request, config) timed end to end)"""
    out: Path = Path("results/replay_latency_measured_vs_composed_micro_h200.json")


def _errors(composed: np.ndarray, measured: np.ndarray) -> dict:
    error = np.abs(composed / measured - 1.0)
    return {"n": int(error.size), "median_abs_rel_error": float(np.median(error)),
            "p95_abs_rel_error": float(np.percentile(error, 95)),
            "median_signed_rel_error": float(np.median(composed / measured - 1.0))}


def main(args: Args) -> dict:
    composed = load_replay_data("micro", args.composed)
    measured = load_replay_data("micro", args.measured)
    families = np.asarray(measured.families)
    result = {
        "what": f"composed latency source {args.composed!r} vs measured {args.measured!r}: relative error of the "
                "per-(request, config) latencies",
        "composed_table": composed.metadata["latency_table"].get("device_name"),
        "measured_table": measured.metadata["latency_table"].get("device_name"),
        "requests": measured.n_requests, "configs": len(measured.grid),
        "all": _errors(composed.total_ms, measured.total_ms),
        "per_family": {f: _errors(composed.total_ms[families == f], measured.total_ms[families == f])
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
