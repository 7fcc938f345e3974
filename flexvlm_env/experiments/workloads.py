"""M1: prefill-heavy vs decode-heavy workloads (../shared/EXPERIMENTS.md "M1 — Prefill-heavy vs decode-heavy workloads").

QA (`coco_2014_vqa`: short answers, ~2 output tokens) against captioning (`coco_caption`: ~14
tokens), on the same recorded data as E2 (`knob_coupling.load_pool`), per latency source:

- stage breakdown: each stage's share of the mean latency, at the full config and over the grid
  (sum over the 140 configs of the stage's mean / sum of the total's mean);
- latency distributions: per-request full-config latency (mean / median / P95 / P99 / std / CoV);
- frontiers side by side: (mean latency / full-config mean latency, mean quality / full-config quality);
- per-knob latency sensitivity: each knob at its smallest grid value with the other two at full,
  against the full config: latency ratio, saving (1 - ratio), elasticity d log latency / d log knob
  (log ratio / log(min value / max value)), mean d log latency per grid step, and per stage the
  stage's ratio and its share of the saving (stage full - stage reduced, over the full total);
  also `saving_avg_others`, the same reduction averaged (geometric mean of latency ratios) over
  every setting of the other two knobs.
  Computed for the two workloads of the pool and for all nine families of the shipped tables.

The expectation tested (per latency source): QA is prefill-sensitive (reducing crops saves more
than reducing depth or width), captioning decode-sensitive (reducing depth and width each save more
than reducing crops); and the weaker relative form (crops matter more for QA than for captioning,
depth and width more for captioning than for QA).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from ..config import Config
from ..profiles.replay import STAGE_COLUMNS, ReplayData
from .common import distribution_summary, figures_path, pyplot, save_figure
from .knob_coupling import KNOBS, SOURCE_LABELS, WORKLOADS, _title

SUMMARY_FILE = "m1_summary.json"
CONFIGS_FILE = "m1_configs.parquet"
REQUESTS_FILE = "m1_requests.parquet"
SENSITIVITY_FILE = "m1_sensitivity.parquet"
PREFILL_SIDE = ("preprocess_ms", "vision_encoder_ms", "projector_ms", "prefill_ms")  # everything before the first token


def _rows(data: ReplayData, family: str) -> np.ndarray:
    rows = np.asarray(data.families) == family
    if not rows.any():
        raise ValueError(f"family={family!r} has no requests in this data (families: {sorted(set(data.families))})")
    return rows


def stage_breakdown(data: ReplayData, family: str) -> dict:
    """Each stage's share of mean latency at the full config and pooled over the grid, and the
    prefill-side (everything before decode) and decode shares."""
    rows = _rows(data, family)
    s = data.stage_ms[rows].astype(float)  # [R, C, S]
    full = s[:, data.full_index].mean(axis=0)
    grid = s.mean(axis=0).sum(axis=0)
    out = {}
    for name, vec in (("full_config", full), ("grid", grid)):
        total = vec.sum()
        share = {stage: float(v / total) for stage, v in zip(STAGE_COLUMNS, vec)}
        out[name] = {"stage_share": share, "prefill_side_share": float(sum(share[k] for k in PREFILL_SIDE)),
                     "decode_share": share["decode_ms"]}
    out["full_config"]["stage_mean_ms"] = {stage: float(v) for stage, v in zip(STAGE_COLUMNS, full)}
    out["full_config"]["output_tokens_mean"] = float(data.output_tokens[rows, data.full_index].mean())
    return out


def knob_sensitivity(data: ReplayData, family: str, latency_source: str) -> pd.DataFrame:
    """Long table, one row per (knob, stage or 'total'): latency at the knob's smallest value with
    the other knobs at full vs the full config (module docstring)."""
    rows = _rows(data, family)
    grid = data.grid
    full_cfg = Config(crops=max(grid.crops), top_k=max(grid.top_k), active_blocks=max(grid.active_blocks))
    s = data.stage_ms[rows].astype(float)
    t = data.total_ms[rows].astype(float)
    full_j = data.config_index(full_cfg)
    total_full = t[:, full_j].mean()
    out = []
    for knob in KNOBS:
        values = getattr(grid, knob)
        path = [data.config_index(Config(**{**{k: getattr(full_cfg, k) for k in KNOBS}, knob: v})) for v in values]
        lat_path = t[:, path].mean(axis=0)
        ratio = lat_path[0] / total_full
        record = {"family": family, "latency_source": latency_source, "knob": knob, "min_value": int(values[0]),
                  "max_value": int(values[-1]), "n_requests": int(rows.sum())}
        # the same reduction at every setting of the other two knobs (geometric mean of the ratios):
        # less exposed to one config's measurement noise than the single pair at full
        config_means = t.mean(axis=0)
        axis = KNOBS.index(knob)
        by_knob = np.moveaxis(config_means.reshape(grid.shape), axis, 0)
        avg_ratio = float(np.exp(np.mean(np.log(by_knob[0] / by_knob[-1]))))
        out.append({**record, "stage": "total", "full_ms": total_full, "reduced_ms": lat_path[0], "ratio": ratio,
                    "saving_avg_others": 1 - avg_ratio,
                    "saving": 1 - ratio, "saving_share_of_total": 1 - ratio,
                    "elasticity": float(np.log(ratio) / np.log(values[0] / values[-1])),
                    "dlog_per_step": float(np.mean(np.diff(np.log(lat_path)))) if len(values) > 1 else 0.0})
        for k, stage in enumerate(STAGE_COLUMNS):
            full_stage, reduced_stage = s[:, full_j, k].mean(), s[:, path[0], k].mean()
            out.append({**record, "stage": stage, "full_ms": full_stage, "reduced_ms": reduced_stage,
                        "ratio": reduced_stage / full_stage if full_stage > 0 else np.nan,
                        "saving": 1 - reduced_stage / full_stage if full_stage > 0 else np.nan,
                        "saving_share_of_total": (full_stage - reduced_stage) / total_full,
                        "elasticity": np.nan, "dlog_per_step": np.nan, "saving_avg_others": np.nan})
    return pd.DataFrame(out)


def expectation(sensitivity: pd.DataFrame, qa: str, caption: str) -> dict:
    """The M1 expectation from the total-latency savings of one latency source (module docstring)."""
    tot = sensitivity[sensitivity["stage"] == "total"].set_index(["family", "knob"])["saving"]
    qa_s = {k: float(tot[(qa, k)]) for k in KNOBS}
    cap_s = {k: float(tot[(caption, k)]) for k in KNOBS}
    avg = sensitivity[sensitivity["stage"] == "total"].set_index(["family", "knob"])["saving_avg_others"]
    return {
        "saving_qa": qa_s, "saving_captioning": cap_s,
        "saving_avg_others_qa": {k: float(avg[(qa, k)]) for k in KNOBS},
        "saving_avg_others_captioning": {k: float(avg[(caption, k)]) for k in KNOBS},
        "qa_prefill_sensitive": bool(qa_s["crops"] > qa_s["active_blocks"] and qa_s["crops"] > qa_s["top_k"]),
        "captioning_decode_sensitive": bool(cap_s["active_blocks"] > cap_s["crops"] and cap_s["top_k"] > cap_s["crops"]),
        "captioning_depth_beats_crops": bool(cap_s["active_blocks"] > cap_s["crops"]),
        "captioning_width_beats_crops": bool(cap_s["top_k"] > cap_s["crops"]),
        "relative_crops_matter_more_for_qa": bool(qa_s["crops"] > cap_s["crops"]),
        "relative_depth_matters_more_for_captioning": bool(cap_s["active_blocks"] > qa_s["active_blocks"]),
        "relative_width_matters_more_for_captioning": bool(cap_s["top_k"] > qa_s["top_k"]),
    }


def request_latencies(data: ReplayData, family: str, latency_source: str) -> pd.DataFrame:
    """Per request: full-config total and stage times and output tokens (the distribution data)."""
    rows = _rows(data, family)
    j = data.full_index
    frame = pd.DataFrame({"workload": family, "latency_source": latency_source,
                          "request_id": np.asarray(data.request_ids)[rows],
                          "total_ms": data.total_ms[rows, j].astype(float),
                          "output_tokens": data.output_tokens[rows, j]})
    for k, stage in enumerate(STAGE_COLUMNS):
        frame[stage] = data.stage_ms[rows, j, k].astype(float)
    return frame


def latency_distribution(frame: pd.DataFrame) -> dict:
    return {"total_ms": distribution_summary(frame["total_ms"]),
            **{stage: distribution_summary(frame[stage]) for stage in ("prefill_ms", "decode_ms")}}


# ----------------------------------------------------------------------------- figures

STAGE_COLOURS = {"preprocess_ms": "#bbbbbb", "vision_encoder_ms": "#4c72b0", "projector_ms": "#8172b2",
                 "prefill_ms": "#55a868", "decode_ms": "#c44e52"}


def plot_from_results(results_dir: Path, figures_dir: Path | None = None) -> list[Path]:
    """Rebuild M1's figures from results/m1_summary.json and the m1_*.parquet files."""
    results_dir = Path(results_dir)
    summary = json.loads((results_dir / SUMMARY_FILE).read_text())
    configs = pd.read_parquet(results_dir / CONFIGS_FILE)
    requests = pd.read_parquet(results_dir / REQUESTS_FILE)
    sensitivity = pd.read_parquet(results_dir / SENSITIVITY_FILE)
    figures = figures_path(results_dir, figures_dir)
    return [breakdown_figure(summary, figures / "m1_stage_breakdown.png"),
            distribution_figure(requests, figures / "m1_latency_distributions.png"),
            frontier_figure(configs, figures / "m1_frontiers.png"),
            sensitivity_figure(sensitivity, summary, figures / "m1_knob_sensitivity.png"),
            families_figure(sensitivity, figures / "m1_sensitivity_families.png")]


