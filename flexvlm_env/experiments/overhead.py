"""M3, controller overhead: what deciding and reconfiguring cost, against the latency they save.

Four measurements, each a function here so the CPU driver and the GPU run share them:

- `decision_times`: batch-1 `select_config` of each saved controller on real held-out observations
  (after a warm-up, the controllers taking turns over slices of them), and `feature_times`: computing
  the observation's prompt and image features from the raw request (`flexvlm_env.features`, what the
  live env times as controller overhead).
- `reconfiguration_times`: applying a `Config` in the live runtime. Nothing is reloaded or
  recompiled when a knob changes: `top_k` becomes a per-block tuple the router reads, the block
  plan a tuple of block indices the decoder loop walks (`VLM.plan`), and crops the preprocessing's
  crop count; on CUDA each (crop count) / (plan, top_k, prefill bucket) / (plan, top_k) has its own
  CUDA graph, captured once and looked up by key. So it is measured two ways: the host-side work
  of applying a config (`check_config`, `plan`, `top_k_per_block`), and the switch penalty, i.e.
  the end-to-end latency of a request at config B right after a request at another config A minus
  right after one at B itself (caches, graph switches).
- `candidate_scaling`: the selection step as the candidate set grows (140, 560 and 2240
  candidates: the default grid; crops x top_k 1..8 x active blocks 7..16; that x four block-mask
  variants), with a profiled latency table (guardrail filtering, no estimator) and with the stage
  estimator predicting every candidate for the request (`budget_mask` / `filter_by_budget`), plus
  the LUT lookup and a MaskablePPO-sized policy whose action head has one logit per candidate.
- `latency_saved`: per controller and latency source, the median latency of the requests it
  serves on the replay held-out half (all budget fractions) and the median it saves vs full.

`overhead_table` joins them: decision + reconfiguration (and + features) as a share of the median
request latency each controller controls, the bar being <= 1%.
"""
from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from agents.evaluation import time_calls_ms

from .common import distribution_summary, figures_path, pyplot, save_figure

SOURCES = ("molmoe-1b-h100", "micro-h200-measured")
ESTIMATORS = {"molmoe-1b-h100": "results/e3_estimators/molmoe-1b_h100.json",
              "micro-h200-measured": "results/e3_estimators/micro_h200.json"}
CANDIDATE_COUNTS = (140, 560, 2240)
BAR_SHARE = 0.01


DECISION_WARMUP = 10  # untimed calls per controller before the first round


def decision_times(controllers: dict, observations: Sequence[dict], rounds: int = 10) -> dict[str, dict]:
    """distribution_summary (ms) of batch-1 `select_config` per controller on `observations`.

    The controllers take turns: the observations are cut into `rounds` slices and every controller is timed
    on a slice before any goes on to the next. On the lent GPU hosts the host CPU's speed changed by up to
    2x within one M3 run (session 17: the same baseline at 0.010 and 0.017 ms a minute apart), and timing
    the controllers one after another put such a spell on whichever came next; taking turns spreads it
    over all of them."""
    observations = list(observations)
    if not observations:
        raise ValueError("observations is empty; decision times need at least one observation")
    if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 1:
        raise ValueError(f"rounds={rounds!r} must be an int >= 1")
    for controller in controllers.values():
        for observation in observations[:DECISION_WARMUP]:
            controller.select_config(observation)
    times: dict[str, list] = {name: [] for name in controllers}
    for part in np.array_split(np.arange(len(observations)), min(rounds, len(observations))):
        items = [observations[i] for i in part]
        for name, controller in controllers.items():
            times[name].append(time_calls_ms(controller.select_config, items, warmup=0))
    return {name: distribution_summary(np.concatenate(parts)) for name, parts in times.items()}


