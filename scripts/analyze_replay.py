"""What the recorded tables offer a controller: the quality/latency trade-off of the 140
configurations per family, and the reward of the per-request oracle against static policies.

    python scripts/analyze_replay.py [--latency molmoe-1b-h100] [--out results/replay_headroom.json]

For each budget fraction (budget = fraction x the family's median full-configuration latency, as in
the environments) and reward `quality - lam * max(0, latency - budget) / budget` on median
latencies, it reports: the full configuration; the best single configuration for all requests
(best static); the best configuration per family (a lookup table on the family alone); and the
per-request oracle (the best configuration for each request, knowing its answers: the ceiling a
controller can approach). The figure is rebuilt by `scripts/make_figures.py`.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tyro

from flexvlm_env.figures import replay_tradeoff
from flexvlm_env.profiles import load_replay_data


@dataclass
class Args:
    quality: str = "micro"
    """shipped quality table"""
    latency: str = "molmoe-1b-h100"
    """shipped latency source"""
    lam: float = 1.0
    """reward weight of the relative budget overshoot"""
    fractions: tuple[float, ...] = (0.35, 0.5, 0.7, 0.85, 1.0)
    """budget fractions of the family's full-configuration latency"""
    out: Path = Path("results/replay_headroom.json")
    """summary JSON (the figure goes to figures/replay_tradeoff.png beside it)"""


def policy_summary(reward: np.ndarray, quality: np.ndarray, violation: np.ndarray, choice: np.ndarray) -> dict:
    rows = np.arange(len(choice))
    return {"mean_reward": float(reward[rows, choice].mean()), "mean_quality": float(quality[rows, choice].mean()),
            "violation_rate": float(violation[rows, choice].mean())}


def main(args: Args) -> dict:
    data = load_replay_data(args.quality, args.latency)
    families = np.asarray(data.families)
    full_ms = data.family_full_latency_ms()
    budget_per_family = np.array([full_ms[f] for f in families])
    configs = data.grid.configs()
    per_family = {}
    for family in sorted(set(data.families)):
        rows = families == family
        per_family[family] = {
            "mean_quality": data.quality[rows].mean(axis=0).round(4).tolist(),
            "median_latency_ms": np.median(data.total_ms[rows], axis=0).round(3).tolist(),
        }
    budgets = {}
    for fraction in args.fractions:
        budget = fraction * budget_per_family[:, None]
        overshoot = np.maximum(0.0, data.total_ms - budget) / budget
        reward = data.quality - args.lam * overshoot
        violation = data.total_ms > budget
        full = np.full(len(families), data.full_index)
        static = np.full(len(families), int(reward.mean(axis=0).argmax()))
        lut = np.empty(len(families), dtype=int)
        for family in set(data.families):
            rows = families == family
            lut[rows] = int(reward[rows].mean(axis=0).argmax())
        oracle = reward.argmax(axis=1)
        budgets[str(fraction)] = {
            "full": policy_summary(reward, data.quality, violation, full),
            "best_static": {**policy_summary(reward, data.quality, violation, static),
                            "config": configs[static[0]].as_tuple()},
            "per_family_lut": policy_summary(reward, data.quality, violation, lut),
            "oracle": policy_summary(reward, data.quality, violation, oracle),
        }
    summary = {
        "quality_source": args.quality, "latency_source": args.latency, "lam": args.lam,
        "n_requests": data.n_requests, "n_configs": len(configs),
        "configs": [c.as_tuple() for c in configs], "per_family": per_family, "by_budget_fraction": budgets,
        "latency_device": data.metadata.get("latency_table", {}).get("device_name"),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(summary, indent=1))
    figure = replay_tradeoff(summary, args.out.parent / "figures" / "replay_tradeoff.png")
    for fraction, row in budgets.items():
        print(f"budget {fraction}: " + ", ".join(f"{name} {v['mean_reward']:.3f} (q {v['mean_quality']:.3f}, viol {v['violation_rate']:.2f})"
                                                for name, v in row.items()))
    print("wrote", args.out, figure)
    return summary


if __name__ == "__main__":
    main(tyro.cli(Args))
