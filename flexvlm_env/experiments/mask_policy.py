"""M5: depth mask policy (../shared/EXPERIMENTS.md "M5 — Depth mask policy").

At a reduced `active_blocks`, *which* blocks run is the mask policy (`Config.mask_policy`):
`importance` (the ranking shipped with the weights), `prefix` (the first blocks) or `random` (a
seeded random order; two seeds here). This module compares them on the same requests and configs:

- quality vs blocks: mean quality of every (request, config) of a sub-grid (crops x top_k) at each
  active-block count, per policy, from quality tables answered by `micro` (the shipped table is the
  importance policy; the others come from `flexvlm-profile quality --mask-policy ...` runs over the
  same requests, or, in the quick mode, from a handful of requests answered here);
- the gap importance - prefix and importance - random at every block count, with a 95% interval
  over requests (paired: the same requests and configs under both policies);
- latency vs blocks: the policy only changes which blocks are skipped, and a skipped block is an
  identity, so latency should not depend on it. Measured here (`measure_latency`: batch 1, forced
  output length, warm-up runs discarded, policies interleaved so drift hits them alike), reported
  as the max relative difference of the median total latency across policies at each block count;
- quality-latency frontier per policy: the sub-grid configs' latency from a replay latency source
  (the composed MolmoE-1B H100 latency; the same for every policy, which the measurement above
  supports) against each policy's mean quality.

`plot_from_results(results_dir)` rebuilds the figures from `m5_summary.json` and `m5_per_config.json`.
"""
from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from .common import distribution_summary, figures_path, pareto_frontier, pyplot, save_figure

# label -> (Config.mask_policy, Config.mask_seed); the device tables' file suffixes use the labels
POLICIES: dict[str, tuple[str, int]] = {"importance": ("importance", 0), "prefix": ("prefix", 0),
                                        "random0": ("random", 0), "random1": ("random", 1)}
KEY = ["request_id", "crops", "top_k", "active_blocks"]


def device_table_path(directory: Path, label: str, split: str = "val") -> Path:
    """Where the lead's GPU sweep writes the quality table of policy `label` (not importance)."""
    return Path(directory) / f"micro_quality_{split}_mask_{label}.parquet"


def load_quality_tables(shipped: Path, directory: Path, labels: Sequence[str] = tuple(POLICIES)) -> pd.DataFrame:
    """One frame (KEY, family, quality, output_tokens, policy) over the (request, config) keys that
    every policy's table holds: the shipped table is `importance`, the others are read from
    `directory` (`device_table_path`). A missing table is an error naming the file."""
    from ..profiles.tables import read_parquet

    frames = {}
    for label in labels:
        path = Path(shipped) if label == "importance" else device_table_path(directory, label)
        if not path.exists():
            raise FileNotFoundError(f"quality table of mask policy {label!r} not found: {path}")
        frame, _ = read_parquet(path)
        frames[label] = frame[[*KEY, "family", "quality", "output_tokens"]]
    common = None
    for frame in frames.values():
        keys = pd.MultiIndex.from_frame(frame[KEY])
        common = keys if common is None else common.intersection(keys)
    if common is None or len(common) == 0:
        raise ValueError(f"the quality tables of {list(labels)} share no (request, config) key")
    out = []
    for label, frame in frames.items():
        keep = pd.MultiIndex.from_frame(frame[KEY]).isin(common)
        out.append(frame[keep].assign(policy=label))
    return pd.concat(out, ignore_index=True)


def answer_quality_table(vlm, samples, configs: Sequence, labels: Sequence[str] = tuple(POLICIES),
                         batch_size: int = 64) -> pd.DataFrame:
    """The same frame as `load_quality_tables`, answered here (greedy, batched:
    `flexvlm_env.evaluation.QualityEvaluator`, as the profile sweep does) for `samples` at every
    (crops, top_k, active_blocks) of `configs` under each policy."""
    from ..config import Config
    from ..evaluation import QualityEvaluator
    from ..metrics import score

    evaluator = QualityEvaluator(vlm, samples, batch_size=batch_size)
    rows = []
    for base in sorted(configs, key=lambda c: (c.crops, c.top_k, c.active_blocks)):
        for label in labels:
            policy, seed = POLICIES[label]
            config = Config(crops=base.crops, top_k=base.top_k, active_blocks=base.active_blocks, mask_policy=policy, mask_seed=seed)
            for sample, result in zip(samples, evaluator.results(config)):
                rows.append({"request_id": sample.request_id, "crops": config.crops, "top_k": config.top_k,
                             "active_blocks": config.active_blocks, "family": sample.family,
                             "quality": float(score(sample, result.text)), "output_tokens": result.tokens.output,
                             "policy": label})
    return pd.DataFrame(rows)


