"""Summarise session 28's GRPO sweep (calls 1-4) from the committed run archives.

    python results/device/session28/summarize.py

Reads `call{1..4}_runs.tar.xz` (each run's args.json, curves.jsonl and final.json; call 1's runs are all
seed 1) and writes `grpo_sweep_summary.json` beside them: per setting, the seeds run, held-out reward
and retention by budget fraction per seed, and the paired difference to the default at shared seeds.
A run is counted prompt-blind when its retention is the same at every budget fraction (spread < 0.01):
it writes one configuration whatever the budget.
"""
from __future__ import annotations

import io
import json
import re
import statistics
import tarfile
from collections import defaultdict
from pathlib import Path

HERE = Path(__file__).parent
BLIND_SPREAD = 0.01


def runs() -> list[dict]:
    found = []
    for call in (1, 2, 3, 4):
        with tarfile.open(HERE / f"call{call}_runs.tar.xz") as tar:
            names = {Path(m.name).parent.name for m in tar.getmembers() if m.name.endswith("final.json")}
            for name in sorted(names):
                def read(file: str):
                    return tar.extractfile(f"./{name}/{file}").read().decode()

                final = json.loads(read("final.json"))
                args = json.loads(read("args.json"))
                curve = [json.loads(line) for line in io.StringIO(read("curves.jsonl")) if line.strip()]
                match = re.fullmatch(r"(.*)_s(\d+)", name)
                setting = match.group(1) if match else name
                result = final["results"]["grpo"]
                retention = {k: round(v["quality_retention"], 4) for k, v in result["by_fraction"].items()}
                found.append({
                    "call": call, "setting": setting, "seed": final["seed"],
                    "reward": round(result["mean"]["reward"], 4),
                    "quality_retention": round(result["mean"]["quality_retention"], 4),
                    "violation_rate": round(result["mean"]["violation_rate"], 4),
                    "retention_by_fraction": retention,
                    "prompt_blind": max(retention.values()) - min(retention.values()) < BLIND_SPREAD,
                    "env_steps": final["env_steps"], "wall_clock_s": round(final["wall_clock_s"], 1),
                    "args": args,
                    "curve_reward": [[c["env_steps"], round(c["eval/reward"], 4)] for c in curve],
                })
    return found


def main() -> dict:
    all_runs = runs()
    by_setting: dict[str, list[dict]] = defaultdict(list)
    for run in all_runs:
        by_setting[run["setting"]].append(run)
    default = {r["seed"]: r["reward"] for r in by_setting["default"]}
    default_args = by_setting["default"][0]["args"]
    per_run = {"seed", "runs_dir", "resume"}
    settings = {}
    for setting, rs in sorted(by_setting.items(), key=lambda kv: (-len(kv[1]), kv[0])):
        rs.sort(key=lambda r: r["seed"])
        paired = [r["reward"] - default[r["seed"]] for r in rs if r["seed"] in default]
        settings[setting] = {
            "flags": {k: v for k, v in rs[0]["args"].items() if k not in per_run and default_args.get(k) != v},
            "seeds": [r["seed"] for r in rs],
            "reward_mean": round(statistics.mean(r["reward"] for r in rs), 4),
            "reward_min": min(r["reward"] for r in rs),
            "prompt_blind_runs": sum(r["prompt_blind"] for r in rs),
            "wall_clock_s_mean": round(statistics.mean(r["wall_clock_s"] for r in rs), 1),
            "vs_default_paired": None if setting == "default" or not paired else {
                "seeds": len(paired), "mean_diff": round(statistics.mean(paired), 4),
                "better": sum(d > 0 for d in paired)},
        }
        print(f"{setting:18s} seeds={settings[setting]['seeds']} reward mean {settings[setting]['reward_mean']:.3f} "
              f"min {settings[setting]['reward_min']:.3f} blind {settings[setting]['prompt_blind_runs']} "
              f"wall {settings[setting]['wall_clock_s_mean']:.0f} s  vs default {settings[setting]['vs_default_paired']}")
    for run in all_runs:
        del run["args"]  # kept per setting: the flags that differ from the default
    summary = {
        "experiment": "GRPO hyperparameter sweep, flexvlm-train grpo on FlexVLMReplay-v0",
        "machine": "lent 1 x NVIDIA H200 machine's CPU (16-core Intel Xeon; the GPU unused), one thread per run, "
                   "15 or 14 runs at once; torch 2.11.0+cu130, transformers 5.24.0, trl 1.16.0",
        "date": "2026-11-30",
        "protocol": "25,200 env steps per run; held-out evaluation on 300 requests x budget fractions "
                    "0.35/0.5/0.7/0.85/1.0 every 6,300 env steps; settings differ from the defaults only "
                    "in `flags`",
        "prompt_blind": f"retention spread over the budget fractions < {BLIND_SPREAD}",
        "settings": settings,
        "runs": all_runs,
    }
    (HERE / "grpo_sweep_summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    return summary


if __name__ == "__main__":
    main()
