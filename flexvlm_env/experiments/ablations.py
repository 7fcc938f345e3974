"""E6: ablations and portability (../shared/EXPERIMENTS.md "E6 — Ablations and portability").

Everything is evaluated on `FlexVLMReplay-v0`'s held-out half (micro quality; latency replayed
from `molmoe-1b-h100` unless said otherwise) at every budget fraction, with
`agents.evaluation.evaluate`, for two controllers trained on the train half: the LUT
(`agents.lut`, training-free) and the supervised MLP with its latency guardrail
(`agents.supervised`), i.e. E5's two fastest-to-train methods, both within a few points of E5's
best.

- Knobs: each controller restricted to each single knob, each pair and all three: the
  configurations that move a knob outside the subset away from its full value are blocked in
  the profiles the controller learns from (`restrict`: their latency set to `BLOCKED_MS`, so the
  LUT never tabulates them, the oracle labels never name them and the guardrail never allows
  them). Frontier: P95 latency vs quality retention over the budget fractions; deltas to the
  all-three system.
- Depth mask strategy: M5's gaps (from `m5_summary.json`), and, where the M5 quality tables
  exist, the LUT restricted to M5's sub-grid with each mask policy's quality (system-level).
- Guardrail on/off: the supervised controller with and without its guardrail (the LUT has none
  to switch off: its table is built under the violation constraint).
- Task-family input on/off: the controllers trained and queried with the family replaced by one
  constant (`family_blind`): the LUT has one row pooled over all families, the MLP a constant
  one-hot and its guardrail one pooled row. The budget stays per family (the env's), so the
  budget in ms still carries some family information.
- Portability, another GPU: the H100-trained controllers on MolmoE-1B's H200 latency (the H200
  stage table composed by `build_replay_data`), with their latency knowledge (the LUT's table,
  the guardrail of the MLP and of the baselines) as trained on the H100; recalibrated as E3 does
  (the H100 stage estimator moved to the H200 by per-stage affine maps from `--recal-n` target
  points, `flexvlm_env.latency.recalibrate`; its estimates for the train requests replace the
  profiles' latencies, `estimated_profiles`, from which the LUT is refitted and the guardrail
  rebuilt; the MLP is not retrained), with the points either replayed from the H200 tables
  (consistent with the evaluated latency) or measured end-to-end H200 runs (real, but the H200
  stage table's host preprocessing is ~2x those runs', E3's note, so they disagree with the
  replay); or from the H200's own profiles (reference). Also the H100 estimator on the H100
  (the estimator's own error, no portability). Gains over the baselines vs those on the H100.
- Portability, another task family: M6's headline (`m6_summary.json`).
- Portability, another MoE VLM: none is available here (only the MolmoE topology: `micro` and
  `molmoe-1b`); not run.

`plot_from_results(results_dir)` rebuilds the figures from `e6_summary.json`.
"""
from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from .common import figures_path, pyplot, save_figure
from .generalization import average, compact, train_supervised

BLOCKED_MS = 1e9  # finite (quantiles of inf are NaN), far above any budget
KNOB_SUBSETS: dict[str, tuple[str, ...]] = {
    "crops": ("crops",), "top_k": ("top_k",), "active_blocks": ("active_blocks",),
    "crops+top_k": ("crops", "top_k"), "crops+active_blocks": ("crops", "active_blocks"),
    "top_k+active_blocks": ("top_k", "active_blocks"), "all": ("crops", "top_k", "active_blocks"),
}
KNOBS = ("crops", "top_k", "active_blocks")
METRIC_KEYS = ("quality_retention", "violation_rate", "latency_p95_ms", "quality")