def paired_gap(frame: pd.DataFrame, better: str, other: Sequence[str]) -> dict:
    """Per active-block count: mean quality of `better` minus the mean over the `other` policies,
    on the same (request, config) keys; the 95% interval is over requests (each request's mean
    difference across the sub-grid's configs at that block count)."""
    wide = frame.pivot_table(index=KEY, columns="policy", values="quality")
    diff = wide[better] - wide[list(other)].mean(axis=1)
    out = {}
    for blocks, part in diff.groupby(level="active_blocks"):
        per_request = part.groupby(level="request_id").mean().to_numpy()
        half = 1.96 * per_request.std(ddof=1) / np.sqrt(len(per_request)) if len(per_request) > 1 else float("nan")
        out[str(int(blocks))] = {"gap": float(part.mean()), "ci95_low": float(part.mean() - half),
                                 "ci95_high": float(part.mean() + half), "n_requests": int(len(per_request)),
                                 "share_of_requests_better": float(np.mean(per_request > 0)),
                                 "share_of_requests_worse": float(np.mean(per_request < 0))}
    return out


def quality_by_blocks(frame: pd.DataFrame) -> dict:
    """policy -> active_blocks -> mean quality over the requests and sub-grid configs."""
    table = frame.groupby(["policy", "active_blocks"])["quality"].mean()
    return {label: {str(int(b)): float(q) for b, q in table[label].items()} for label in frame["policy"].unique()}


def per_config(frame: pd.DataFrame, latency_ms: dict[tuple[int, int, int], float]) -> list[dict]:
    """Rows (policy, crops, top_k, active_blocks, mean quality, replay latency) for the frontier."""
    means = frame.groupby(["policy", "crops", "top_k", "active_blocks"])["quality"].agg(["mean", "count"]).reset_index()
    return [{"policy": r.policy, "crops": int(r.crops), "top_k": int(r.top_k), "active_blocks": int(r.active_blocks),
             "quality": float(r["mean"]), "n": int(r["count"]),
             "latency_ms": float(latency_ms[(int(r.crops), int(r.top_k), int(r.active_blocks))])}
            for _, r in means.iterrows()]


def replay_config_latency(latency: str, configs: Sequence[tuple[int, int, int]], request_ids: Sequence[str] | None = None) -> dict:
    """(crops, top_k, active_blocks) -> mean recorded latency (ms) of the replay source over
    `request_ids` (default: the whole pool)."""
    from ..config import Config
    from ..profiles import load_replay_data

    data = load_replay_data(latency=latency)
    rows = np.arange(data.n_requests)
    if request_ids is not None:
        index = {r: i for i, r in enumerate(data.request_ids)}
        rows = np.array([index[r] for r in request_ids if r in index]) if any(r in index for r in request_ids) else rows
    return {c: float(data.total_ms[rows, data.config_index(Config(*c))].mean()) for c in configs}


def frontier_summary(rows: list[dict]) -> dict:
    """Per policy: the frontier configs and the mean frontier quality at the other policies'
    latencies (the union of all points' latencies)."""
    from .common import frontier_quality_at

    frame = pd.DataFrame(rows)
    grid = np.sort(frame["latency_ms"].unique())
    out = {}
    for label, part in frame.groupby("policy"):
        lat, q = part["latency_ms"].to_numpy(), part["quality"].to_numpy()
        idx = pareto_frontier(lat, q)
        at = frontier_quality_at(lat, q, grid)
        out[label] = {"frontier": [[int(part.iloc[i].crops), int(part.iloc[i].top_k), int(part.iloc[i].active_blocks)] for i in idx],
                      "mean_frontier_quality_over_latencies": float(np.nanmean(at))}
    return out


def measure_latency(vlm, samples, blocks: Sequence[int], labels: Sequence[str] = tuple(POLICIES), crops: int = 1,
                    top_k: int = 8, output_tokens: int = 16, warmup: int = 2, repeats: int = 5,
                    deadline_s: float | None = None) -> list[dict]:
    """Timed batch-1 runs: for each repeat, request and block count, every policy once (in that
    order, so slow drift hits the policies alike), after `warmup` untimed rounds. Each record has
    the policy, blocks, request and the stage latencies (ms). Stops between rounds at `deadline_s`."""
    from ..config import Config

    records = []
    for round_ in range(warmup + repeats):
        if deadline_s is not None and time.time() > deadline_s and round_ > warmup:
            break
        for sample in samples:
            for b in blocks:
                for label in labels:
                    policy, seed = POLICIES[label]
                    config = Config(crops=crops, top_k=top_k, active_blocks=b, mask_policy=policy, mask_seed=seed)
                    result = vlm.generate(sample.image, sample.prompt, config=config, max_new_tokens=output_tokens, ignore_eos=True)
                    if round_ < warmup:
                        continue
                    lat = result.latency
                    records.append({"policy": label, "active_blocks": b, "request_id": sample.request_id, "round": round_ - warmup,
                                    "plan": list(result.plan), "total_ms": lat.total_ms, "prefill_ms": lat.prefill_ms,
                                    "decode_ms": lat.decode_ms, "vision_encoder_ms": lat.vision_encoder_ms})
    return records


