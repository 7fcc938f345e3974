"""M6: generalization to a task family never seen in controller training (../shared/EXPERIMENTS.md "M6").

For each held-out family F, the controllers are trained on the train half of the other eight
families' recorded requests (`ProfileTables` without F's rows) and evaluated on F's held-out half
(`FlexVLMReplay-v0`, `families=[F]`, `split="heldout"`), at every budget fraction, on the replay
latency source. Recalibration then profiles n of F's *train-half* requests (n in {0, 10, 25, 50},
several seeded draws) at every configuration, as a deployment would on a new workload, and uses
them for what depends on the family:

- the budget reference (the family's median full-configuration latency over the n requests) and
  the latency-fraction table (the `quantile` of latency / reference over the n requests and the
  recorded residuals): row F of the latency guardrail (`agents.guardrail.LatencyGuardrail`), used
  by the supervised controller's feasibility filter and by the baselines;
- the LUT's row F (`LUTController.fit` on the n requests alone);
- output lengths are inside these tables (a profiled request's latency includes its decode).

How the family is presented to the controllers. Every controller encodes the family as its index
in `FAMILY_NAMES` (the observation's `family`): the LUT indexes a table row with it, the
supervised MLP and the PPO policies see it as a one-hot over the nine names
(`agents.features.observation_features`). A held-out family still has an index, but
- the LUT's row for it is the fallback `LUTController.fit` writes for families without
  profiles (the fastest configuration on average) until recalibration fills it;
- the guardrail's row is the constructor's fallback (the slowest family's predicted fractions:
  conservative) until recalibration fills it;
- the MLP's weights from F's one-hot column were never trained (only initialised, then shrunk by
  weight decay), so its output for F is the network's response to "no family" plus noise.
We report two presentations for the MLP: `supervised_own` (F's own index: the one-hot as is) and
`supervised_proxy` (F is shown as the seen family nearest to it on the n profiled requests: the
smallest mean absolute difference of the log latency-fraction table plus the mean absolute
difference of the quality-retention table (mean quality / quality at the full configuration);
the guardrail still uses F's recalibrated row). The proxy is the one that extends to any
controller without retraining: the policy only ever sees inputs it was trained on, and the
family-specific latency goes to the guardrail, which is where the n points are used.
At n = 0 the proxy presentation has nothing to go on and is the same as the own index.

Reference: `lut_seen`, the LUT fitted with F's whole train half (the in-distribution controller).
`plot_from_results(results_dir)` rebuilds the figures from `m6_summary.json`.
"""
from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from .common import figures_path, pyplot, save_figure

METRIC_KEYS = ("quality_retention", "violation_rate", "latency_p95_ms", "quality")


def family_rows(profiles, family: str) -> np.ndarray:
    from ..envs.core import FAMILY_NAMES

    return np.flatnonzero(profiles.family_index == FAMILY_NAMES.index(family))


def without_family(profiles, family: str):
    """The train profiles of every family but `family`."""
    from ..envs.core import FAMILY_NAMES

    return profiles.subset(np.flatnonzero(profiles.family_index != FAMILY_NAMES.index(family)))


def calibration_profiles(profiles, family: str, n: int, seed: int):
    """`n` of `family`'s train requests (a seeded draw) with the budget reference estimated from
    them (their median full-configuration latency), not the env's whole-pool reference."""
    rows = family_rows(profiles, family)
    if not 1 <= n <= len(rows):
        raise ValueError(f"n={n!r} calibration requests; {family!r} has {len(rows)} train requests (allowed 1..{len(rows)})")
    chosen = np.random.default_rng(seed).choice(rows, size=n, replace=False)
    sub = profiles.subset(np.sort(chosen))
    full = len(profiles.grid) - 1  # the full configuration is the last of the row-major grid
    reference = float(np.median(sub.latency_ms[:, full]))
    return dataclasses.replace(sub, reference_ms=np.full(n, reference))


def retention_table(profiles) -> np.ndarray:
    """float [F, C]: mean quality at each config over mean quality at the full config (NaN rows
    for families without requests; 1 where the full config scores 0)."""
    quality = profiles.family_quality()
    full = quality[:, -1:]
    return np.where(full > 0, quality / np.where(full > 0, full, 1.0), 1.0)


def nearest_family(train_profiles, calibration, family_index: int, quantile: float) -> int:
    """The seen family whose latency-fraction and retention tables are nearest to the held-out
    family's n-point tables (see module docstring)."""
    seen_lat = train_profiles.family_latency_fraction(quantile)
    seen_ret = retention_table(train_profiles)
    lat = calibration.family_latency_fraction(quantile)[family_index]
    ret = retention_table(calibration)[family_index]
    seen = ~np.isnan(seen_lat).all(axis=1)
    distance = np.full(len(seen), np.inf)
    distance[seen] = (np.nanmean(np.abs(np.log(seen_lat[seen]) - np.log(lat)[None]), axis=1)
                      + np.nanmean(np.abs(seen_ret[seen] - ret[None]), axis=1))
    return int(np.argmin(distance))


