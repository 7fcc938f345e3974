"""Issue [lora]: does a cheap LoRA fine-tune under sampled configurations make a checkpoint that was
trained at one configuration degrade gracefully, as training elastically from scratch does?

Three kinds of model answer the same procedural val requests over the knob grid:
- **full-config-only**: `micro` trained with `scripts/train_micro.py --no-elastic` (every batch at
  (12, 8, 16)), the stand-in for a real checkpoint trained at one configuration;
- **LoRA knob-robust**: that model, frozen, plus adapters from `scripts/finetune_lora.py`
  (configurations drawn per batch, importance block plans);
- **elastic**: the shipped `micro`, trained from scratch with drawn configurations.

Quality per configuration is the mean over the nine families of each family's mean score, over
the configurations every compared model has complete (all requests answered). Headline numbers:
- `gap_recovered` = sum over reduced configs of (LoRA - full-only) / sum of (elastic - full-only):
  the share of the elastic model's advantage at reduced configurations that the adapter recovers
  (a ratio of grid averages, so configs where the two bases tie cannot blow it up);
- `full_config_delta` = LoRA - full-only at the full configuration (the adapter must not cost
  quality where the base was trained).
The frontier's latency is the first micro's `micro-h100` composition (its H100 stage table, archived in results/device_tables/)
of each model's own answer lengths: a merged adapter leaves the architecture, so only the number
of generated tokens can move latency between models.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import pandas as pd

from .common import figures_path, pareto_frontier, pyplot, save_figure

KEY = ["request_id", "crops", "top_k", "active_blocks"]
KNOBS = KEY[1:]
FULL = (12, 8, 16)


def read_sources(sources: Sequence[str | Path]) -> list[pd.DataFrame]:
    """The quality tables (Parquet files or table directories), each with its metadata in attrs."""
    from ..profiles.tables import read_table

    if not sources:
        raise ValueError("load_quality needs at least one table")
    return [read_table(source) for source in sources]


def merge_sources(frames: Sequence[pd.DataFrame], sources: Sequence[str | Path]) -> tuple[pd.DataFrame, list[dict]]:
    """`load_quality` on tables already read (`read_sources`)."""
    provenance = []
    for source, frame in zip(sources, frames):
        meta = frame.attrs.get("metadata", {})
        entry = {
            "table": str(source), "rows": len(frame), "device_name": meta.get("device_name"), "dtype": meta.get("dtype"),
            "weights_sha256": meta.get("weights_sha256"), "adapter_sha256": meta.get("adapter_sha256"),
            "configs": int(frame.groupby(KNOBS).ngroups) if len(frame) else 0,
            "mask_policy": meta.get("protocol", {}).get("mask_policy", "importance"),
        }
        if meta.get("merged_from"):  # a packed table: the runs it was packed from
            entry["merged_from"] = meta["merged_from"]
        provenance.append(entry)
    for name in ("weights_sha256", "adapter_sha256"):
        values = {p[name] for p in provenance}
        if len(values) > 1:
            raise ValueError(f"the tables {[p['table'] for p in provenance]} answer with different {name}s {sorted(map(str, values))}: not one model")
    merged = pd.concat(frames, ignore_index=True).drop_duplicates(subset=KEY, keep="first")
    merged.attrs = {}
    return merged, provenance


def load_quality(sources: Sequence[str | Path]) -> tuple[pd.DataFrame, list[dict]]:
    """One model's quality rows from one or more tables (Parquet files or table directories), the
    first source winning where keys repeat; and each source's provenance (with `merged_from` for a
    packed table). Sources must be answers of the same weights and adapter (their
    `weights_sha256` / `adapter_sha256` agree)."""
    return merge_sources(read_sources(sources), sources)


def config_quality(frame: pd.DataFrame) -> pd.DataFrame:
    """Per configuration answered for every request of the pool: mean quality (mean over
    families of the family means), each family's mean, and the request count; incomplete
    configurations are dropped (a mean over a different request set would not compare)."""
    n_requests = frame["request_id"].nunique()
    counts = frame.groupby(KNOBS)["request_id"].nunique()
    complete = counts[counts == n_requests].index
    kept = frame.set_index(KNOBS).loc[complete].reset_index()
    per_family = kept.groupby(KNOBS + ["family"])["quality"].mean().unstack("family")
    out = per_family.mean(axis=1).rename("mean_quality").to_frame()
    out["n_requests"] = n_requests
    return out.join(per_family.add_prefix("family/")).reset_index()


def composed_latency_ms(frame: pd.DataFrame, requests: pd.DataFrame, stages: pd.DataFrame, preset: str = "micro") -> np.ndarray:
    """End-to-end latency (ms) of every row of a quality table, composed from a stage table with
    the row's own output length (`output_tokens`), as the replay environment composes it."""
    from ..profiles.compose import StageModel

    model = StageModel.fit(stages)
    inputs = requests.drop_duplicates(["request_id", "crops"]).set_index(["request_id", "crops"])[f"{preset}/input_tokens"]
    out = np.empty(len(frame))
    for (crops, top_k, blocks), rows in frame.groupby(KNOBS).indices.items():
        part = frame.iloc[rows]
        tokens = inputs.loc[list(zip(part["request_id"], part["crops"]))].to_numpy()
        out[rows] = model.compose(int(crops), int(top_k), int(blocks), tokens, part["output_tokens"].to_numpy()).sum(axis=1)
    return out