def latency_summary(records: list[dict]) -> dict:
    """Per block count: per-policy statistics of total latency (`distribution_summary`), the max
    relative difference of the policies' medians ((max - min) / min), and the paired one: each
    policy's median over (request, round) of its latency over the group's mean latency (the
    policies of one group ran back to back, so load that comes and goes on a shared machine
    cancels), max |ratio - 1| over policies."""
    frame = pd.DataFrame(records)
    out = {}
    for b, part in frame.groupby("active_blocks"):
        stats = {label: distribution_summary(p["total_ms"].to_numpy()) for label, p in part.groupby("policy")}
        medians = np.array([s["median"] for s in stats.values()])
        group_mean = part.groupby(["request_id", "round"])["total_ms"].transform("mean")
        ratio = (part["total_ms"] / group_mean).groupby(part["policy"]).median()
        out[str(int(b))] = {"per_policy": stats, "max_rel_diff_median": float((medians.max() - medians.min()) / medians.min()),
                            "paired_ratio_median": {k: float(v) for k, v in ratio.items()},
                            "max_rel_diff_paired": float(np.abs(ratio.to_numpy() - 1).max()),
                            "blocks_run": {label: p["plan"].iloc[0] for label, p in part.groupby("policy")}}
    return out


# ---------------------------------------------------------------------------- figures

COLORS = {"importance": "C0", "prefix": "C1", "random0": "C2", "random1": "C3"}


def plot_from_results(results_dir: Path, figures_dir: Path | None = None) -> list[Path]:
    results_dir = Path(results_dir)
    summary = json.loads((results_dir / "m5_summary.json").read_text())
    rows = json.loads((results_dir / "m5_per_config.json").read_text())["rows"]
    figures = figures_path(results_dir, figures_dir)
    plt = pyplot()
    written = []

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for label, by_b in summary["quality_by_blocks"].items():
        b = sorted(int(k) for k in by_b)
        axes[0].plot(b, [by_b[str(k)] for k in b], marker="o", color=COLORS.get(label), label=label)
    axes[0].set(xlabel="active blocks", ylabel="mean quality", title="quality vs blocks")
    axes[0].legend(fontsize=8)
    for name, lat in summary["latency"].items():
        for label in POLICIES:
            b = sorted(int(k) for k in lat["by_blocks"] if label in lat["by_blocks"][k]["per_policy"])
            if b:
                axes[1].plot(b, [lat["by_blocks"][str(k)]["per_policy"][label]["median"] for k in b], marker="o",
                             color=COLORS.get(label), ls="-" if "cpu" in name else "--", label=f"{label} ({lat['device']})")
    axes[1].set(xlabel="active blocks", ylabel="median total latency (ms)", title="latency vs blocks (micro, measured)")
    axes[1].legend(fontsize=6)
    frame = pd.DataFrame(rows)
    for label, part in frame.groupby("policy"):
        lat, q = part["latency_ms"].to_numpy(), part["quality"].to_numpy()
        axes[2].scatter(lat, q, s=10, alpha=0.4, color=COLORS.get(label))
        idx = pareto_frontier(lat, q)
        axes[2].step(lat[idx], q[idx], where="post", color=COLORS.get(label), label=label)
    axes[2].set(xlabel=f"mean latency (ms, replay {summary['frontier_latency_source']})", ylabel="mean quality",
                title="quality-latency frontier")
    axes[2].legend(fontsize=8)
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.suptitle("M5: depth mask policy (micro quality)")
    fig.tight_layout()
    written.append(save_figure(fig, figures / "m5_mask_policy.png", 110))

    fig, ax = plt.subplots(figsize=(7, 3.8))
    width = 0.38
    for i, (name, gaps) in enumerate(summary["gaps"].items()):
        b = sorted(int(k) for k in gaps)
        g = np.array([gaps[str(k)]["gap"] for k in b])
        err = np.array([[gaps[str(k)]["gap"] - gaps[str(k)]["ci95_low"], gaps[str(k)]["ci95_high"] - gaps[str(k)]["gap"]] for k in b]).T
        ax.bar(np.arange(len(b)) + (i - 0.5) * width, g, width, yerr=err, capsize=3, label=name)
    ax.set_xticks(np.arange(len(b)), [str(k) for k in b])
    ax.axhline(0, color="k", lw=0.8)
    ax.set(xlabel="active blocks", ylabel="quality gap (95% CI over requests)", title="M5: importance mask vs prefix / random")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    written.append(save_figure(fig, figures / "m5_gap.png", 110))
    return written