def replay_observations(source: str, n: int, seed: int = 0, fractions=(0.35, 0.5, 0.7, 0.85, 1.0)) -> list[dict]:
    """`n` single observations of held-out requests of `source` at the given fractions (seeded)."""
    from agents.profiles import ProfileTables

    tables = ProfileTables.load(latency=source, split="heldout")
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        batch = tables.observations(float(fractions[i % len(fractions)]))
        r = int(rng.integers(tables.n_requests))
        out.append({"family": np.int64(batch["family"][r]), "budget_ms": batch["budget_ms"][r],
                    "budget_fraction": batch["budget_fraction"][r], "prompt": batch["prompt"][r], "image": batch["image"][r]})
    return out


def feature_times(n_per_family: int = 10, seed: int = 0) -> dict:
    """distribution_summary (ms) of prompt + image features of procedural val requests."""
    from ..features import image_features, prompt_features
    from ..tasks import load_samples
    from ..tasks.families import FAMILIES

    samples = [s for family in FAMILIES for s in load_samples(family, "procedural", "val", n=n_per_family, seed=seed)]
    both = time_calls_ms(lambda s: (prompt_features(s.prompt), image_features(s.image)), samples)
    prompt = time_calls_ms(lambda s: prompt_features(s.prompt), samples)
    return {"prompt_and_image": distribution_summary(both), "prompt_only": distribution_summary(prompt),
            "n_requests": len(samples)}


def apply_config_times(vlm, configs: Sequence) -> dict:
    """Host-side work of applying each config (validate, block plan, per-block top_k), ms."""
    n_layers = vlm.args.n_layers

    def apply(config):
        vlm.check_config(config)
        vlm.plan(config)
        config.top_k_per_block(n_layers)

    return distribution_summary(time_calls_ms(apply, list(configs) * 5))


def switch_penalty(vlm, sample, configs: Sequence, n_pairs: int, seed: int = 0, max_new_tokens: int = 4) -> dict:
    """End-to-end latency at config B after a request at B (`same_ms`) and after one at a random
    other config A (`switched_ms`), `n_pairs` random (A, B) pairs; each pair's configs run once
    untimed first (on CUDA that captures their graphs, as a warm server has)."""
    rng = np.random.default_rng(seed)
    same, switched = [], []

    def run(config):
        return vlm.generate(sample.image, sample.prompt, config, max_new_tokens=max_new_tokens, ignore_eos=True).latency.total_ms

    for _ in range(n_pairs):
        a, b = rng.choice(len(configs), size=2, replace=False)
        run(configs[a]), run(configs[b])
        run(configs[b])
        same.append(run(configs[b]))
        run(configs[a])
        switched.append(run(configs[b]))
    same, switched = np.array(same), np.array(switched)
    diff = switched - same
    low, high = bootstrap_median_ci(diff, seed=seed)
    return {"same_ms": distribution_summary(same), "switched_ms": distribution_summary(switched),
            "penalty_ms_median": float(np.median(diff)), "penalty_ms_mean": float(diff.mean()),
            "penalty_ms_p95": float(np.percentile(diff, 95)), "penalty_ms_ci95": [low, high],
            # resolved: the 95% interval excludes 0, i.e. the penalty is measured above the noise
            "penalty_resolved": bool(low > 0 or high < 0), "n_pairs": n_pairs, "max_new_tokens": max_new_tokens}


def bootstrap_median_ci(values, n_resamples: int = 2000, seed: int = 0) -> tuple[float, float]:
    """95% bootstrap interval of the median of `values`."""
    values = np.asarray(values, dtype=float)
    if values.size == 0:
        raise ValueError("bootstrap_median_ci needs at least one value")
    rng = np.random.default_rng(seed)
    medians = np.median(values[rng.integers(0, len(values), size=(n_resamples, len(values)))], axis=1)
    return float(np.percentile(medians, 2.5)), float(np.percentile(medians, 97.5))