def config_latency(frame: pd.DataFrame, latency_ms: np.ndarray) -> pd.DataFrame:
    return frame.assign(latency_ms=latency_ms).groupby(KNOBS)["latency_ms"].mean().rename("latency_ms_mean").reset_index()


def compare(configs: Mapping[str, pd.DataFrame], base: str, reference: str, adapted: Sequence[str]) -> dict:
    """Headline numbers of each adapted model over the configurations it, `base` and `reference`
    all have (module docstring); models answered on different subsets are each compared on theirs.

    configs: model name -> `config_quality` frame. Returns {"full": {model: quality at FULL},
    "per_model": {name: gap_recovered, full_config_delta, the mean gain and gap over its reduced
    configs, the share of them where it improves / reaches the reference, and their count}}."""
    for name in (base, reference, *adapted):
        if name not in configs:
            raise ValueError(f"model {name!r} has no quality table; have {sorted(configs)}")
    keyed = {name: frame.set_index(KNOBS)["mean_quality"] for name, frame in configs.items()}
    for name, series in keyed.items():
        if FULL not in series.index:
            raise ValueError(f"model {name!r} has not answered every request at the full configuration {FULL}")
    out = {"full": {name: float(s.loc[FULL]) for name, s in keyed.items()}, "per_model": {}}
    for name in adapted:
        reduced = sorted((set(keyed[base].index) & set(keyed[reference].index) & set(keyed[name].index)) - {FULL})
        if not reduced:
            raise ValueError(f"model {name!r} shares no reduced configuration with {base!r} and {reference!r}")
        q_base, q_ref, q = keyed[base].loc[reduced], keyed[reference].loc[reduced], keyed[name].loc[reduced]
        gap, gain = q_ref - q_base, q - q_base
        out["per_model"][name] = {
            "reduced_configs": len(reduced),
            "gap_recovered": float(gain.sum() / gap.sum()) if gap.sum() > 0 else float("nan"),
            "full_config_delta": float(keyed[name].loc[FULL] - keyed[base].loc[FULL]),
            "gain_mean": float(gain.mean()), "gap_mean": float(gap.mean()),
            "reduced_mean": {base: float(q_base.mean()), reference: float(q_ref.mean()), name: float(q.mean())},
            "improved_config_fraction": float((gain > 0).mean()),
            "reaches_reference_fraction": float((q >= q_ref).mean()),
        }
    return out


