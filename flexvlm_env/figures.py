"""Figures regenerated from results data (JSON), never from live runs.

Each function takes the parsed results file and an output path, so `scripts/make_figures.py` (and
the notebooks) can rebuild every committed PNG from the data alone.
"""
from __future__ import annotations

from pathlib import Path


def _pyplot():
    """matplotlib's pyplot on the file-only Agg backend (figures are written, never shown)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str | Path, dpi: int) -> Path:
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    _pyplot().close(fig)
    return path


def roofline(result: dict, path: str | Path) -> Path:
    """Decode ms/token against the bytes a token must read, with the bandwidth floor.

    FlexVLM rows are labelled by (top_k, active_blocks); the Hugging Face rows are placed at the
    bytes of the same configuration (they must read at least as much).
    """
    plt = _pyplot()

    rows = result["rows"]
    bandwidth = result["copy_bandwidth_gbps"]
    ours = [r for r in rows if r["engine"] == "flexvlm" and r["instrumented"] and r.get("decode_bytes_per_token")]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    gbytes = [r["decode_bytes_per_token"] / 1e9 for r in ours]
    ax.scatter(gbytes, [r["decode_ms_per_token"] for r in ours], label="FlexVLM (CUDA graphs + Triton MoE)", zorder=3)
    for r, x in zip(ours, gbytes):
        if r["crops"] == max(o["crops"] for o in ours):
            ax.annotate(f"k={r['top_k']},b={r['active_blocks']}", (x, r["decode_ms_per_token"]), fontsize=7, xytext=(3, 3), textcoords="offset points")
    hf = [r for r in rows if r["engine"] == "hf-transformers"]
    if hf:
        by_k = {(r["top_k"], r["active_blocks"]): r["decode_bytes_per_token"] / 1e9 for r in ours if r["crops"] == max(o["crops"] for o in ours)}
        pts = [(by_k.get((r["top_k"], r["active_blocks"])), r["decode_ms_per_token"], r) for r in hf]
        pts = [p for p in pts if p[0] is not None]
        ax.scatter([p[0] for p in pts], [p[1] for p in pts], marker="x", color="C3", label="HF transformers OLMoE (best experts backend per top_k)", zorder=3)
    xs = [min(gbytes) * 0.8, max(gbytes) * 1.1]
    ax.plot(xs, [x / bandwidth * 1e3 for x in xs], "k--", label=f"floor: bytes / {bandwidth:.0f} GB/s (measured copy)")
    ax.set_yscale("log")
    ax.set_ylim(bottom=0.1)
    ax.set_xlabel("bytes a decode step must read (GB)")
    ax.set_ylabel("decode ms / token (log)")
    info = result["device_info"]
    ax.set_title(f"{result['args']['preset']} decode roofline, batch 1, bf16 — {info['device_name']}, torch {info['torch']}", fontsize=9)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return _save(fig, path, dpi=120)


def training_curves(log_records: list[dict], path: str | Path) -> Path:
    """Answer cross-entropy per family and per knob draw against training step (train_micro log)."""
    plt = _pyplot()

    steps = [r["step"] for r in log_records]
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    families = [k.split("/", 1)[1] for k in log_records[-1] if k.startswith("ce_family/")]
    for family in families:
        left.plot(steps, [r.get(f"ce_family/{family}") for r in log_records], label=family)
    left.set(title="answer cross-entropy per family (all draws)", xlabel="step", ylabel="nats per answer token")
    left.legend(fontsize=7)
    for kind in ("full", "smallest", "prefix", "random"):
        right.plot(steps, [r.get(f"ce/{kind}") for r in log_records], label=kind)
    right.set(title="per knob draw (full = (12, 8, 16), smallest = (1, 1, 8))", xlabel="step")
    right.legend()
    for axis in (left, right):
        axis.grid(alpha=0.3)
    return _save(fig, path, dpi=110)


def replay_tradeoff(summary: dict, path: str | Path) -> Path:
    """Left: mean quality against median latency of every configuration, per family (from
    `scripts/analyze_replay.py`). Right: mean reward of the full configuration, the best static
    configuration, a per-family lookup table and the per-request oracle, against the budget."""
    plt = _pyplot()

    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 5))
    for family, row in summary["per_family"].items():
        latency, quality = row["median_latency_ms"], row["mean_quality"]
        left.scatter(latency, quality, s=8, alpha=0.6, label=family)
    left.set(title=f"{summary['n_configs']} configurations per family ({summary['quality_source']} quality, "
                   f"{summary['latency_source']} latency)", xlabel="median latency (ms)", ylabel="mean quality")
    left.legend(fontsize=7, markerscale=2)
    fractions = [float(f) for f in summary["by_budget_fraction"]]
    for policy in ("full", "best_static", "per_family_lut", "oracle"):
        right.plot(fractions, [summary["by_budget_fraction"][str(f)][policy]["mean_reward"] for f in fractions],
                   marker="o", label=policy)
    right.set(title=f"mean reward (lambda = {summary['lam']}) against the budget", xlabel="budget / family full-config latency",
              ylabel="mean reward")
    right.legend()
    for axis in (left, right):
        axis.grid(alpha=0.3)
    return _save(fig, path, dpi=110)