def reconfiguration_cost_ms(reconfiguration: dict, include_switch: bool) -> float:
    """Host-side config application (median) plus, with `include_switch`, the switch penalty's
    median when it is resolved and positive (an unresolved one is reported, not added)."""
    cost = reconfiguration["apply_config"]["median"]
    switch = reconfiguration["switch"]
    if include_switch and switch.get("penalty_resolved") and switch["penalty_ms_median"] > 0:
        cost += switch["penalty_ms_median"]
    return cost


def reconfiguration_times(device: str, n_pairs: int, seed: int = 0, dtype: str | None = None) -> dict:
    """`apply_config_times` over the 140 configs and `switch_penalty` for micro on `device`."""
    from ..benchmarking import device_info
    from ..config import KnobGrid
    from ..model.runtime import load_model
    from ..tasks import load_samples

    vlm = load_model("micro", device=device, dtype=dtype)
    configs = KnobGrid().configs()
    sample = load_samples("coco_2014_vqa", "procedural", "val", n=1, seed=seed)[0]
    return {"device": device_info(vlm.device), "model": "micro", "apply_config": apply_config_times(vlm, configs),
            "switch": switch_penalty(vlm, sample, configs, n_pairs, seed)}


# -- candidate scaling -----------------------------------------------------------------------------


def candidate_grid(n: int) -> dict[str, np.ndarray]:
    """Knob values of the `n`-candidate set (140, 560 or 2240; see the module docstring), as
    arrays crops, top_k, active_blocks, mask_variant (0 = importance)."""
    crops = np.array([1, 2, 3, 4, 6, 9, 12])
    if n == 140:
        top_k, blocks, variants = np.array([1, 2, 4, 8]), np.array([8, 10, 12, 14, 16]), 1
    elif n in (560, 2240):
        top_k, blocks, variants = np.arange(1, 9), np.arange(7, 17), n // 560
    else:
        raise ValueError(f"n={n!r} candidates is not a defined grid; allowed: {list(CANDIDATE_COUNTS)}")
    c, k, b, v = np.meshgrid(crops, top_k, blocks, np.arange(variants), indexing="ij")
    return {"crops": c.ravel(), "top_k": k.ravel(), "active_blocks": b.ravel(), "mask_variant": v.ravel(),
            "crop_index": np.searchsorted(crops, c.ravel())}