def _order(names, preferred):
    return [n for n in preferred if n in names] + sorted(n for n in names if n not in preferred)


def breakdown_figure(summary: dict, path: Path) -> Path:
    plt = pyplot()
    breakdown = summary["stage_breakdown"]
    keys = list(breakdown)
    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    for ax, which in zip(axes, ("full_config", "grid")):
        bottom = np.zeros(len(keys))
        for stage in STAGE_COLUMNS:
            vals = np.array([breakdown[k][which]["stage_share"][stage] for k in keys])
            ax.bar(range(len(keys)), vals, bottom=bottom, color=STAGE_COLOURS[stage], label=stage.replace("_ms", ""))
            bottom += vals
        ax.set_xticks(range(len(keys)))
        ax.set_xticklabels([k.replace("|", "\n").replace("coco_2014_", "").replace("coco_", "").replace("-h100", "")
                            .replace("-measured", "\n(measured)") for k in keys], fontsize=7)
        ax.set_ylabel("share of mean latency")
        ax.set_title("full config (12, 8, 16)" if which == "full_config" else "pooled over the 140-config grid", fontsize=9)
    axes[1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1))
    fig.suptitle("M1: stage breakdown, QA (vqa) vs captioning (caption), per latency source", fontsize=10)
    return save_figure(fig, path, 130)