def allowed_configs(grid, knobs: Sequence[str]) -> np.ndarray:
    """bool [C]: configurations whose knobs outside `knobs` are at their full (largest) value."""
    unknown = sorted(set(knobs) - set(KNOBS))
    if unknown:
        raise ValueError(f"knobs={list(knobs)!r}: unknown {unknown}; allowed: {list(KNOBS)}")
    full = {"crops": max(grid.crops), "top_k": max(grid.top_k), "active_blocks": max(grid.active_blocks)}
    return np.array([all(getattr(c, k) == full[k] for k in KNOBS if k not in knobs) for c in grid.configs()])


def restrict(profiles, allowed: np.ndarray):
    """`profiles` with the configurations outside `allowed` blocked (latency `BLOCKED_MS`)."""
    allowed = np.asarray(allowed, dtype=bool)
    if allowed.shape != (len(profiles.grid),) or not allowed.any():
        raise ValueError(f"allowed must be a non-empty bool mask of {len(profiles.grid)} configs, got shape {allowed.shape}")
    latency = profiles.latency_ms.copy()
    latency[:, ~allowed] = BLOCKED_MS
    return dataclasses.replace(profiles, latency_ms=latency)


def family_blind(profiles):
    """`profiles` with every request's family index replaced by 0 (one pooled family)."""
    return dataclasses.replace(profiles, family_index=np.zeros_like(profiles.family_index))


def blind_controller(inner):
    """A controller that shows `inner` family 0 whatever the request's family."""
    from agents.base import Controller

    class FamilyBlind(Controller):
        kind = "family_blind"

        def select_indices(self, observations):
            shown = dict(observations)
            shown["family"] = np.zeros_like(np.asarray(observations["family"], dtype=np.int64))
            return inner.select_indices(shown)

    return FamilyBlind(inner.grid)


def h200_replay_data(stages_path: Path):
    """MolmoE-1B latency on the H200 composed from its stage table, with the shipped quality."""
    from ..profiles.loading import QUALITY_SOURCES, REQUESTS_TABLE, build_replay_data, profiles_dir
    from ..profiles.tables import read_parquet

    requests, _ = read_parquet(profiles_dir() / REQUESTS_TABLE)
    answers, quality_meta = read_parquet(profiles_dir() / QUALITY_SOURCES["micro"])
    stages, stage_meta = read_parquet(stages_path)
    return build_replay_data(requests, answers, stages, "molmoe-1b", answered_by=quality_meta.get("preset", "micro"),
                             metadata={"quality_source": "micro", "latency_source": f"molmoe-1b@{stage_meta.get('device_name')}",
                                       "stage_table": Path(stages_path).name})


def stage_medians(data) -> dict:
    """Median stage times (ms) over the requests at the smallest and the full configuration, and
    the median smallest/full latency ratio: what makes small configs relatively dearer on one GPU
    than another (e.g. a host preprocessing stage that does not shrink with the crop count)."""
    from ..profiles.replay import STAGE_COLUMNS

    out = {label: {name: float(np.median(data.stage_ms[:, c, k])) for k, name in enumerate(STAGE_COLUMNS)}
           for label, c in (("smallest_config", 0), ("full_config", data.full_index))}
    out["smallest_over_full_median"] = float(np.median(data.total_ms[:, 0] / data.total_ms[:, data.full_index]))
    return out


def replay_calibration_points(data, n: int, seed: int, split: str = "train"):
    """`n` (request, config) points of `data`'s `split` half (a seeded draw) as a calibration
    table (`crops, input_tokens, top_k, active_blocks, output_tokens, measured_<stage>_ms,
    measured_total_ms`): what profiling n requests on the target GPU records, taken from the
    latency the target replay serves."""
    import pandas as pd

    from ..latency.guardrail import request_input_tokens
    from ..profiles.replay import STAGE_COLUMNS, request_split_mask

    rows = np.flatnonzero(request_split_mask(data.request_ids, data.families, split))
    rng = np.random.default_rng(seed)
    r = rng.choice(rows, size=n, replace=False)
    c = rng.integers(0, len(data.grid), size=n)
    configs = data.grid.configs()
    inputs = request_input_tokens(data, "molmoe-1b")
    crops_col = {v: i for i, v in enumerate(data.grid.crops)}
    frame = pd.DataFrame({"crops": [configs[j].crops for j in c], "top_k": [configs[j].top_k for j in c],
                          "active_blocks": [configs[j].active_blocks for j in c],
                          "input_tokens": [inputs[i, crops_col[configs[j].crops]] for i, j in zip(r, c)],
                          "output_tokens": data.output_tokens[r, c].astype(np.float64)})
    for k, name in enumerate(STAGE_COLUMNS):
        frame[f"measured_{name}"] = data.stage_ms[r, c, k].astype(np.float64)
    frame["measured_total_ms"] = data.total_ms[r, c].astype(np.float64)
    return frame