def select_variant(candidates: Mapping[str, pd.DataFrame], base: pd.DataFrame, max_full_drop: float = 0.005) -> dict:
    """Which adapter the bars are read on, chosen on a selection pool of requests (another
    `--task-seed` of the val split), so that picking among variants does not fit the reported
    pool: the highest mean quality over the pool's configurations among the candidates whose
    full-configuration quality is at most `max_full_drop` below the base's; if none is, the one
    with the smallest drop.

    candidates: name -> raw quality rows of the selection pool (every candidate on the same
    configurations, which include FULL); base: the base's rows, at least at FULL."""
    if not candidates:
        raise ValueError("select_variant needs at least one candidate")
    if not max_full_drop >= 0:
        raise ValueError(f"max_full_drop={max_full_drop} must be >= 0")
    base_full = config_quality(base).set_index(KNOBS)["mean_quality"]
    if FULL not in base_full.index:
        raise ValueError(f"the base has not answered every selection request at the full configuration {FULL}")
    scores, grids = {}, set()
    for name, frame in candidates.items():
        q = config_quality(frame).set_index(KNOBS)["mean_quality"]
        if FULL not in q.index:
            raise ValueError(f"candidate {name!r} has not answered every selection request at the full configuration {FULL}")
        grids.add(tuple(sorted(q.index)))
        scores[name] = {"full_config_delta": float(q.loc[FULL] - base_full.loc[FULL]), "mean_quality": float(q.mean()),
                        "configs": len(q)}
    if len(grids) > 1:
        raise ValueError(f"the candidates answered different configurations: {sorted(map(len, grids))} configs; compare like with like")
    within = [name for name, s in scores.items() if s["full_config_delta"] >= -max_full_drop]
    if within:
        selected = max(within, key=lambda name: scores[name]["mean_quality"])
    else:
        selected = max(scores, key=lambda name: scores[name]["full_config_delta"])
    return {"selected": selected, "rule": f"highest mean quality among full_config_delta >= -{max_full_drop} (else the smallest drop)",
            "base_full_quality": float(base_full.loc[FULL]), "candidates": scores}


def full_config_paired(frame: pd.DataFrame, base: pd.DataFrame) -> dict:
    """A model against the base at the full configuration, request by request (raw quality rows
    of the same pool): the mean quality change with its paired standard error, and the share of
    answers identical to the base's. With equal requests per family (the tables' pools) the mean
    change equals the family-balanced `full_config_delta`."""
    def at_full(rows: pd.DataFrame) -> pd.DataFrame:
        return rows[(rows["crops"] == FULL[0]) & (rows["top_k"] == FULL[1]) & (rows["active_blocks"] == FULL[2])].set_index("request_id")

    mine, theirs = at_full(frame), at_full(base)
    shared = mine.index.intersection(theirs.index)
    if len(shared) < 2:
        raise ValueError(f"the model and the base share {len(shared)} requests at the full configuration {FULL}; need >= 2")
    delta = mine.loc[shared, "quality"] - theirs.loc[shared, "quality"]
    return {"requests": int(len(shared)), "delta_mean": float(delta.mean()),
            "delta_se": float(delta.std(ddof=1) / np.sqrt(len(shared))),
            "identical_answers": float((mine.loc[shared, "answer"] == theirs.loc[shared, "answer"]).mean())}


def sweeps(configs: Mapping[str, pd.DataFrame]) -> dict:
    """Each knob swept with the other two at full, per model (the configurations present)."""
    out = {}
    for name, frame in configs.items():
        s = frame.set_index(KNOBS)["mean_quality"]
        out[name] = {}
        for i, knob in enumerate(KNOBS):
            rows = [c for c in s.index if all(c[j] == FULL[j] for j in range(3) if j != i)]
            out[name][knob] = {str(c[i]): float(s.loc[c]) for c in sorted(rows)}
    return out


COLORS = {"full-config-only": "tab:red", "elastic": "tab:green"}