def distribution_figure(requests: pd.DataFrame, path: Path) -> Path:
    plt = pyplot()
    sources = _order(set(requests["latency_source"]), list(SOURCE_LABELS))
    fig, axes = plt.subplots(1, len(sources), figsize=(5.5 * len(sources), 3.8), squeeze=False)
    for ax, source in zip(axes[0], sources):
        sub = requests[requests["latency_source"] == source]
        bins = np.linspace(sub["total_ms"].min(), sub["total_ms"].max(), 50)
        for workload, colour in zip(_order(set(sub["workload"]), list(WORKLOADS)), ("tab:blue", "tab:orange")):
            v = sub[sub["workload"] == workload]["total_ms"]
            ax.hist(v, bins=bins, alpha=0.6, color=colour, label=f"{_title(workload)}: P50 {v.median():.1f}, P95 {np.percentile(v, 95):.1f} ms")
        ax.set_xlabel("full-config latency per request (ms)")
        ax.set_ylabel("requests")
        ax.set_title(SOURCE_LABELS.get(source, source), fontsize=9)
        ax.legend(fontsize=7)
    fig.suptitle("M1: latency distributions at the full config", fontsize=10)
    return save_figure(fig, path, 130)


def frontier_figure(configs: pd.DataFrame, path: Path) -> Path:
    from .common import pareto_frontier

    plt = pyplot()
    sources = _order(set(configs["latency_source"]), list(SOURCE_LABELS))
    fig, axes = plt.subplots(1, len(sources), figsize=(5.5 * len(sources), 4), squeeze=False)
    for ax, source in zip(axes[0], sources):
        for workload, colour in zip(_order(set(configs["workload"]), list(WORKLOADS)), ("tab:blue", "tab:orange")):
            sub = configs[(configs["latency_source"] == source) & (configs["workload"] == workload)]
            full = sub[(sub["crops"] == sub["crops"].max()) & (sub["top_k"] == sub["top_k"].max())
                       & (sub["active_blocks"] == sub["active_blocks"].max())].iloc[0]
            x, y = sub["latency_mean_ms"] / full["latency_mean_ms"], sub["quality"] / full["quality"]
            ax.scatter(x, y, s=7, alpha=0.3, color=colour)
            idx = pareto_frontier(x.to_numpy(), y.to_numpy())
            ax.step(x.to_numpy()[idx], y.to_numpy()[idx], where="post", color=colour,
                    label=f"{_title(workload)} (full: {full['latency_mean_ms']:.1f} ms, q {full['quality']:.2f})")
        ax.axhline(1, color="k", lw=0.6, ls=":")
        ax.set_xlabel("mean latency / full-config mean latency")
        ax.set_ylabel("quality / full-config quality")
        ax.set_title(SOURCE_LABELS.get(source, source), fontsize=9)
        ax.legend(fontsize=7, loc="lower right")
        ax.grid(alpha=0.3)
    fig.suptitle("M1: frontiers side by side (normalized per workload)", fontsize=10)
    return save_figure(fig, path, 130)