def estimated_profiles(profiles, target_data, predictor):
    """`profiles` (source-GPU quality, the same train requests) with latency replaced by
    `predictor`'s estimate on the target (request's own input tokens, family-median output
    length: `predict_replay_latency`) and the budget reference by the family's median estimated
    full-configuration latency; the recorded residual factors are kept. A LUT fitted on it, or a
    guardrail built from it, is the source controller recalibrated to the target."""
    from ..latency.guardrail import predict_replay_latency

    predicted = predict_replay_latency(target_data, predictor)
    index = {r: i for i, r in enumerate(target_data.request_ids)}
    latency = predicted[[index[r] for r in profiles.request_ids]]
    reference = np.empty(len(latency))
    for f in np.unique(profiles.family_index):
        rows = profiles.family_index == f
        reference[rows] = np.median(latency[rows, -1])  # the full configuration is the grid's last
    return dataclasses.replace(profiles, latency_ms=latency, reference_ms=reference)


def source_estimator(stages_path: Path, preset: str = "molmoe-1b"):
    """The source GPU's stage estimator, fitted on its whole stage table (as E3 does before
    recalibrating; refitting here keeps this independent of saved estimator files' versions)."""
    from ..latency import StageLatencyEstimator
    from ..profiles.tables import read_parquet

    table, meta = read_parquet(stages_path)
    return StageLatencyEstimator.fit(table, metadata={"preset": preset, "device_name": meta.get("device_name"),
                                                      "fitted_on": Path(stages_path).name})


def recalibrated_predictor(source, calibration):
    """E3's per-stage affine recalibration of the `source` estimator from a calibration table."""
    from ..latency import recalibrate

    return recalibrate(source, calibration, "per_stage_affine", prefix="measured_")


def measured_calibration_points(validation_path: Path, n: int, seed: int):
    """`n` seeded rows of an end-to-end validation table measured on the target GPU."""
    from ..profiles.tables import read_parquet

    target, _ = read_parquet(validation_path)
    if not 2 <= n <= len(target):
        raise ValueError(f"recal n={n!r}; {Path(validation_path).name} has {len(target)} rows (allowed 2..{len(target)})")
    return target.iloc[np.sort(np.random.default_rng(seed).choice(len(target), size=n, replace=False))].reset_index(drop=True)


def gains(results: Mapping[str, dict], method: str, baselines: Sequence[str], fractions: Sequence[str]) -> dict:
    """`method` minus each baseline: retention and violation-rate deltas, mean and per fraction."""
    out = {}
    for b in baselines:
        entry = {"mean": {k: results[method]["mean"][k] - results[b]["mean"][k] for k in ("quality_retention", "violation_rate")}}
        for f in fractions:
            entry[f] = {k: results[method]["by_fraction"][f][k] - results[b]["by_fraction"][f][k] for k in ("quality_retention", "violation_rate")}
        out[b] = entry
    return out


