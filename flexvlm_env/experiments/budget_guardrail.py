"""M4: budget guardrail effectiveness (issue 8; ../shared/EXPERIMENTS.md "M4 — Budget guardrail effectiveness").

Controller: per family, configurations ranked by mean recorded quality over the *train* half of
the replay pool (ties: lower mean train latency first); for each request it takes the best-ranked
configuration among those the guardrail allows (`flexvlm_env.latency.guardrail.budget_mask`,
i.e. candidate filtering `predicted × margin <= budget`, never empty).

Guardrail variants (predicted latency of each (request, config)):
- `none`: no filtering (the best-quality configuration whatever the budget);
- `oracle`: the recorded median latency of that (request, config);
- `estimator`: the fitted stage estimator (`--estimator`, H100 MolmoE-1B by default) from the
  request's own input tokens and a predicted output length (family median at that config over the
  train half; the true output length is unknown at decision time);
- `noisy`: the estimator × lognormal noise (`--noise-sigma`, seeded, per (request, config)).

Evaluated on FlexVLMReplay-v0's held-out half (`split="heldout"`, `--latency` source) at each
budget fraction f: budget = f × the family's median full-configuration latency (as the env does).
The served latency is the replayed one: recorded median × one recorded repeat residual per
(request, config), drawn with `--seed` (as the env's step does). Reported per (f, variant):
violation rate (latency > budget), quality retention (mean chosen quality / mean full-config
quality), and for the margin sweep, over all (request, config, f): false-reject rate (candidates
rejected that would have met the budget, over those that would) and false-accept rate
(candidates accepted that violate, over those that violate), plus the controller's violation and
retention at each margin.

`scripts/m4_guardrail.py` is the driver; `plot_from_results(results_dir)` rebuilds the figure from `m4_summary.json`.
"""
from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ..latency.guardrail import budget_mask, predict_replay_latency
from ..profiles.replay import request_split_mask
from .common import figures_path, pyplot, save_figure

VARIANTS = ("none", "oracle", "estimator", "noisy")


def rank_scores(data, split: str = "train") -> np.ndarray:
    """float [R, C]: the controller's preference per request (its family's train-half ranking)."""
    families = np.asarray(data.families)
    train = request_split_mask(data.request_ids, data.families, split)
    scores = np.zeros(data.quality.shape)
    for family in sorted(set(data.families)):
        rows = families == family
        ref = rows & train
        quality = data.quality[ref].mean(axis=0)
        latency = data.total_ms[ref].mean(axis=0)
        # quality first; among equal quality the faster config (rank-based tie-break < 1e-6)
        order = np.argsort(np.argsort(latency))
        scores[rows] = (quality - 1e-9 * order)[None]
    return scores


def choose(scores: np.ndarray, allowed: np.ndarray) -> np.ndarray:
    return np.argmax(np.where(allowed, scores, -np.inf), axis=1)