def sensitivity_figure(sensitivity: pd.DataFrame, summary: dict, path: Path) -> Path:
    plt = pyplot()
    workloads = [w for w in WORKLOADS if w in set(summary["workloads"])]
    sub = sensitivity[sensitivity["family"].isin(workloads) & (sensitivity["scope"] == "pool")]
    sources = _order(set(sub["latency_source"]), list(SOURCE_LABELS))
    fig, axes = plt.subplots(1, len(sources), figsize=(6 * len(sources), 4.2), squeeze=False)
    for ax, source in zip(axes[0], sources):
        x, labels = 0, []
        for workload in workloads:
            for knob in KNOBS:
                rows = sub[(sub["latency_source"] == source) & (sub["family"] == workload) & (sub["knob"] == knob)]
                bottom = 0.0
                for stage in STAGE_COLUMNS:
                    v = float(rows[rows["stage"] == stage]["saving_share_of_total"].iloc[0])
                    ax.bar(x, v, bottom=bottom if v >= 0 else 0, color=STAGE_COLOURS[stage],
                           label=stage.replace("_ms", "") if x == 0 else None)
                    bottom += max(v, 0)
                total = float(rows[rows["stage"] == "total"]["saving"].iloc[0])
                ax.text(x, max(bottom, total) + 0.01, f"{100 * total:.0f}%", ha="center", fontsize=7)
                labels.append(f"{WORKLOADS[workload]}\n{knob}\n{int(rows['max_value'].iloc[0])}->{int(rows['min_value'].iloc[0])}")
                x += 1
            x += 0.5
        positions = [i + 0.5 * (i // len(KNOBS)) for i in range(len(labels))]
        ax.set_xticks(positions)
        ax.set_xticklabels(labels, fontsize=7)
        ax.set_ylabel("latency saved (share of full-config latency)")
        ax.set_title(SOURCE_LABELS.get(source, source), fontsize=9)
        ax.legend(fontsize=7)
    fig.suptitle("M1: per-knob latency sensitivity (knob at its smallest value, others at full), by stage", fontsize=10)
    return save_figure(fig, path, 130)


def families_figure(sensitivity: pd.DataFrame, path: Path) -> Path:
    plt = pyplot()
    sub = sensitivity[(sensitivity["stage"] == "total") & (sensitivity["scope"] == "nine_families")]
    sources = _order(set(sub["latency_source"]), list(SOURCE_LABELS))
    fig, axes = plt.subplots(1, len(sources), figsize=(4.2 * len(sources), 4.4), squeeze=False)
    for ax, source in zip(axes[0], sources):
        part = sub[sub["latency_source"] == source].pivot(index="family", columns="knob", values="saving")[list(KNOBS)]
        im = ax.imshow(part.to_numpy(), cmap="viridis", vmin=0, vmax=max(0.01, float(sub["saving"].max())), aspect="auto")
        for (i, j), v in np.ndenumerate(part.to_numpy()):
            ax.text(j, i, f"{100 * v:.0f}%", ha="center", va="center", fontsize=7, color="w" if v < 0.5 * sub["saving"].max() else "k")
        ax.set_xticks(range(len(KNOBS)))
        ax.set_xticklabels(["crops", "top_k", "blocks"], fontsize=8)
        ax.set_yticks(range(len(part)))
        ax.set_yticklabels(part.index, fontsize=7)
        ax.set_title(SOURCE_LABELS.get(source, source), fontsize=9)
        fig.colorbar(im, ax=ax, shrink=0.7, label="latency saved")
    fig.suptitle("M1: latency saved by each knob at its smallest value (others at full), all nine families", fontsize=10)
    return save_figure(fig, path, 130)