def mask_policy_quality(data, frame, label: str) -> tuple[np.ndarray, np.ndarray]:
    """(quality [R, C] with the sub-grid's columns from policy `label` of an M5 frame, bool [C]
    sub-grid mask). Requests the frame lacks keep the shipped (importance) quality."""
    from ..config import Config

    quality = data.quality.copy()
    part = frame[frame["policy"] == label]
    row_of = {r: i for i, r in enumerate(data.request_ids)}
    sub = np.zeros(len(data.grid), bool)
    for (c, k, b), g in part.groupby(["crops", "top_k", "active_blocks"]):
        j = data.config_index(Config(int(c), int(k), int(b)))
        sub[j] = True
        rows = np.array([row_of[r] for r in g["request_id"]])
        quality[rows, j] = g["quality"].to_numpy(np.float32)
    return quality, sub


# ---------------------------------------------------------------------------- figures

def plot_from_results(results_dir: Path, figures_dir: Path | None = None) -> list[Path]:
    results_dir = Path(results_dir)
    figures = figures_path(results_dir, figures_dir)
    s = json.loads((results_dir / "e6_summary.json").read_text())
    plt = pyplot()
    written = []
    knobs = s["knobs"]
    controllers = list(knobs)
    fig, axes = plt.subplots(1, len(controllers) + 1, figsize=(5.2 * (len(controllers) + 1), 4.2))
    for ax, controller in zip(axes, controllers):
        for i, (subset, r) in enumerate(knobs[controller].items()):
            fr = sorted(r["by_fraction"], key=float)
            x = [r["by_fraction"][f]["latency_p95_ms"] for f in fr]
            y = [r["by_fraction"][f]["quality_retention"] for f in fr]
            ax.plot(x, y, marker="o", color=f"C{i}", lw=2.5 if subset == "all" else 1.2, label=subset)
        ax.set(xlabel="P95 latency (ms)", ylabel="quality retention", title=f"{controller}: knob subsets (points: budget fractions)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    ax = axes[-1]
    width = 0.8 / len(controllers)
    subsets = [k for k in knobs[controllers[0]] if k != "all"]
    for i, controller in enumerate(controllers):
        deltas = [s["knob_deltas"][controller][k]["mean"]["quality_retention"] for k in subsets]
        ax.bar(np.arange(len(subsets)) + i * width, deltas, width, label=controller)
    ax.set_xticks(np.arange(len(subsets)) + width * (len(controllers) - 1) / 2, subsets, rotation=30, fontsize=8)
    ax.axhline(0, color="k", lw=0.8)
    ax.set(ylabel="retention delta to all three knobs (mean over budgets)", title="knob ablation: delta to the full system")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, axis="y")
    fig.suptitle(f"E6: knob ablation (replay {s['latency_source']}, micro quality, held-out requests)")
    written.append(save_figure(fig, figures / "e6_knobs.png", 110))

    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    variants = s["switches"]
    fr = sorted(next(iter(variants.values()))["by_fraction"], key=float)
    for i, (name, r) in enumerate(variants.items()):
        axes[0].plot([float(f) for f in fr], [r["by_fraction"][f]["quality_retention"] for f in fr], marker="o", color=f"C{i}", label=name)
        axes[1].plot([float(f) for f in fr], [r["by_fraction"][f]["violation_rate"] for f in fr], marker="o", color=f"C{i}", label=name)
    axes[0].set(xlabel="budget fraction", ylabel="quality retention", title="guardrail and family input on/off")
    axes[1].set(xlabel="budget fraction", ylabel="violation rate")
    axes[0].legend(fontsize=7)
    for ax in axes:
        ax.grid(alpha=0.3)
    written.append(save_figure(fig, figures / "e6_switches.png", 110))

    system = s["depth_mask"].get("lut_on_m5_sub_grid")
    if system:
        fig, ax = plt.subplots(figsize=(7, 3.8))
        labels = list(system)
        fr = sorted(system[labels[0]]["by_fraction"], key=float)
        width = 0.8 / len(labels)
        for i, label in enumerate(labels):
            ax.bar(np.arange(len(fr)) + i * width, [system[label]["by_fraction"][f]["quality_retention"] for f in fr], width, label=label)
        ax.set_xticks(np.arange(len(fr)) + width * (len(labels) - 1) / 2, fr)
        ax.set(xlabel="budget fraction", ylabel="quality retention", ylim=(0.7, 1.02),
               title="E6: LUT on M5's sub-grid, per depth mask policy")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3, axis="y")
        written.append(save_figure(fig, figures / "e6_depth_mask.png", 110))

    port = s.get("portability_gpu")
    if port:
        fig, axes = plt.subplots(1, 2, figsize=(12, 4))
        settings = list(port["results"])
        methods = list(port["results"][settings[0]])
        width = 0.8 / len(settings)
        for i, setting in enumerate(settings):
            r = port["results"][setting]
            axes[0].bar(np.arange(len(methods)) + i * width, [r[m]["mean"]["quality_retention"] for m in methods], width, label=setting)
            axes[1].bar(np.arange(len(methods)) + i * width, [r[m]["mean"]["violation_rate"] for m in methods], width, label=setting)
        for ax, label in zip(axes, ("quality retention", "violation rate")):
            ax.set_xticks(np.arange(len(methods)) + width * (len(settings) - 1) / 2, methods, rotation=30, fontsize=8)
            ax.set_ylabel(f"{label} (mean over budgets)")
            ax.grid(alpha=0.3, axis="y")
        axes[0].set_ylim(0.8, 1.02)
        axes[1].legend(fontsize=7)
        fig.suptitle("E6: H100-trained controllers on MolmoE-1B H200 latency (guardrail as trained / recalibrated / from H200 profiles)")
        written.append(save_figure(fig, figures / "e6_portability_gpu.png", 110))
    return written