def candidate_scaling(estimator, input_tokens: np.ndarray, output_tokens: float, full_ms: float,
                      counts: Sequence[int] = CANDIDATE_COUNTS, n_calls: int = 200, seed: int = 0) -> dict:
    """Per candidate count, batch-1 selection times (ms summaries):
    - `lut_lookup`: table[family, budget bucket];
    - `table_filter`: guardrail filtering with a precomputed [family, N] latency table + best score;
    - `estimator_filter`: the estimator predicts all N candidates for the request (its input tokens
      per crop count, a predicted output length), `budget_mask`, best score among those kept;
    - `estimator_filter_by_budget`: the same through the list API `filter_by_budget`;
    - `policy_head`: a MaskablePPO-sized MLP (21 -> 64 -> N logits) + mask + argmax (torch).
    `input_tokens` [n_crop_values] of one request; budgets drawn from fractions 0.35..1 of `full_ms`."""
    import torch

    from ..latency.guardrail import budget_mask, filter_by_budget

    rng = np.random.default_rng(seed)
    out = {}
    for n in counts:
        grid = candidate_grid(n)
        tokens = np.asarray(input_tokens, float)[grid["crop_index"]]
        predicted = estimator.predict_total(grid["crops"], tokens, grid["top_k"], grid["active_blocks"], np.full(n, output_tokens))
        table = np.tile(predicted / full_ms, (9, 1)) * rng.uniform(0.9, 1.1, (9, n))
        score = rng.uniform(size=(9, n))
        lut = rng.integers(n, size=(9, 5))
        budgets = [(int(rng.integers(9)), float(rng.choice([0.35, 0.5, 0.7, 0.85, 1.0]))) for _ in range(n_calls)]

        def table_filter(case):
            family, fraction = case
            allowed = table[family] <= fraction
            return int(np.argmax(np.where(allowed, score[family], -np.inf))) if allowed.any() else int(np.argmin(table[family]))

        def estimator_filter(case):
            family, fraction = case
            pred = estimator.predict_total(grid["crops"], tokens, grid["top_k"], grid["active_blocks"], np.full(n, output_tokens))
            keep = budget_mask(pred[None], np.array([fraction * full_ms]))[0]
            return int(np.argmax(np.where(keep, score[family], -np.inf)))

        candidates = list(range(n))

        def estimator_list(case):
            family, fraction = case
            pred = estimator.predict_total(grid["crops"], tokens, grid["top_k"], grid["active_blocks"], np.full(n, output_tokens))
            kept = filter_by_budget(candidates, pred, fraction * full_ms)
            return max(kept, key=lambda c: score[family, c])

        torch.manual_seed(seed)
        mlp = torch.nn.Sequential(torch.nn.Linear(21, 64), torch.nn.Tanh(), torch.nn.Linear(64, n))
        x = torch.randn(1, 21)

        @torch.inference_mode()
        def policy_head(case):
            family, fraction = case
            logits = mlp(x).numpy()[0]
            return int(np.argmax(np.where(table[family] <= fraction, logits, -np.inf)))

        out[str(n)] = {
            "lut_lookup": distribution_summary(time_calls_ms(lambda case: int(lut[case[0], int(case[1] * 4) % 5]), budgets)),
            "table_filter": distribution_summary(time_calls_ms(table_filter, budgets)),
            "estimator_filter": distribution_summary(time_calls_ms(estimator_filter, budgets)),
            "estimator_filter_by_budget": distribution_summary(time_calls_ms(estimator_list, budgets)),
            "policy_head": distribution_summary(time_calls_ms(policy_head, budgets)),
        }
    return out


# -- latency saved ---------------------------------------------------------------------------------


def latency_saved(controllers: dict, source: str, fractions=(0.35, 0.5, 0.7, 0.85, 1.0)) -> dict[str, dict]:
    """Per controller: median latency (ms) of its choices over held-out requests x fractions (the
    recorded median latency per request and config), and the median saved vs the full config."""
    from agents.profiles import ProfileTables

    tables = ProfileTables.load(latency=source, split="heldout")
    full = tables.grid.configs().index(tables.grid.full)
    full_ms = tables.latency_ms[:, full]
    out = {}
    rows = np.arange(tables.n_requests)
    for name, controller in controllers.items():
        chosen, saved = [], []
        for f in fractions:
            idx = controller.select_indices(tables.observations(float(f)))
            lat = tables.latency_ms[rows, idx]
            chosen.append(lat)
            saved.append(full_ms - lat)
        chosen, saved = np.concatenate(chosen), np.concatenate(saved)
        out[name] = {"median_latency_ms": float(np.median(chosen)), "median_full_latency_ms": float(np.median(full_ms)),
                     "median_saved_ms": float(np.median(saved)), "mean_saved_ms": float(np.mean(saved))}
    return out


def overhead_table(decision: dict[str, dict], saved: dict[str, dict], reconfig_ms: float, features_ms: float) -> dict:
    """Per controller: decision median + reconfiguration (+ features) as a share of the median
    latency of the requests it controls, and against the median latency it saves."""
    out = {}
    for name, d in decision.items():
        if name not in saved:
            continue
        median_ms = saved[name]["median_latency_ms"]
        cost = d["median"] + reconfig_ms
        out[name] = {"decision_ms": d["median"], "decision_p95_ms": d["p95"], "reconfiguration_ms": reconfig_ms,
                     "features_ms": features_ms, "median_request_ms": median_ms,
                     "share_of_median_latency": cost / median_ms, "share_with_features": (cost + features_ms) / median_ms,
                     "median_saved_ms": saved[name]["median_saved_ms"],
                     "share_of_saved": cost / saved[name]["median_saved_ms"] if saved[name]["median_saved_ms"] > 0 else None,
                     "within_bar": bool(cost / median_ms <= BAR_SHARE),
                     "within_bar_with_features": bool((cost + features_ms) / median_ms <= BAR_SHARE)}
    return out