def evaluate_guardrails(data, estimator, budget_fractions: Sequence[float], margin: float, margins: Sequence[float],
                        noise_sigma: float, seed: int, requests_per_family: int | None = None) -> dict:
    """M4 on replay data `data` with the stage estimator `estimator`: per budget fraction and guardrail variant,
    the controller's violation rate and quality retention at `margin`; the share of budgets no configuration meets;
    and the margin sweep's false-reject / false-accept rates. `requests_per_family` keeps only the first held-out
    requests of each family (the quick run)."""
    rng = np.random.default_rng(seed)
    heldout = np.flatnonzero(request_split_mask(data.request_ids, data.families, "heldout"))
    families = np.asarray(data.families)
    if requests_per_family is not None:
        heldout = np.concatenate([heldout[families[heldout] == f][:requests_per_family] for f in sorted(set(data.families))])
    full_ms = data.family_full_latency_ms()
    budget_ref = np.array([full_ms[f] for f in families[heldout]])
    estimated_all = predict_replay_latency(data, estimator)
    estimated = estimated_all[heldout]
    median_ms = data.total_ms[heldout].astype(np.float64)
    # the replayed latency: median x one recorded residual per (request, config), as in the env
    residual = data.noise_log_ratio[np.arange(data.total_ms.shape[1])[None], rng.integers(0, data.noise_log_ratio.shape[1], median_ms.shape)]
    served_ms = median_ms * np.exp(residual.astype(np.float64))
    noisy = estimated * np.exp(noise_sigma * rng.standard_normal(estimated.shape))
    predictions = {"none": None, "oracle": median_ms, "estimator": estimated, "noisy": noisy}
    scores = rank_scores(data)[heldout]
    quality = data.quality[heldout].astype(np.float64)
    full_quality = quality[:, data.full_index].mean()
    rows = np.arange(len(heldout))

    def outcome(variant: str, fraction: float, at_margin: float):
        budget = fraction * budget_ref
        pred = predictions[variant]
        allowed = np.ones(quality.shape, bool) if pred is None else budget_mask(pred, budget, at_margin)
        c = choose(scores, allowed)
        return allowed, budget, {"violation_rate": float(np.mean(served_ms[rows, c] > budget)),
                                 "quality_retention": float(quality[rows, c].mean() / full_quality)}

    by_fraction = {f"{f:g}": {v: outcome(v, f, margin)[2] for v in VARIANTS} for f in budget_fractions}
    # requests whose budget no configuration meets (a floor on any guardrail's violation rate)
    infeasible = {f"{f:g}": float(np.mean((served_ms > (f * budget_ref)[:, None]).all(axis=1))) for f in budget_fractions}
    mean = {v: {k: float(np.mean([by_fraction[f][v][k] for f in by_fraction])) for k in ("violation_rate", "quality_retention")}
            for v in VARIANTS}
    sweep = {}
    for v in VARIANTS[1:]:
        sweep[v] = []
        for m in margins:
            fr_num = fr_den = fa_num = fa_den = 0
            viol, ret = [], []
            for f in budget_fractions:
                allowed, budget, res = outcome(v, f, m)
                feasible = served_ms <= budget[:, None]
                fr_num += int((feasible & ~allowed).sum())
                fr_den += int(feasible.sum())
                fa_num += int((~feasible & allowed).sum())
                fa_den += int((~feasible).sum())
                viol.append(res["violation_rate"])
                ret.append(res["quality_retention"])
            sweep[v].append({"margin": float(m), "false_reject_rate": fr_num / max(fr_den, 1),
                             "false_accept_rate": fa_num / max(fa_den, 1),
                             "violation_rate": float(np.mean(viol)), "quality_retention": float(np.mean(ret))})
    rel = estimated_all / data.total_ms
    return {"n_requests": len(heldout), "estimator_median_abs_rel_error": float(np.median(np.abs(rel[heldout] - 1))),
            "by_fraction": by_fraction, "infeasible_rate": infeasible, "mean_over_fractions": mean, "margin_sweep": sweep}


def plot(summary: dict, path: Path) -> Path:
    """Violations per budget fraction and variant at the summary's margin; the margin sweep's trade-off."""
    plt = pyplot()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    fractions = [float(f) for f in summary["by_fraction"]]
    colors = dict(zip(VARIANTS, ("C0", "C1", "C2", "C3")))
    for v in VARIANTS:
        ax1.plot(fractions, [summary["by_fraction"][f][v]["violation_rate"] for f in summary["by_fraction"]], "o-", color=colors[v], label=v)
    ax1.set_xlabel("budget fraction of full-config latency")
    ax1.set_ylabel("violation rate")
    ax1.set_title(f"violations (margin {summary['margin']:g}, held-out)")
    ax1.legend()
    for v, points in summary["margin_sweep"].items():
        fa = [p["false_accept_rate"] for p in points]
        fr = [p["false_reject_rate"] for p in points]
        ax2.plot(fa, fr, "o-", color=colors[v], label=v)
        for p in (points[0], points[-1]):
            ax2.annotate(f"{p['margin']:g}", (p["false_accept_rate"], p["false_reject_rate"]), fontsize=7)
    ax2.set_xlabel("false-accept rate")
    ax2.set_ylabel("false-reject rate")
    ax2.set_title("margin sweep")
    ax2.legend()
    return save_figure(fig, path, 120)


def plot_from_results(results_dir: Path, figures_dir: Path | None = None) -> list[Path]:
    results_dir = Path(results_dir)
    summary = json.loads((results_dir / "m4_summary.json").read_text())
    return [plot(summary, figures_path(results_dir, figures_dir) / "m4_guardrail.png")]
