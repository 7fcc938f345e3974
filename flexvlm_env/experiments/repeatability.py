"""M2 — latency repeatability (../shared/EXPERIMENTS.md "M2"): how much one fixed request's latency
varies from run to run at batch 1, per stage, and how many timed repeats the mean and the tails need.

`measure(vlm, configs, ...)` runs one fixed request (seeded noise image, ~40-token prompt, forced
output length) at each configuration: `warmup` discarded runs, then `repeats` timed runs, every
stage kept (the driver writes it as `m2_raw_<preset>_<device>.json`). `analyse` merges the raw files of
several devices: per configuration and stage the latency protocol's statistics (mean, median, P95,
P99, std, CoV), the run-order drift (median of the last quarter over the first) and lag-1
autocorrelation, and the repeats needed (`repeats_needed`): the smallest n for which the statistic
of n repeats resampled with replacement from all of them is within the tolerance of the
all-repeats value with the given probability (mean 1 %, P95 and P99 5 %, probability 95 %), with
the normal-theory n = (1.96 CoV / 0.01)^2 for the mean alongside (it extrapolates beyond the
repeats taken). The issue's bar: CoV of total latency <= 2 % on the H100 at batch 1 for molmoe-1b.
"""
from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .common import distribution_summary, figures_path, pyplot, run_header, save_figure, write_json
from .latency_decomposition import (
    STAGES,
    _load_average,
    build_prompt,
    device_tag,
    noise_image,
    run_key,
    run_label,
)

CONFIGS = (("low", 1, 1, 8), ("medium", 4, 4, 12), ("high", 12, 8, 16))  # (name, crops, top_k, active_blocks)
RAW_PREFIX = "m2_raw_"
COV_BAR = 0.02
TOLERANCES = {"mean": 0.01, "p95": 0.05, "p99": 0.05}
N_GRID = (3, 5, 10, 15, 20, 25, 30, 40, 50, 60, 75, 100, 150, 200)


def parse_configs(values: Sequence[str]) -> tuple[tuple[str, int, int, int], ...]:
    """'name:crops,top_k,blocks' (or 'crops,top_k,blocks', named by position low/medium/high) ->
    (name, crops, top_k, active_blocks) tuples."""
    out = []
    default_names = [c[0] for c in CONFIGS]
    for i, value in enumerate(values):
        name, _, knobs = value.rpartition(":")
        name = name or (default_names[i] if i < len(default_names) else f"config{i}")
        try:
            crops, top_k, blocks = (int(x) for x in knobs.split(","))
        except ValueError:
            raise ValueError(f"config {value!r} must be 'crops,top_k,active_blocks' or 'name:crops,top_k,active_blocks' (ints)") from None
        if min(crops, top_k, blocks) < 1:
            raise ValueError(f"config {value!r}: crops, top_k and active_blocks must be >= 1")
        out.append((name, crops, top_k, blocks))
    if not out or len({o[0] for o in out}) != len(out):
        raise ValueError(f"configs {list(values)!r} must be non-empty with distinct names")
    return tuple(out)


