"""Session 31, call 2's tables against the shipped ones, and a controller trained on them (run on the sandbox's CPU).

    python results/device/session31/report.py [RUN_DIR]

RUN_DIR: a `flexvlm-train maskable_ppo --quality ... --latency ...` run on the two tables (its final.json is summarised);
writes results/device/session31/own_tables_report.json.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from flexvlm_env.profiles import load_replay_data

HERE = Path(__file__).resolve().parent
own = load_replay_data(quality=str(HERE / "micro_quality_3fam_h200.parquet"),
                       latency=str(HERE / "micro_requests_3fam_h200.parquet"))
ref = load_replay_data(latency="micro-h200-measured")  # the shipped quality table and micro's shipped H200 timings
rows = [ref.request_ids.index(r) for r in own.request_ids]
ratio = own.total_ms / ref.total_ms[rows]
report = {
    "tables": {"requests": len(own.request_ids), "configs": len(own.grid),
               "quality_dtype": own.metadata["quality_table"].get("dtype"),
               "device": own.metadata["latency_table"].get("device_name")},
    "against_shipped": {
        "answers_equal": float(np.mean(own.answers == ref.answers[rows])),
        "quality_equal": float(np.mean(np.isclose(own.quality, ref.quality[rows]))),
        "mean_quality": {"own": float(own.quality.mean()), "shipped": float(ref.quality[rows].mean())},
        "latency_own_over_shipped": {"median": float(np.median(ratio)), "p5": float(np.percentile(ratio, 5)),
                                     "p95": float(np.percentile(ratio, 95))},
        "full_config_median_ms": {"own": float(np.median(own.total_ms[:, -1])),
                                  "shipped": float(np.median(ref.total_ms[rows, -1]))},
    },
}
if len(sys.argv) > 1:
    final = json.loads((Path(sys.argv[1]) / "final.json").read_text())
    report["maskable_ppo_run"] = {"run": final["run"], "env_steps": final["env_steps"],
                                  "mean": {name: {k: result["mean"][k] for k in ("quality_retention", "violation_rate",
                                                                                  "latency_p95_ms", "reward")}
                                           for name, result in final["results"].items()},
                                  "by_fraction": {name: {f: {k: m[k] for k in ("quality_retention", "violation_rate")}
                                                         for f, m in result["by_fraction"].items()}
                                                  for name, result in final["results"].items()}}
(HERE / "own_tables_report.json").write_text(json.dumps(report, indent=1) + "\n")
print(json.dumps(report["against_shipped"], indent=1))