def recalibrated_guardrail(base_fraction: np.ndarray, calibration, family_index: int, quantile: float):
    """A guardrail whose rows are `base_fraction`'s (NaN for unseen families: the constructor's
    fallback), with the held-out family's row from the calibration requests (if any)."""
    from agents.guardrail import LatencyGuardrail

    predicted = np.array(base_fraction, dtype=np.float64)
    if calibration is not None:
        predicted[family_index] = calibration.family_latency_fraction(quantile)[family_index]
    return LatencyGuardrail(predicted, quantile)


def proxy_family_controller(inner, mapping: Mapping[int, int]):
    """A controller deciding like `inner` (a `SupervisedController`) with the family shown to its
    network as another one (`mapping`: family index -> index shown); its guardrail still uses
    the true family's row. (Defined here, not in `agents`, to keep this module's import light.)"""
    import torch

    from agents.base import Controller
    from agents.features import observation_features

    class ProxyFamily(Controller):
        kind = "supervised_proxy"

        def select_indices(self, observations):
            family = np.asarray(observations["family"], dtype=np.int64).reshape(-1)
            shown = dict(observations)
            shown["family"] = np.array([mapping.get(int(f), int(f)) for f in family], dtype=np.int64)
            with torch.inference_mode():
                logits = inner.net(torch.from_numpy(observation_features(shown))).numpy()
            if inner.guardrail is not None:
                logits = np.where(inner.guardrail.masks(family, observations["budget_fraction"]), logits, -np.inf)
            return logits.argmax(axis=1)

    return ProxyFamily(inner.grid)


def train_supervised(profiles, budget_fractions: Sequence[float], epochs: int, seed: int, hidden=(128, 128)):
    """The supervised controller (`agents.supervised`) trained on `profiles`' oracle labels, with
    the guardrail from the same profiles (the E5 trainer's recipe, all epochs at once)."""
    import torch

    from agents.supervised import SupervisedController, oracle_dataset

    controller = SupervisedController.create(profiles, hidden, guardrail=True, seed=seed)
    features, targets = oracle_dataset(profiles, budget_fractions)
    optimizer = torch.optim.AdamW(controller.net.parameters(), lr=1e-3, weight_decay=1e-4)
    controller.train_epochs(features, targets, optimizer, epochs, 256, torch.Generator().manual_seed(seed))
    return controller


def compact(result: dict) -> dict:
    """The metrics kept from `agents.evaluation.evaluate`: per fraction and mean."""
    return {"by_fraction": {f: {k: m[k] for k in METRIC_KEYS} for f, m in result["by_fraction"].items()},
            "mean": {k: result["mean"][k] for k in METRIC_KEYS}}


def average(results: Sequence[dict]) -> dict:
    """Mean (and min/max of the mean retention) over recalibration draws."""
    fractions = results[0]["by_fraction"]
    out = {"by_fraction": {f: {k: float(np.mean([r["by_fraction"][f][k] for r in results])) for k in METRIC_KEYS} for f in fractions},
           "mean": {k: float(np.mean([r["mean"][k] for r in results])) for k in METRIC_KEYS}}
    retention = [r["mean"]["quality_retention"] for r in results]
    out["retention_min"], out["retention_max"], out["n_draws"] = float(min(retention)), float(max(retention)), len(results)
    return out


def run_family(data, family: str, ns: Sequence[int], draws: int, budget_fractions: Sequence[float], epochs: int,
               quantile: float, seed: int, eval_requests: int | None) -> dict:
    """Every method on `family`'s held-out half for each recalibration size (see module docstring)."""
    import gymnasium as gym

    from agents.evaluation import evaluate
    from agents.lut import LUTController
    from agents.profiles import ProfileTables
    from baselines import make_baselines

    from ..envs.core import FAMILY_NAMES

    index = FAMILY_NAMES.index(family)
    profiles = ProfileTables.from_replay(data, "train")
    train = without_family(profiles, family)
    env = gym.make("FlexVLMReplay-v0", data=data, split="heldout", families=[family], episode_length=1,
                   budget_fractions=tuple(budget_fractions))
    evaluate_ = lambda c: compact(evaluate(c, env, budget_fractions, eval_requests, seed))  # noqa: E731
    base_fraction = train.family_latency_fraction(quantile)
    lut = LUTController.fit(train, budget_fractions)
    supervised = train_supervised(train, budget_fractions, epochs, seed)
    out: dict = {"family": family, "n_train_requests": train.n_requests, "by_n": {},
                 "lut_seen": compact(evaluate(LUTController.fit(profiles, budget_fractions), env, budget_fractions, eval_requests, seed))}
    for n in ns:
        per_method: dict[str, list] = {}
        proxies = []
        for draw in range(draws if n > 0 else 1):
            calibration = calibration_profiles(profiles, family, n, seed * 1000 + draw) if n > 0 else None
            guardrail = recalibrated_guardrail(base_fraction, calibration, index, quantile)
            table = lut.table.copy()
            if calibration is not None:
                table[index] = LUTController.fit(calibration, budget_fractions).table[index]
            methods = {"lut": evaluate_(LUTController(table, lut.fractions, lut.grid, lut.max_violation_rate))}
            supervised.guardrail = guardrail  # the same network, the recalibrated guardrail
            methods["supervised_own"] = evaluate_(supervised)
            proxy = nearest_family(train, calibration, index, quantile) if calibration is not None else index
            proxies.append(FAMILY_NAMES[proxy])
            methods["supervised_proxy"] = evaluate_(proxy_family_controller(supervised, {index: proxy}))
            for name, baseline in make_baselines(train, guardrail=guardrail).items():
                methods[name] = evaluate_(baseline)
            for name, result in methods.items():
                per_method.setdefault(name, []).append(result)
        out["by_n"][str(n)] = {"methods": {name: average(results) for name, results in per_method.items()},
                               "proxy_families": proxies}
    return out


