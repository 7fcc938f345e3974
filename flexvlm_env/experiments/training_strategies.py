"""E5: training strategies compared on one env, one set of budgets and one env-step budget (../shared/EXPERIMENTS.md "E5").

`scripts/e5_training_strategies.py` trains every (method, seed) with `flexvlm-train` (it needs the `trainers`
package, so the runs stay in the driver); this module holds what E5 computes from their held-out evaluations and
curves: the threshold and the env steps to reach it, the per-fraction tables the summary keeps, and the figures.
`plot_from_results(results_dir)` rebuilds the figures from `e5_summary.json` and `e5_curves.json.gz` alone.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .common import figures_path, pyplot, read_json, save_figure

# E5's threshold: violation rate <= 5% and quality >= 90% of the full configuration's (retention >= 0.9), both
# averaged over the five budget fractions, on the held-out requests.
THRESHOLD = {"violation_rate": 0.05, "quality_retention": 0.90}
CURVE_METRICS = ("eval/reward", "eval/quality_retention", "eval/violation_rate", "eval/latency_p95_ms")


def steps_to_threshold(curve: list[dict]) -> int | None:
    """Env steps of the first held-out evaluation of `curve` within THRESHOLD, or None if none is."""
    for record in curve:
        if (record["eval/violation_rate"] <= THRESHOLD["violation_rate"]
                and record["eval/quality_retention"] >= THRESHOLD["quality_retention"]):
            return record["env_steps"]
    return None


def final_table(result: dict) -> dict:
    """Per budget fraction, what the summary keeps of one `agents.evaluation.evaluate` result."""
    return {f: {"quality_retention": m["quality_retention"], "violation_rate": m["violation_rate"],
                "p95_latency_ms": m["latency_p95_ms"], "quality": m["quality"], "reward": m["reward"]}
            for f, m in result["by_fraction"].items()}


def mean_tables(tables: list[dict]) -> dict:
    """The mean over seeds of `final_table`s."""
    return {f: {k: float(np.mean([t[f][k] for t in tables])) for k in tables[0][f]} for f in tables[0]}


def plot(curves: dict[str, list[list[dict]]], entries: list[dict], figures_dir: Path) -> list[Path]:
    """`e5_learning_curves.png` (held-out curves, mean over seeds with the min-max band) and `e5_frontiers.png`
    (P95 latency against quality retention per budget fraction, methods and baselines)."""
    plt = pyplot()
    fig, axes = plt.subplots(1, len(CURVE_METRICS), figsize=(18, 3.8))
    for method, runs in curves.items():
        if len({len(run) for run in runs}) == 1:
            # The k-th evaluation of every seed, at their mean env steps: the LM trainers stop a batch short of
            # or past each eval point (12,597-12,655 env steps for the first), so exact step matches would split
            # one evaluation into a point per seed.
            steps = np.mean([[r["env_steps"] for r in run] for run in runs], axis=0)
            rows = [list(run) for run in runs]
        else:
            steps = sorted({r["env_steps"] for run in runs for r in run})
            rows = [[next((r for r in run if r["env_steps"] == s), None) for s in steps] for run in runs]
        for ax, metric in zip(axes, CURVE_METRICS):
            values = np.array([[np.nan if r is None else r[metric] for r in row] for row in rows])
            mean = np.nanmean(values, axis=0)
            line, = ax.plot(steps, mean, marker="o", markersize=3, label=method)
            ax.fill_between(steps, np.nanmin(values, axis=0), np.nanmax(values, axis=0), color=line.get_color(), alpha=0.2)
    for ax, metric in zip(axes, CURVE_METRICS):
        ax.set_xlabel("env steps")
        ax.xaxis.set_major_formatter(lambda x, _: f"{x / 1000:g}k" if x else "0")  # 120000 and 100000 collide
        ax.set_title(f"held-out {metric.split('/')[1]}")
        ax.grid(alpha=0.3)
    axes[2].axhline(THRESHOLD["violation_rate"], color="k", lw=0.8, ls="--")
    axes[1].axhline(THRESHOLD["quality_retention"], color="k", lw=0.8, ls="--")
    axes[0].legend(fontsize=8)
    fig.suptitle("E5: training strategies on FlexVLMReplay-v0 (mean over seeds, min-max band)")
    written = [save_figure(fig, Path(figures_dir) / "e5_learning_curves.png", 110)]

    fractions = list(entries[0]["final"])
    fig, axes = plt.subplots(1, len(fractions), figsize=(4 * len(fractions), 3.6), sharey=True)
    for entry in entries:
        for ax, f in zip(axes, fractions):
            m = entry["final"][f]
            ax.scatter(m["p95_latency_ms"], m["quality_retention"], marker="o" if entry["kind"] == "method" else "x")
            ax.annotate(entry["method"], (m["p95_latency_ms"], m["quality_retention"]), fontsize=7)
    for ax, f in zip(axes, fractions):
        ax.set_title(f"budget fraction {f}")
        ax.set_xlabel("P95 latency (ms)")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("quality retention")
    written.append(save_figure(fig, Path(figures_dir) / "e5_frontiers.png", 110))
    return written


def plot_from_results(results_dir: Path, figures_dir: Path | None = None) -> list[Path]:
    results_dir = Path(results_dir)
    summary = json.loads((results_dir / "e5_summary.json").read_text())
    curves = read_json(results_dir / "e5_curves.json.gz")
    return plot(curves, summary["entries"], figures_path(results_dir, figures_dir))