# ---------------------------------------------------------------------------- runs

def _evaluator(env, budget_fractions, eval_requests, seed):
    from agents.evaluation import evaluate

    return lambda controller: compact(evaluate(controller, env, budget_fractions, eval_requests, seed))


def knob_ablation(profiles, env, budget_fractions, epochs: int, seed: int, eval_requests=None) -> dict:
    """controller -> subset -> metrics (LUT and supervised restricted to each knob subset)."""
    from agents.lut import LUTController

    evaluate_ = _evaluator(env, budget_fractions, eval_requests, seed)
    out: dict = {"lut": {}, "supervised": {}}
    for name, knobs in KNOB_SUBSETS.items():
        restricted = restrict(profiles, allowed_configs(profiles.grid, knobs))
        out["lut"][name] = evaluate_(LUTController.fit(restricted, budget_fractions))
        out["supervised"][name] = evaluate_(train_supervised(restricted, budget_fractions, epochs, seed))
    return out


def knob_deltas(knobs: Mapping[str, Mapping[str, dict]]) -> dict:
    """Each subset minus `all`: retention, violation and P95 deltas (mean and per fraction)."""
    out = {}
    for controller, subsets in knobs.items():
        full = subsets["all"]
        out[controller] = {}
        for name, r in subsets.items():
            if name == "all":
                continue
            out[controller][name] = {
                "mean": {k: r["mean"][k] - full["mean"][k] for k in ("quality_retention", "violation_rate", "latency_p95_ms")},
                **{f: {k: r["by_fraction"][f][k] - full["by_fraction"][f][k] for k in ("quality_retention", "violation_rate", "latency_p95_ms")}
                   for f in r["by_fraction"]}}
    return out


def switch_ablation(profiles, env, budget_fractions, epochs: int, seed: int, eval_requests=None, supervised=None) -> dict:
    """Guardrail on/off (supervised) and family input on/off (LUT and supervised)."""
    from agents.lut import LUTController

    evaluate_ = _evaluator(env, budget_fractions, eval_requests, seed)
    supervised = supervised or train_supervised(profiles, budget_fractions, epochs, seed)
    out = {"supervised (guardrail on, family on)": evaluate_(supervised)}
    guardrail, supervised.guardrail = supervised.guardrail, None
    out["supervised (guardrail off)"] = evaluate_(supervised)
    supervised.guardrail = guardrail
    blind = family_blind(profiles)
    out["supervised (family off)"] = evaluate_(blind_controller(train_supervised(blind, budget_fractions, epochs, seed)))
    out["lut (family on)"] = evaluate_(LUTController.fit(profiles, budget_fractions))
    out["lut (family off)"] = evaluate_(blind_controller(LUTController.fit(blind, budget_fractions)))
    return out