def measure(vlm, configs=CONFIGS, *, warmup: int = 5, repeats: int = 100, output_tokens: int = 32, prompt_tokens: int = 40,
            seed: int = 0, deadline_s: float | None = None, log=print) -> dict:
    """Time the fixed request at each config (see module doc); at `deadline_s` (time.time()) the
    current config keeps the repeats it has and later configs are skipped (listed in `truncated`)."""
    from ..benchmarking import device_info
    from ..config import Config

    for name, value, low in (("warmup", warmup, 0), ("repeats", repeats, 2), ("output_tokens", output_tokens, 1), ("prompt_tokens", prompt_tokens, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{name}={value!r} must be an int >= {low}")
    start = time.time()
    load_start = _load_average()
    image = noise_image(seed)
    prompt = build_prompt(vlm.tokenizer.encode_prompt, prompt_tokens)
    runs, truncated = {}, []
    for name, crops, top_k, blocks in configs:
        if deadline_s is not None and time.time() >= deadline_s:
            truncated.append(name)
            continue
        config = Config(crops=crops, top_k=top_k, active_blocks=blocks)
        for _ in range(warmup):
            vlm.generate(image, prompt, config, max_new_tokens=output_tokens, ignore_eos=True)
        rows = []
        for _ in range(repeats):
            if deadline_s is not None and time.time() >= deadline_s and len(rows) >= 2:
                truncated.append(name)
                break
            result = vlm.generate(image, prompt, config, max_new_tokens=output_tokens, ignore_eos=True)
            lat = result.latency
            rows.append([float(getattr(lat, f"{s}_ms")) for s in STAGES] + [float(lat.total_ms)])
        table = np.asarray(rows)
        runs[name] = {"crops": crops, "top_k": top_k, "active_blocks": blocks, "input_tokens": result.tokens.input,
                      "output_tokens": result.tokens.output, "ms": {col: table[:, i].tolist() for i, col in enumerate((*STAGES, "total"))}}
        log(f"{name}: {len(rows)} repeats, median total {np.median(table[:, -1]):.2f} ms ({time.time() - start:.1f}s)")
    info = device_info(vlm.device)
    return {"kind": "m2_raw", "host_load_average_1min": {"start": load_start, "end": _load_average()}, "preset": vlm.args.name, "dtype": str(vlm.dtype).replace("torch.", ""),
            "weights": "random" if vlm.random_weights else (vlm.weights_sha256 or "checkpoint"), "device": info, "device_tag": device_tag(info),
            "cuda_graphs": bool(vlm.use_cuda_graphs), "warmup": warmup, "repeats": repeats, "output_tokens": output_tokens,
            "prompt": prompt, "seed": seed, "truncated": truncated, "measure_s": round(time.time() - start, 2), "configs": runs}


def _percentile_rows(samples: np.ndarray, q: float) -> np.ndarray:
    return np.percentile(samples, q, axis=1)


STATISTICS = {"mean": lambda s: s.mean(axis=1), "p95": lambda s: _percentile_rows(s, 95), "p99": lambda s: _percentile_rows(s, 99)}


def repeats_needed(values, statistic: str, tolerance: float, probability: float = 0.95, n_grid: Sequence[int] = N_GRID,
                   resamples: int = 2000, seed: int = 0) -> dict:
    """Smallest n in `n_grid` (up to the repeats available) whose bootstrap statistic is within
    `tolerance` (relative) of the all-repeats statistic with at least `probability`; also the
    probability at each n. `n` is None when even the largest n falls short ("more than taken")."""
    values = np.asarray(values, float)
    if statistic not in STATISTICS:
        raise ValueError(f"statistic={statistic!r} is not valid; allowed: {sorted(STATISTICS)}")
    if values.ndim != 1 or values.size < 2:
        raise ValueError(f"values must be 1-D with at least 2 repeats, got shape {values.shape}")
    if not 0 < tolerance < 1 or not 0 < probability < 1:
        raise ValueError(f"tolerance={tolerance} and probability={probability} must be in (0, 1)")
    fn = STATISTICS[statistic]
    reference = float(fn(values[None])[0])
    rng = np.random.default_rng(seed)
    grid = sorted({n for n in n_grid if 2 <= n <= values.size} | {values.size})
    within, needed = {}, None
    for n in grid:
        samples = values[rng.integers(0, values.size, (resamples, n))]
        p = float(np.mean(np.abs(fn(samples) / reference - 1) <= tolerance)) if reference else 1.0
        within[n] = p
        if needed is None and p >= probability:
            needed = n
    return {"n": needed, "n_taken": int(values.size), "probability_within": {str(k): v for k, v in within.items()},
            "tolerance": tolerance, "probability": probability, "reference": reference}


def lag1_autocorrelation(values) -> float | None:
    values = np.asarray(values, float)
    if values.size < 3 or np.ptp(values) == 0:
        return None
    return float(np.corrcoef(values[:-1], values[1:])[0, 1])


def analyse_config(ms: dict[str, list[float]]) -> dict:
    """Statistics of one config's repeats (see module doc)."""
    stages = {s: distribution_summary(ms[s]) for s in (*STAGES, "total")}
    total = np.asarray(ms["total"], float)
    quarter = max(1, total.size // 4)
    cov = stages["total"]["cov"]
    # The stage whose variance contributes most to the total's (covariances ignored): what varies.
    variances = {s: float(np.var(ms[s])) for s in STAGES}
    return {
        "stats": stages,
        "cov_total": cov,
        "cov_per_stage": {s: stages[s]["cov"] for s in STAGES},
        "most_variable_stage": max(variances, key=variances.get),
        "stage_variance_share": {s: v / sum(variances.values()) if sum(variances.values()) else None for s, v in variances.items()},
        "drift_last_over_first_quarter": float(np.median(total[-quarter:]) / np.median(total[:quarter]) - 1),
        "lag1_autocorrelation": lag1_autocorrelation(total),
        "p99_over_median": float(stages["total"]["p99"] / stages["total"]["median"]),
        "repeats_needed": {stat: repeats_needed(total, stat, tol) for stat, tol in TOLERANCES.items()},
        "repeats_needed_mean_normal_theory": int(np.ceil((1.96 * cov / TOLERANCES["mean"]) ** 2)) if cov is not None else None,
    }


def analyse(records: Sequence[tuple[Path, dict]], args: Any = None, root: Path | None = None) -> tuple[dict, dict]:
    """(summary, data) for the raw device records."""
    from .latency_decomposition import _relative

    runs, data = {}, {}
    for path, raw in records:
        key = run_key(raw)
        if key in runs:
            raise ValueError(f"two raw files for {key}: {runs[key]['source']} and {path}")
        configs = {name: {**{k: c[k] for k in ("crops", "top_k", "active_blocks", "input_tokens", "output_tokens")}, **analyse_config(c["ms"])}
                   for name, c in raw["configs"].items()}
        runs[key] = {"label": run_label(raw), "source": _relative(path, root), "device": raw["device"], "dtype": raw["dtype"],
                     "cuda_graphs": raw["cuda_graphs"], "warmup": raw["warmup"], "repeats": raw["repeats"], "output_tokens": raw["output_tokens"],
                     "truncated": raw["truncated"], "host_load_average_1min": raw.get("host_load_average_1min"), "configs": configs,
                     "max_cov_total": max(c["cov_total"] for c in configs.values()) if configs else None}
        data[key] = {"label": runs[key]["label"], "configs": {name: {"knobs": [c["crops"], c["top_k"], c["active_blocks"]], "ms": c["ms"]}
                                                             for name, c in raw["configs"].items()}}
    bar = {}
    for key, run in runs.items():
        if run["device"].get("device_type") == "cuda" and key.startswith("molmoe-1b"):
            bar[key] = {"max_cov_total": run["max_cov_total"], "holds": run["max_cov_total"] <= COV_BAR,
                        "cov_total_per_config": {n: c["cov_total"] for n, c in run["configs"].items()},
                        # what varies: the stage carrying most of the variance, slow drift vs run-to-run jitter
                        "what_varies": {n: {"most_variable_stage": c["most_variable_stage"],
                                            "stage_variance_share": c["stage_variance_share"],
                                            "drift_last_over_first_quarter": c["drift_last_over_first_quarter"],
                                            "lag1_autocorrelation": c["lag1_autocorrelation"],
                                            "p99_over_median": c["p99_over_median"]} for n, c in run["configs"].items()}}
    summary = run_header("m2", args, devices={k: r["device"] for k, r in runs.items()}, data_sources={k: r["source"] for k, r in runs.items()},
                         data_file="results/m2_data.json")
    summary.update(
        title="M2 latency repeatability",
        protocol="one fixed request per config (seeded noise image, fixed prompt, forced output length), batch 1, warm-ups discarded, "
                 "then consecutive timed repeats",
        repeats_needed_method=f"bootstrap (2000 resamples with replacement) of the timed repeats: smallest n with the statistic within "
                              f"{TOLERANCES} (relative) of the all-repeats value with probability 0.95; None = more than taken",
        cov_bar={"threshold": COV_BAR, "scope": "total latency, every config, molmoe-1b on a GPU (the issue names the H100)", "by_run": bar},
        runs=runs,
    )
    return summary, {"runs": data}


def write_results(summary: dict, data: dict, results_dir: Path) -> list[Path]:
    results_dir = Path(results_dir)
    paths = [write_json(results_dir / "m2_summary.json", summary), write_json(results_dir / "m2_data.json", data)]
    return paths + plot_from_results(results_dir)


def plot_from_results(results_dir: Path, figures_dir: Path | None = None) -> list[Path]:
    """Rebuild results/figures/m2_*.png from results/m2_data.json and m2_summary.json."""
    results_dir = Path(results_dir)
    data = json.loads((results_dir / "m2_data.json").read_text())["runs"]
    summary = json.loads((results_dir / "m2_summary.json").read_text())["runs"]
    figures = figures_path(results_dir, figures_dir)
    return [_plot_histograms(data, summary, figures / "m2_histograms.png"), _plot_repeats(summary, figures / "m2_repeats_needed.png"),
            _plot_stage_cov(summary, figures / "m2_stage_cov.png")]


def _plot_histograms(data: dict, summary: dict, path: Path) -> Path:
    plt = pyplot()
    n_cols = max(len(r["configs"]) for r in data.values())
    fig, axes = plt.subplots(len(data), n_cols, figsize=(4.2 * n_cols, 3.2 * len(data)), squeeze=False)
    for row, (key, run) in zip(axes, data.items()):
        for ax, (name, config) in zip(row, run["configs"].items()):
            total = np.asarray(config["ms"]["total"])
            stats = summary[key]["configs"][name]["stats"]["total"]
            ax.hist(total, bins=min(30, max(5, total.size // 3)), color="C0", alpha=0.8)
            for stat, style in (("median", "-"), ("p95", "--"), ("p99", ":")):
                ax.axvline(stats[stat], color="k", ls=style, lw=1, label=f"{stat} {stats[stat]:.3g} ms")
            knobs = tuple(config["knobs"])
            ax.set_title(f"{run['label']}\n{name} {knobs}: CoV {100 * stats['cov']:.2f}% (n={stats['n']})", fontsize=8)
            ax.set_xlabel("total latency (ms)")
            ax.legend(fontsize=6)
        for ax in row[len(run["configs"]):]:
            ax.axis("off")
    return save_figure(fig, path, 110)


def _plot_repeats(summary: dict, path: Path) -> Path:
    plt = pyplot()
    stats = list(TOLERANCES)
    fig, axes = plt.subplots(len(summary), len(stats), figsize=(4.2 * len(stats), 3.2 * len(summary)), squeeze=False)
    for row, run in zip(axes, summary.values()):
        for ax, stat in zip(row, stats):
            for i, (name, config) in enumerate(run["configs"].items()):
                need = config["repeats_needed"][stat]
                n = [int(k) for k in need["probability_within"]]
                ax.plot(n, list(need["probability_within"].values()), "o-", ms=3, color=f"C{i}",
                        label=f"{name}: " + (f"n={need['n']}" if need["n"] is not None else f"n>{need['n_taken']}"))
            ax.axhline(0.95, color="k", lw=0.8, ls="--")
            ax.set_ylim(0, 1.02)
            ax.set_xlabel("repeats n")
            ax.set_ylabel(f"P({stat} within {100 * TOLERANCES[stat]:g}%)")
            ax.set_title(f"{run['label']}\n{stat}", fontsize=8)
            ax.legend(fontsize=7)
    return save_figure(fig, path, 110)


def _plot_stage_cov(summary: dict, path: Path) -> Path:
    plt = pyplot()
    fig, axes = plt.subplots(1, len(summary), figsize=(4.6 * len(summary), 3.6), squeeze=False)
    columns = (*STAGES, "total")
    for ax, run in zip(axes[0], summary.values()):
        names = list(run["configs"])
        width = 0.8 / max(1, len(names))
        for i, name in enumerate(names):
            covs = [100 * (run["configs"][name]["stats"][c]["cov"] or 0.0) for c in columns]
            ax.bar(np.arange(len(columns)) + (i - (len(names) - 1) / 2) * width, covs, width, color=f"C{i}", label=name)
        ax.axhline(100 * COV_BAR, color="k", lw=0.8, ls="--", label="2% bar")
        ax.set_xticks(range(len(columns)))
        ax.set_xticklabels([c.replace("_", "\n") for c in columns], fontsize=7)
        ax.set_ylabel("CoV (%)")
        ax.set_yscale("log")
        ax.set_title(f"{run['label']}\nCoV per stage", fontsize=8)
        ax.legend(fontsize=7)
    return save_figure(fig, path, 110)