def plot_from_results(results_dir: Path, figures_dir: Path | None = None) -> list[Path]:
    """`results/figures/lora_frontiers.png` from `results/lora_summary.json`: (a) the quality-latency
    frontiers of the full-config-only base, the headline adapter and the elastic model over the
    configurations all three answered, (b) per reduced configuration each adapter's gain against
    the elastic model's advantage (y = x: all of it recovered; y = x / 2: the issue's bar)."""
    results_dir = Path(results_dir)
    summary = json.loads((results_dir / "lora_summary.json").read_text())
    models = summary["models"]
    base, reference, headline = summary["base"], summary["reference"], summary["headline"]
    by = {name: {(r["crops"], r["top_k"], r["active_blocks"]): r for r in models[name]["configs"]} for name in models}
    others = iter(["tab:purple", "tab:brown", "tab:blue", "tab:gray"])
    color = {name: COLORS.get(name) or ("tab:orange" if name == headline else next(others, "tab:gray")) for name in models}
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    shared = [tuple(c) for c in summary["comparison_configs"]]
    for name in (base, headline, reference):
        lat = np.array([by[name][c]["latency_ms_mean"] for c in shared])
        q = np.array([by[name][c]["mean_quality"] for c in shared])
        axes[0].scatter(lat, q, s=8, alpha=0.25, color=color[name])
        idx = pareto_frontier(lat, q)
        axes[0].step(lat[idx], q[idx], where="post", color=color[name], label=name)
    axes[0].set(xlabel="mean latency (ms, first micro, H100 stage table, composed)", ylabel="mean quality (9 families)",
                title=f"quality-latency frontier ({len(shared)} configurations)")
    axes[0].legend(fontsize=8)
    full = tuple(summary["full_config"])
    for name in summary["adapted"]:
        reduced = [c for c in by[name] if c != full and c in by[base] and c in by[reference]]
        gap = np.array([by[reference][c]["mean_quality"] - by[base][c]["mean_quality"] for c in reduced])
        gain = np.array([by[name][c]["mean_quality"] - by[base][c]["mean_quality"] for c in reduced])
        rec = summary["comparison"]["per_model"][name]["gap_recovered"]
        axes[1].scatter(gap, gain, s=14 if name == headline else 8, alpha=0.7 if name == headline else 0.4, color=color[name],
                        label=f"{name}: {rec:.0%} of the gap ({len(reduced)} configs)")
    lim = np.array(axes[1].get_xlim())
    axes[1].plot(lim, lim, color="grey", lw=1, label="y = x (all recovered)")
    axes[1].plot(lim, 0.5 * lim, color="grey", lw=1, ls=":", label="y = x / 2 (the bar)")
    axes[1].axhline(0, color="black", lw=0.5)
    axes[1].set(xlabel=f"{reference} - {base} (quality)", ylabel=f"adapter - {base} (quality)",
                title="gain at each reduced configuration")
    axes[1].legend(fontsize=7)
    return [save_figure(fig, figures_path(results_dir, figures_dir) / "lora_frontiers.png", dpi=130)]


def pack_tables(sources: Sequence[str | Path], out_file: str | Path) -> Path:
    """One model's quality rows from several runs (e.g. a GPU sweep cut short by the device's time
    limit and the configurations answered afterwards on a CPU) as one Parquet file sorted by key,
    with the first source's metadata, every source's provenance under `merged_from` and their
    answers' agreement under `overlap`."""
    from ..profiles.tables import write_parquet

    frames = read_sources(sources)
    frame, provenance = merge_sources(frames, sources)
    metadata = {**frames[0].attrs.get("metadata", {}), "merged_from": provenance, "overlap": source_agreement(frames)}
    # Sorted rows compress about 1.6x better (the repository's size is capped).
    return write_parquet(frame.sort_values(KEY, ignore_index=True), out_file, metadata, compression_level=19)


def source_agreement(frames: Sequence[pd.DataFrame]) -> dict:
    """Where several tables answered the same (request, config) (e.g. a GPU and a CPU run of the
    same model in float32), how often their answers are identical: the check that rows from
    different machines may be mixed."""
    frames = [frame[KEY + ["answer", "quality"]] for frame in frames]
    overlap, same, delta = 0, 0, 0.0
    for i in range(len(frames)):
        for j in range(i + 1, len(frames)):
            both = frames[i].merge(frames[j], on=KEY, suffixes=("_a", "_b"))
            overlap += len(both)
            same += int((both["answer_a"] == both["answer_b"]).sum())
            delta += float((both["quality_a"] - both["quality_b"]).abs().sum())
    return {"rows": overlap, "identical_answers": same / overlap if overlap else None,
            "mean_abs_quality_difference": delta / overlap if overlap else None}