# -- figures ---------------------------------------------------------------------------------------


def plot_from_results(results_dir: Path, figures_dir: Path | None = None) -> list[Path]:
    """Rebuild M3's figures from `results/m3_summary.json` alone."""
    results_dir = Path(results_dir)
    summary = json.loads((results_dir / "m3_summary.json").read_text())
    figures = figures_path(results_dir, figures_dir)
    written = []
    plt = pyplot()

    hosts = list(summary["decision"])
    fig, axes = plt.subplots(1, len(hosts), figsize=(6 * len(hosts), 4), squeeze=False)
    for ax, host in zip(axes[0], hosts):
        names = sorted(summary["decision"][host], key=lambda n: summary["decision"][host][n]["median"])
        med = [summary["decision"][host][n]["median"] for n in names]
        p95 = [summary["decision"][host][n]["p95"] for n in names]
        ax.barh(names, med, color="tab:blue", label="median")
        ax.scatter(p95, names, color="k", marker="|", s=80, label="P95")
        feats = summary["features"].get(host.split(" | ")[0])
        if feats:
            ax.axvline(feats["prompt_and_image"]["median"], color="tab:red", ls="--", label="observation features (median)")
        ax.set_xscale("log")
        ax.set_xlabel("batch-1 decision time (ms)")
        ax.set_title(host, fontsize=9)
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    fig.suptitle("M3: decision time per controller", fontsize=10)
    written.append(save_figure(fig, figures / "m3_decision_times.png", 120))

    fig, ax = plt.subplots(figsize=(6.5, 4))
    scaling = summary["candidate_scaling"]
    for (source, by_n), ls in zip(scaling.items(), ("-", "--")):
        counts = [int(n) for n in by_n]
        for key, color in zip(("lut_lookup", "table_filter", "policy_head", "estimator_filter", "estimator_filter_by_budget"),
                              ("tab:brown", "tab:blue", "tab:red", "tab:green", "tab:olive")):
            ax.plot(counts, [by_n[str(n)][key]["median"] for n in counts], marker="o", ls=ls, color=color,
                    label=f"{key} ({source})")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("candidate configurations")
    ax.set_ylabel("selection time, median (ms)")
    ax.set_title("M3: selection time vs candidate count (with / without the estimator)", fontsize=9)
    ax.legend(fontsize=6)
    ax.grid(alpha=0.3)
    written.append(save_figure(fig, figures / "m3_candidate_scaling.png", 120))

    tables = [(s, t) for s, t in summary["overhead"].items()]
    fig, axes = plt.subplots(1, len(tables), figsize=(6 * len(tables), 4), squeeze=False)
    for ax, (label, table) in zip(axes[0], tables):
        for name, row in table.items():
            ax.scatter(row["median_saved_ms"], 100 * row["share_of_median_latency"], s=20)
            ax.annotate(name, (row["median_saved_ms"], 100 * row["share_of_median_latency"]), fontsize=7)
        ax.axhline(100 * BAR_SHARE, color="k", ls="--", lw=0.8, label="1% bar")
        ax.set_yscale("log")
        ax.set_xlabel("median latency saved vs full (ms)")
        ax.set_ylabel("decision + reconfiguration, % of median latency")
        ax.set_title(label, fontsize=8)
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    fig.suptitle("M3: overhead vs latency saved", fontsize=10)
    written.append(save_figure(fig, figures / "m3_overhead_vs_saved.png", 120))
    return written