def headline(families: Mapping[str, dict], n: int, fractions: Sequence[str] = ("0.35", "0.5")) -> dict:
    """Mean over held-out families at `n` calibration requests: per method retention and violation
    (mean over all fractions and at each of `fractions`), and whether LUT / supervised_proxy beat
    every single-knob baseline and greedy at an equal or lower violation rate."""
    methods = next(iter(families.values()))["by_n"][str(n)]["methods"]
    out = {}
    for name in methods:
        rows = [f["by_n"][str(n)]["methods"][name] for f in families.values()]
        out[name] = {"quality_retention": float(np.mean([r["mean"]["quality_retention"] for r in rows])),
                     "violation_rate": float(np.mean([r["mean"]["violation_rate"] for r in rows])),
                     **{f"at_{f}": {k: float(np.mean([r["by_fraction"][f][k] for r in rows])) for k in ("quality_retention", "violation_rate")}
                        for f in fractions if f in rows[0]["by_fraction"]}}
    seen = [f["lut_seen"]["mean"] for f in families.values()]
    out["lut_seen"] = {"quality_retention": float(np.mean([s["quality_retention"] for s in seen])),
                       "violation_rate": float(np.mean([s["violation_rate"] for s in seen]))}
    return out


# ---------------------------------------------------------------------------- figures

def plot_from_results(results_dir: Path, figures_dir: Path | None = None) -> list[Path]:
    results_dir = Path(results_dir)
    figures = figures_path(results_dir, figures_dir)
    summary = json.loads((results_dir / "m6_summary.json").read_text())
    families = summary["families"]
    plt = pyplot()
    written = []
    methods = list(next(iter(families.values()))["by_n"][str(summary["ns"][0])]["methods"])
    fig, axes = plt.subplots(2, len(families), figsize=(4.2 * len(families), 6.4), squeeze=False)
    for col, (family, result) in enumerate(families.items()):
        ns = sorted(int(n) for n in result["by_n"])
        for i, name in enumerate(methods):
            style = {"ls": "-" if name in ("lut", "supervised_proxy", "supervised_own") else ":", "marker": "o", "color": f"C{i}"}
            ret = [result["by_n"][str(n)]["methods"][name]["mean"]["quality_retention"] for n in ns]
            vio = [result["by_n"][str(n)]["methods"][name]["mean"]["violation_rate"] for n in ns]
            axes[0, col].plot(ns, ret, label=name, **style)
            axes[1, col].plot(ns, vio, label=name, **style)
        axes[0, col].axhline(result["lut_seen"]["mean"]["quality_retention"], color="k", lw=0.8, ls="--", label="lut (family seen)")
        axes[1, col].axhline(result["lut_seen"]["mean"]["violation_rate"], color="k", lw=0.8, ls="--")
        axes[0, col].set_title(f"held-out family: {family}")
        axes[1, col].set_xlabel("recalibration requests n")
    axes[0, 0].set_ylabel("quality retention (mean over budgets)")
    axes[1, 0].set_ylabel("violation rate (mean over budgets)")
    axes[0, -1].legend(fontsize=7)
    for ax in axes.ravel():
        ax.grid(alpha=0.3)
    fig.suptitle(f"M6: unseen task family, controllers trained on the other 8 (replay {summary['latency_source']}, micro quality)")
    written.append(save_figure(fig, figures / "m6_recalibration.png", 110))

    n = str(max(summary["ns"]))
    fig, axes = plt.subplots(1, 2, figsize=(12, 3.8))
    x = np.arange(len(methods))
    width = 0.8 / len(families)
    for i, (family, result) in enumerate(families.items()):
        m = result["by_n"][n]["methods"]
        axes[0].bar(x + i * width, [m[k]["mean"]["quality_retention"] for k in methods], width, label=family)
        axes[1].bar(x + i * width, [m[k]["mean"]["violation_rate"] for k in methods], width, label=family)
    for ax, label in zip(axes, ("quality retention", "violation rate")):
        ax.set_xticks(x + width * (len(families) - 1) / 2, methods, rotation=30, fontsize=8)
        ax.set_ylabel(f"{label} (mean over budgets)")
        ax.grid(alpha=0.3, axis="y")
    axes[0].legend(fontsize=7)
    fig.suptitle(f"M6: held-out families after recalibration with n={n} requests")
    written.append(save_figure(fig, figures / "m6_methods.png", 110))
    return written