def mask_policy_system(data, frame, budget_fractions, seed: int, eval_requests=None) -> dict:
    """policy -> metrics of the LUT restricted to the M5 sub-grid, trained and evaluated with that
    policy's quality (the same latency: the policy does not change it, M5)."""
    import gymnasium as gym

    from agents.lut import LUTController
    from agents.profiles import ProfileTables

    out = {}
    for label in sorted(frame["policy"].unique()):
        quality, sub = mask_policy_quality(data, frame, label)
        variant = dataclasses.replace(data, quality=quality)
        profiles = restrict(ProfileTables.from_replay(variant, "train"), sub)
        env = gym.make("FlexVLMReplay-v0", data=variant, split="heldout", episode_length=1, budget_fractions=tuple(budget_fractions))
        out[label] = _evaluator(env, budget_fractions, eval_requests, seed)(LUTController.fit(profiles, budget_fractions))
    return out


def portability_gpu(h100_profiles, h100_env, target_data, target_env, budget_fractions, epochs: int, seed: int,
                    source, validation_path: Path, recal_n: int, recal_draws: int, eval_requests=None,
                    supervised=None) -> dict:
    """The H100-trained LUT, supervised MLP and baselines on the target latency, with their latency
    knowledge (LUT table, guardrail) as trained on the H100; recalibrated from `recal_n` target
    points (mean over `recal_draws` draws), either replayed target points or measured end-to-end
    runs (`estimated_profiles`: the LUT refitted, the guardrail rebuilt; the MLP is not retrained);
    or built from the target's own profiles (the reference)."""
    from agents.guardrail import LatencyGuardrail
    from agents.lut import LUTController
    from agents.profiles import ProfileTables
    from baselines import make_baselines

    supervised = supervised or train_supervised(h100_profiles, budget_fractions, epochs, seed)
    trained_guardrail = supervised.guardrail

    def methods(env, latency_profiles):
        evaluate_ = _evaluator(env, budget_fractions, eval_requests, seed)
        guardrail = LatencyGuardrail.from_profiles(latency_profiles)
        supervised.guardrail = guardrail
        out = {"lut": evaluate_(LUTController.fit(latency_profiles, budget_fractions)), "supervised": evaluate_(supervised)}
        out.update({name: evaluate_(b) for name, b in make_baselines(h100_profiles, guardrail=guardrail).items()})
        return out

    results = {"h100 (trained here)": methods(h100_env, h100_profiles),
               # the estimator's own error, on the device it was fitted on (no portability involved)
               "h100, latency from the h100 estimator": methods(h100_env, estimated_profiles(h100_profiles, h100_env.unwrapped.data, source)),
               "h200, as trained on h100": methods(target_env, h100_profiles)}
    for label, points in (("replayed h200 points", lambda d: replay_calibration_points(target_data, recal_n, seed * 1000 + d)),
                          ("measured h200 runs", lambda d: measured_calibration_points(validation_path, recal_n, seed * 1000 + d))):
        draws = [methods(target_env, estimated_profiles(h100_profiles, target_data, recalibrated_predictor(source, points(d))))
                 for d in range(recal_draws)]
        results[f"h200, recalibrated from {recal_n} {label}"] = {m: average([d[m] for d in draws]) for m in draws[0]}
    results["h200, h200 profiles (reference)"] = methods(target_env, ProfileTables.from_replay(target_data, "train"))
    supervised.guardrail = trained_guardrail
    return results
