"""M4: budget guardrail effectiveness (issue 8; ../shared/EXPERIMENTS.md "M4 — Budget guardrail effectiveness").

    python scripts/m4_guardrail.py [--quick]

The controller, the guardrail variants (none, oracle, estimator, noisy) and what is reported are described in
`flexvlm_env.experiments.budget_guardrail`, which computes them; this driver loads the replay data (`--latency`)
and the fitted stage estimator (`--estimator`), and writes `--out` (JSON) and `--figure` (PNG).

`--quick`: a subset of held-out requests and three margins (a few seconds on a CPU), written under results/quick/.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import tyro

from flexvlm_env.envs.core import DEFAULT_BUDGET_FRACTIONS
from flexvlm_env.experiments import budget_guardrail as m4
from flexvlm_env.experiments.common import QUICK_SUBDIR, run_header
from flexvlm_env.latency import StageLatencyEstimator
from flexvlm_env.profiles import load_replay_data
from flexvlm_env.profiles.loading import check_source

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Args:
    latency: str = "molmoe-1b-h100"
    """replay latency source (FlexVLMReplay-v0's `latency=`)."""
    estimator: Path = ROOT / "results/e3_estimators/molmoe-1b_h100.json"
    """fitted StageLatencyEstimator (JSON) matching the latency source."""
    budget_fractions: tuple[float, ...] = tuple(DEFAULT_BUDGET_FRACTIONS)
    """budget fractions of the family's full-configuration latency (the table's columns)."""
    margin: float = 1.0
    """margin of the per-fraction table (a config is allowed if predicted latency x margin <= budget)."""
    margins: tuple[float, ...] = (0.8, 0.85, 0.9, 0.95, 1.0, 1.05, 1.1, 1.15, 1.2, 1.25, 1.3)
    """margins of the violation / retention trade-off sweep."""
    noise_sigma: float = 0.2
    """sigma of the lognormal noise multiplied into the estimator's predictions (the `noisy` guardrail)."""
    seed: int = 0
    """seed of the noise (and of the --quick request subset)."""
    quick: bool = False
    """subset of 20 held-out requests per family and three margins; written under results/quick/ unless --out and
    --figure are given."""
    out: Path = ROOT / "results/m4_summary.json"
    """the summary JSON."""
    figure: Path = ROOT / "results/figures/m4_guardrail.png"
    """the figure (PNG)."""

    def __post_init__(self) -> None:  # a bad value is a usage error (tyro: exit status 2), before any work
        check_source("--latency", self.latency)
        if not Path(self.estimator).is_file():
            raise ValueError(f"--estimator={self.estimator} is not a file (a StageLatencyEstimator JSON, "
                             "results/e3_estimators/)")
        for name in ("margin", "noise_sigma"):
            value = getattr(self, name)
            if not (value >= 0 if name == "noise_sigma" else value > 0):
                raise ValueError(f"--{name.replace('_', '-')}={value!r} must be {'>= 0' if name == 'noise_sigma' else '> 0'}")
        for name in ("margins", "budget_fractions"):
            values = getattr(self, name)
            if not values or any(not v > 0 for v in values):
                raise ValueError(f"--{name.replace('_', '-')}={values!r} must be one or more numbers > 0")
        if self.quick and self.out == Args.out and self.figure == Args.figure:  # never over the full run's files
            self.out = ROOT / "results" / QUICK_SUBDIR / "m4_summary.json"
            self.figure = ROOT / "results" / QUICK_SUBDIR / "figures" / "m4_guardrail.png"


def run(args: Args) -> dict:
    start = time.perf_counter()
    data = load_replay_data(latency=args.latency)
    estimator = StageLatencyEstimator.load(args.estimator)
    result = m4.evaluate_guardrails(data, estimator, args.budget_fractions, args.margin,
                                    (0.9, 1.0, 1.1) if args.quick else args.margins, args.noise_sigma, args.seed,
                                    requests_per_family=20 if args.quick else None)
    estimator_path = Path(args.estimator).resolve()
    summary = {
        **run_header("m4", args, title="M4 budget guardrail effectiveness"),
        "latency_source": args.latency,
        "estimator": str(estimator_path.relative_to(ROOT)) if estimator_path.is_relative_to(ROOT) else str(args.estimator),
        "split": "heldout", "n_requests": result["n_requests"], "quick": args.quick, "seed": args.seed,
        "noise_sigma": args.noise_sigma, "margin": args.margin, "budget_fractions": list(args.budget_fractions),
        "controller": "per-family best train-half mean quality among guardrail-allowed configs",
        "output_length_prediction": "family median at each config over the train half (true length unknown at decision time)",
        **{k: result[k] for k in ("estimator_median_abs_rel_error", "by_fraction", "infeasible_rate",
                                  "mean_over_fractions", "margin_sweep")},
        "seconds": round(time.perf_counter() - start, 2),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(summary, indent=1))
    m4.plot(summary, args.figure)
    return summary


def main() -> None:
    summary = run(tyro.cli(Args))
    for v, m in summary["mean_over_fractions"].items():
        print(f"{v:10s} violation {m['violation_rate']:.3f} retention {m['quality_retention']:.3f}")
    print(f"wrote {summary['seconds']}s")


if __name__ == "__main__":
    main()
