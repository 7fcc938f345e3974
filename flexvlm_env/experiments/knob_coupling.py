"""E2: knob coupling and Pareto structure (../shared/EXPERIMENTS.md "E2 — Knob coupling and Pareto structure").

The full 140-config grid on a QA workload and a captioning workload, from recorded tables: `micro`
quality per (request, config) and latency composed from stage tables (or measured per request).
Per (workload, latency source, config): mean quality and latency mean / median / P95 / P99 over
the shared requests (every config sees the same requests).

Coupling: fix one knob at each of its values, take the Pareto frontier (mean latency, mean
quality) over the other two knobs' configs, and compare the frontiers of two fixed values at equal
latency with `common.frontier_quality_at` (best quality reachable within a latency): the gap of a
pair of fixed values is the largest |difference| over the latencies both frontiers reach. If the
knobs were separable (the best setting of two knobs independent of the third), fixing the third
would shift a frontier along the latency axis but not reshape it; a large gap at equal latency
means the choice of the fixed value matters for what the other two can reach. The best case's gap
comes with a bootstrap interval over requests (the gap at that latency, requests resampled), since
a maximum over many pairs and latencies favours noise.

Illustrative cases: a config on one workload's frontier and off the other's (its shortfall below
the other frontier at its latency there); a single-knob configuration (two knobs at full, as the
`tokens_only` / `depth_only` / `width_only` baselines use) beaten by a multi-knob one (two or
three knobs reduced) at equal or lower mean latency.

Data sources (`load_pool`): a quality table (the shipped `micro_quality_val.parquet`, 200 per
family, or a larger sweep of the same pool), the request table of that pool (token counts), and a
latency source: `molmoe-1b-h100` / `micro-h200` (stage tables composed with each request's token
counts, `profiles.loading.build_replay_data`), or `micro-h200-measured` (the per-(request, config)
H200 measurements where the request was measured, the `micro-h200` composition for the others;
the summary says how many of each).
"""
from __future__ import annotations

import dataclasses
import itertools
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ..config import KnobGrid
from ..envs.core import FAMILY_NAMES
from ..profiles.loading import (
    LATENCY_SOURCES,
    QUALITY_SOURCES,
    REQUESTS_TABLE,
    build_replay_data,
    build_replay_data_measured,
    check_source,
    profiles_dir,
)
from ..profiles.replay import STAGE_COLUMNS, ReplayData
from ..profiles.tables import read_parquet, read_table
from .common import figures_path, frontier_quality_at, pareto_frontier, pyplot, save_figure

KNOBS = ("crops", "top_k", "active_blocks")
WORKLOADS = {"coco_2014_vqa": "QA", "coco_caption": "captioning"}
DEFAULT_FAMILIES = tuple(WORKLOADS)
# Every shipped latency source (profiles.loading.LATENCY_SOURCES), in the order figures list them.
LATENCY_CHOICES = ("molmoe-1b-h100", "molmoe-1b-h200", "micro-h200-measured", "micro-h200")
# The 500-requests-per-family sweep of the two workloads (an H200 run; its first 200 requests per
# family are the shipped pool's), used by E2 and M1 when present.
POOL_500_QUALITY = Path(__file__).resolve().parents[2] / "results/device_tables/micro_quality_val_vqa_caption_500.parquet"
POOL_500_REQUESTS = POOL_500_QUALITY.with_name("requests_val_vqa_caption_500.parquet")


def pool_and_validation(args: Any, quick_per_family: int = 40) -> None:
    """Shared argument handling of the E2 and M1 drivers (`args` has quality_table, requests_table,
    latency, families, per_family, quick): fills the table defaults (the 500-per-family sweep when
    present, the shipped tables with --quick or without it) and exits with a clear message on bad input."""
    if args.quick:
        args.per_family = quick_per_family if args.per_family is None else min(args.per_family, quick_per_family)
    if args.quality_table is None:
        args.quality_table = (POOL_500_QUALITY if POOL_500_QUALITY.exists() and not args.quick
                              else profiles_dir() / QUALITY_SOURCES["micro"])
    if args.requests_table is None:
        args.requests_table = (POOL_500_REQUESTS if POOL_500_REQUESTS.exists() and not args.quick
                               else profiles_dir() / REQUESTS_TABLE)
    for name in ("quality_table", "requests_table"):
        if not Path(getattr(args, name)).exists():
            raise SystemExit(f"--{name.replace('_', '-')}={getattr(args, name)}: file not found")
    bad = [s for s in args.latency if s not in LATENCY_CHOICES]
    if bad or not args.latency:
        raise SystemExit(f"--latency={list(args.latency)}: allowed values are {list(LATENCY_CHOICES)} (at least one)")
    unknown = [f for f in args.families if f not in FAMILY_NAMES]
    if unknown:
        raise SystemExit(f"--families={list(args.families)}: {unknown} are not task families; allowed: {list(FAMILY_NAMES)}")
    if len(args.families) != 2 or len(set(args.families)) != 2:
        raise SystemExit(f"--families={list(args.families)}: give exactly two different families (QA, captioning)")
    if args.per_family is not None and args.per_family < 2:
        raise SystemExit(f"--per-family={args.per_family}: must be >= 2")
CONFIGS_FILE = "e2_configs.parquet"
SUMMARY_FILE = "e2_summary.json"
QUALITY_POINTS = 100.0  # quality is in [0, 1]; "points" are percentage points


# ----------------------------------------------------------------------------- data


def _request_number(request_id: str) -> int:
    return int(str(request_id).rsplit("/", 1)[1])


def select_requests(answers: pd.DataFrame, families, per_family: int | None) -> pd.DataFrame:
    """The quality-table rows of `families`, and of each family's first `per_family` requests
    (pool index < per_family: the same requests whatever the pool size, since a larger sweep of
    the same seed and split extends the smaller one)."""
    unknown = sorted(set(families) - set(answers["family"].unique()))
    if unknown:
        raise ValueError(f"families {unknown} are not in the quality table (it has {sorted(answers['family'].unique())})")
    rows = answers[answers["family"].isin(families)]
    if per_family is not None:
        if per_family < 1:
            raise ValueError(f"per_family={per_family} must be >= 1")
        rows = rows[rows["request_id"].map(_request_number) < per_family]
    return rows.reset_index(drop=True)


def load_pool(quality_table: str | Path, requests_table: str | Path, families=DEFAULT_FAMILIES,
              latency: str = "molmoe-1b-h100", per_family: int | None = None) -> tuple[ReplayData, dict]:
    """`ReplayData` for `families` of a quality table joined with its request table and a latency
    source (module docstring), and a provenance dict (tables, metadata, measured/composed counts)."""
    check_source("latency", latency)
    answers, quality_meta = read_parquet(quality_table)
    requests, requests_meta = read_parquet(requests_table)
    answers = select_requests(answers, families, per_family)
    ids = pd.unique(answers["request_id"])
    missing = sorted(set(ids) - set(requests["request_id"].unique()))
    if missing:
        raise ValueError(f"the request table {requests_table} lacks {len(missing)} requests of the quality table "
                         f"{quality_table}, e.g. {missing[:3]}; build it with `flexvlm-profile request-table` for the same pool")
    requests = requests[requests["request_id"].isin(set(ids))]
    answered_by = quality_meta.get("preset", "micro")
    info: dict[str, Any] = {"latency_source": latency, "quality_table": str(quality_table), "requests_table": str(requests_table),
                            "quality_table_meta": _brief(quality_meta), "requests_table_meta": _brief(requests_meta),
                            "families": list(families), "n_requests": len(ids)}
    composed_name = "micro-h200" if latency == "micro-h200-measured" else latency
    preset, stage_file, _ = LATENCY_SOURCES[composed_name]
    stages = read_table(profiles_dir() / stage_file)
    info["stage_table"] = stage_file
    info["stage_table_device"] = stages.attrs.get("metadata", {}).get("device_name")
    data = build_replay_data(requests, answers, stages, preset, answered_by=answered_by,
                             metadata={"latency_source": latency, "quality_table": str(quality_table)})
    if latency != "micro-h200-measured":
        info.update(n_measured_requests=0, n_composed_requests=len(ids))
        return data, info
    _, measured_file, _ = LATENCY_SOURCES["micro-h200-measured"]
    measured = read_table(profiles_dir() / measured_file)
    info["measured_table"] = measured_file
    info["measured_table_device"] = measured.attrs.get("metadata", {}).get("device_name")
    have = set(measured["request_id"].unique())
    in_measured = [i for i in ids if i in have]
    info.update(n_measured_requests=len(in_measured), n_composed_requests=int(len(ids) - len(in_measured)))
    if not in_measured:
        return data, info
    subset = set(in_measured)
    part = build_replay_data_measured(requests[requests["request_id"].isin(subset)],
                                      answers[answers["request_id"].isin(subset)], measured)
    rows = np.array([data.request_ids.index(i) for i in part.request_ids])
    stage_ms, total_ms, output = data.stage_ms.copy(), data.total_ms.copy(), data.output_tokens.copy()
    stage_ms[rows], total_ms[rows], output[rows] = part.stage_ms, part.total_ms, part.output_tokens
    data = dataclasses.replace(data, stage_ms=stage_ms, total_ms=total_ms, output_tokens=output,
                               metadata={**data.metadata, "composition": "measured where recorded, else composed"})
    return data, info


def _brief(meta: dict) -> dict:
    """The provenance fields of a table's metadata worth carrying into a summary."""
    keys = ("kind", "preset", "device_name", "dtype", "code_version", "pool", "weights_sha256", "protocol")
    return {k: meta[k] for k in keys if k in meta}


def config_stats(data: ReplayData, family: str, latency_source: str) -> pd.DataFrame:
    """One row per config of `family`'s requests: knob values, mean quality (and its standard
    error), latency mean / median / P95 / P99 (ms), mean stage times and output tokens."""
    rows = np.asarray(data.families) == family
    if not rows.any():
        raise ValueError(f"family={family!r} has no requests in this data (families: {sorted(set(data.families))})")
    q, t, s = data.quality[rows], data.total_ms[rows].astype(float), data.stage_ms[rows].astype(float)
    n = int(rows.sum())
    frame = pd.DataFrame({
        "workload": family, "latency_source": latency_source, "config_index": np.arange(len(data.grid)),
        "crops": [c.crops for c in data.grid.configs()], "top_k": [c.top_k for c in data.grid.configs()],
        "active_blocks": [c.active_blocks for c in data.grid.configs()],
        "quality": q.mean(axis=0), "quality_se": q.std(axis=0, ddof=1) / np.sqrt(n) if n > 1 else 0.0,
        "latency_mean_ms": t.mean(axis=0), "latency_median_ms": np.median(t, axis=0),
        "latency_p95_ms": np.percentile(t, 95, axis=0), "latency_p99_ms": np.percentile(t, 99, axis=0),
        "output_tokens_mean": data.output_tokens[rows].mean(axis=0), "n_requests": n,
    })
    for k, name in enumerate(STAGE_COLUMNS):
        frame[f"{name}_mean"] = s[:, :, k].mean(axis=0)
    frame["on_frontier"] = False
    frame.loc[pareto_frontier(frame["latency_mean_ms"], frame["quality"]), "on_frontier"] = True
    return frame


# ----------------------------------------------------------------------------- coupling


def frontier_gap(lat_a, q_a, lat_b, q_b) -> dict:
    """Compare two point sets' frontiers at equal latency: over the latencies both reach (from the
    slower of the two fastest points on; at every frontier latency of either), the signed
    difference A - B of the best quality within that latency. Returns the largest |difference|,
    the latency where it occurs, its sign, the mean |difference|, and the latency range compared.
    NaN gap when the sets share no latency (cannot happen: both frontiers extend to +inf)."""
    lat_a, q_a, lat_b, q_b = (np.asarray(x, float) for x in (lat_a, q_a, lat_b, q_b))
    if lat_a.size == 0 or lat_b.size == 0:
        raise ValueError("frontier_gap needs at least one point in each set")
    start = max(lat_a.min(), lat_b.min())
    grid = np.unique(np.concatenate([lat_a, lat_b]))
    grid = grid[grid >= start]
    diff = frontier_quality_at(lat_a, q_a, grid) - frontier_quality_at(lat_b, q_b, grid)
    i = int(np.argmax(np.abs(diff)))
    return {"max_abs_gap": float(abs(diff[i])), "signed_gap": float(diff[i]), "at_latency_ms": float(grid[i]),
            "mean_abs_gap": float(np.mean(np.abs(diff))), "latency_range_ms": [float(grid[0]), float(grid[-1])]}


def coupling(table: pd.DataFrame, knob: str, latency_col: str = "latency_mean_ms") -> dict:
    """For one (workload, latency source) config table: the frontier over the other two knobs at
    each value of `knob`, and the equal-latency gap (`frontier_gap`) of every pair of values."""
    if knob not in KNOBS:
        raise ValueError(f"knob={knob!r} is not a knob; allowed: {list(KNOBS)}")
    values = sorted(table[knob].unique().tolist())
    frontiers = {}
    for v in values:
        sub = table[table[knob] == v]
        idx = pareto_frontier(sub[latency_col], sub["quality"])
        pts = sub.iloc[idx]
        frontiers[v] = {"config_index": pts["config_index"].tolist(), "latency_ms": pts[latency_col].tolist(),
                        "quality": pts["quality"].tolist()}
    pairs = []
    for a, b in itertools.combinations(values, 2):
        A, B = table[table[knob] == a], table[table[knob] == b]
        gap = frontier_gap(A[latency_col], A["quality"], B[latency_col], B["quality"])
        pairs.append({"fixed_a": a, "fixed_b": b, **gap, "max_abs_gap_points": gap["max_abs_gap"] * QUALITY_POINTS})
    best = max(pairs, key=lambda p: p["max_abs_gap"])
    return {"knob": knob, "values": values, "frontiers": frontiers, "pairs": pairs, "best": best}


def _best_quality_config(sub: pd.DataFrame, latency_ms: float, latency_col: str) -> dict | None:
    """The config of `sub` with the best quality within `latency_ms` (ties: the faster)."""
    ok = sub[sub[latency_col] <= latency_ms + 1e-9]
    if ok.empty:
        return None
    row = ok.sort_values(["quality", latency_col], ascending=[False, True]).iloc[0]
    return _config_record(row, latency_col)


def _config_record(row, latency_col: str) -> dict:
    return {"crops": int(row["crops"]), "top_k": int(row["top_k"]), "active_blocks": int(row["active_blocks"]),
            "config_index": int(row["config_index"]), "quality": float(row["quality"]), "latency_ms": float(row[latency_col])}


def best_case_detail(table: pd.DataFrame, knob: str, pair: dict, latency_col: str = "latency_mean_ms") -> dict:
    """The configs behind a pair's gap: each frontier's best config within the gap's latency."""
    at = pair["at_latency_ms"]
    return {"config_fixed_a": _best_quality_config(table[table[knob] == pair["fixed_a"]], at, latency_col),
            "config_fixed_b": _best_quality_config(table[table[knob] == pair["fixed_b"]], at, latency_col)}


def bootstrap_gap(quality: np.ndarray, latency: np.ndarray, grid: KnobGrid, knob: str, fixed_a, fixed_b,
                  at_latency_ms: float, n_boot: int, seed: int = 0) -> dict:
    """Requests resampled with replacement `n_boot` times: per-config mean quality and latency
    recomputed, and the frontier difference (fixed_a minus fixed_b) at `at_latency_ms`; returns the
    2.5/50/97.5 percentiles (quality, not points) and the fraction of resamples of the same sign
    as the full-sample difference. quality, latency: [R, C] for one workload."""
    if n_boot < 1:
        raise ValueError(f"n_boot={n_boot} must be >= 1")
    values = np.array([getattr(c, knob) for c in grid.configs()])
    a, b = values == fixed_a, values == fixed_b
    rng = np.random.default_rng(seed)
    R = quality.shape[0]

    def diff(qm, lm):
        return float(frontier_quality_at(lm[a], qm[a], at_latency_ms)[0] - frontier_quality_at(lm[b], qm[b], at_latency_ms)[0])

    point = diff(quality.mean(axis=0), latency.mean(axis=0))
    draws = []
    for _ in range(n_boot):
        rows = rng.integers(0, R, R)
        draws.append(diff(quality[rows].mean(axis=0), latency[rows].mean(axis=0)))
    draws = np.asarray(draws)
    finite = draws[np.isfinite(draws)]
    lo, mid, hi = (np.percentile(finite, [2.5, 50, 97.5]) if finite.size else (np.nan,) * 3)
    return {"gap": point, "ci95": [float(lo), float(hi)], "median": float(mid), "n_boot": n_boot,
            "same_sign_fraction": float(np.mean(np.sign(finite) == np.sign(point))) if finite.size else float("nan")}


def config_means(quality: np.ndarray, latency: np.ndarray, grid: KnobGrid) -> pd.DataFrame:
    """Per-config mean quality and mean latency of a [R, C] pair (a subset of one workload)."""
    configs = grid.configs()
    return pd.DataFrame({"config_index": np.arange(len(configs)), "crops": [c.crops for c in configs],
                         "top_k": [c.top_k for c in configs], "active_blocks": [c.active_blocks for c in configs],
                         "quality": quality.mean(axis=0), "latency_mean_ms": latency.mean(axis=0)})


def split_half_check(quality: np.ndarray, latency: np.ndarray, grid: KnobGrid, knob: str, select: np.ndarray) -> dict:
    """Guard against picking noise: choose the best pair of fixed values and its latency on the
    `select` requests only, then measure the same pair's frontier difference at that latency on
    the other requests (sign-aligned, so a positive held-out gap means the effect replicated)."""
    if select.all() or not select.any():
        raise ValueError("split_half_check needs requests on both sides of the split")
    chosen = coupling(config_means(quality[select], latency[select], grid), knob)["best"]
    other = config_means(quality[~select], latency[~select], grid)
    A, B = other[other[knob] == chosen["fixed_a"]], other[other[knob] == chosen["fixed_b"]]
    # a latency the held-out frontiers both reach (their fastest points can be a little slower)
    at = max(chosen["at_latency_ms"], A["latency_mean_ms"].min(), B["latency_mean_ms"].min())
    held = float(frontier_quality_at(A["latency_mean_ms"], A["quality"], at)[0] - frontier_quality_at(B["latency_mean_ms"], B["quality"], at)[0])
    sign = np.sign(chosen["signed_gap"]) or 1.0
    return {"fixed_a": chosen["fixed_a"], "fixed_b": chosen["fixed_b"], "at_latency_ms": chosen["at_latency_ms"], "heldout_at_latency_ms": float(at),
            "selected_gap_points": chosen["max_abs_gap"] * QUALITY_POINTS,
            "heldout_gap_points": float(sign * held * QUALITY_POINTS) if np.isfinite(held) else float("nan"),
            "n_select": int(select.sum()), "n_heldout": int((~select).sum())}


# ----------------------------------------------------------------------------- illustrative cases


def cross_workload_cases(table_a: pd.DataFrame, table_b: pd.DataFrame, latency_col: str = "latency_mean_ms") -> list[dict]:
    """Configs on one workload's frontier and off the other's, each with its shortfall on the other
    workload (the other frontier's best quality within its latency there, minus its quality),
    largest shortfall first; both directions."""
    out = []
    for src, dst in ((table_a, table_b), (table_b, table_a)):
        on_src = set(src.loc[src["on_frontier"], "config_index"])
        on_dst = set(dst.loc[dst["on_frontier"], "config_index"])
        dst_by_index = dst.set_index("config_index")
        for c in sorted(on_src - on_dst):
            row = dst_by_index.loc[c]
            best = float(frontier_quality_at(dst[latency_col], dst["quality"], row[latency_col])[0])
            dominating = _best_quality_config(dst, float(row[latency_col]), latency_col)
            out.append({"on_frontier_of": src["workload"].iloc[0], "off_frontier_of": dst["workload"].iloc[0],
                        "config": _config_record(src[src["config_index"] == c].iloc[0], latency_col),
                        "on_other": {"quality": float(row["quality"]), "latency_ms": float(row[latency_col])},
                        "other_frontier_quality": best, "shortfall": best - float(row["quality"]),
                        "shortfall_points": (best - float(row["quality"])) * QUALITY_POINTS,
                        "other_frontier_config": dominating})
    return sorted(out, key=lambda d: -d["shortfall"])


def single_knob_mask(table: pd.DataFrame, grid: KnobGrid) -> pd.Series:
    """Configs with exactly one knob below its largest value (the one-knob baselines' paths)."""
    reduced = sum((table[k] < max(getattr(grid, k))).astype(int) for k in KNOBS)
    return reduced == 1


def single_vs_multi(table: pd.DataFrame, grid: KnobGrid, latency_col: str = "latency_mean_ms") -> list[dict]:
    """For every single-knob config: the best multi-knob config (two or three knobs reduced) at
    equal or lower latency, and its quality gain; largest gain first."""
    reduced = sum((table[k] < max(getattr(grid, k))).astype(int) for k in KNOBS)
    multi = table[reduced >= 2]
    out = []
    for _, row in table[reduced == 1].iterrows():
        knob = next(k for k in KNOBS if row[k] < max(getattr(grid, k)))
        best = _best_quality_config(multi, float(row[latency_col]), latency_col)
        if best is None:
            continue
        gain = best["quality"] - float(row["quality"])
        out.append({"single_knob": knob, "single": _config_record(row, latency_col), "multi": best,
                    "gain": gain, "gain_points": gain * QUALITY_POINTS})
    return sorted(out, key=lambda d: -d["gain"])


# ----------------------------------------------------------------------------- run


def analyze(tables: dict[tuple[str, str], pd.DataFrame], matrices: dict[tuple[str, str], tuple[np.ndarray, np.ndarray]],
            grid: KnobGrid, n_boot: int, seed: int = 0, splits: dict[str, np.ndarray] | None = None) -> dict:
    """Coupling, best cases (with bootstrap intervals and, given `splits[workload]` = bool[R]
    selection halves, a split-half check) and illustrative cases for every (workload, latency
    source) table. `matrices[(workload, source)]` = (quality[R, C], total_ms[R, C])."""
    coupling_out, best_cases = {}, []
    for (workload, source), table in tables.items():
        per_knob = {}
        for knob in KNOBS:
            c = coupling(table, knob)
            detail = best_case_detail(table, knob, c["best"])
            q, t = matrices[(workload, source)]
            boot = bootstrap_gap(q, t, grid, knob, c["best"]["fixed_a"], c["best"]["fixed_b"], c["best"]["at_latency_ms"], n_boot, seed)
            c["best"] = {**c["best"], **detail, "bootstrap": boot}
            if splits is not None:
                c["best"]["split_half"] = split_half_check(q, t, grid, knob, splits[workload])
            per_knob[knob] = c
            best_cases.append({"workload": workload, "latency_source": source, "fixed_knob": knob, **c["best"]})
        coupling_out[f"{workload}|{source}"] = per_knob
    best_cases.sort(key=lambda d: -d["max_abs_gap"])
    sources = sorted({s for _, s in tables})
    workloads = sorted({w for w, _ in tables})
    cross, single = {}, {}
    for source in sources:
        if len(workloads) == 2:
            cross[source] = cross_workload_cases(tables[(workloads[0], source)], tables[(workloads[1], source)])
        for workload in workloads:
            single[f"{workload}|{source}"] = single_vs_multi(tables[(workload, source)], grid)
    return {"coupling": coupling_out, "best_cases": best_cases, "cross_workload": cross, "single_vs_multi": single}


def headline(analysis: dict, tables: dict[tuple[str, str], pd.DataFrame], bar_points: float = 5.0) -> dict:
    """The numbers the README quotes: the largest frontier gap (and per workload/source/knob), the
    bar's verdict, the best illustrative cases, and full-config quality and latency."""
    best = analysis["best_cases"][0]
    by_case = {f"{c['workload']}|{c['latency_source']}|{c['fixed_knob']}": round(c["max_abs_gap"] * QUALITY_POINTS, 2)
               for c in analysis["best_cases"]}
    n_over = sum(c["max_abs_gap"] * QUALITY_POINTS >= bar_points for c in analysis["best_cases"])
    full = {}
    for (workload, source), table in tables.items():
        row = table.iloc[-1]
        full[f"{workload}|{source}"] = {"quality": float(row["quality"]), "latency_mean_ms": float(row["latency_mean_ms"]),
                                        "latency_p95_ms": float(row["latency_p95_ms"]), "latency_p99_ms": float(row["latency_p99_ms"]),
                                        "n_frontier_configs": int(table["on_frontier"].sum())}
    cross_best = {s: (cases[0] if cases else None) for s, cases in analysis["cross_workload"].items()}
    single_best = {k: (cases[0] if cases else None) for k, cases in analysis["single_vs_multi"].items()}
    checked = [c for c in analysis["best_cases"] if "split_half" in c and np.isfinite(c["split_half"]["heldout_gap_points"])]
    replicated = max(checked, key=lambda c: c["split_half"]["heldout_gap_points"]) if checked else None
    extra = {}
    if replicated is not None:
        extra = {"largest_heldout_gap_points": replicated["split_half"]["heldout_gap_points"],
                 "largest_heldout_gap_case": {k: replicated[k] for k in ("workload", "latency_source", "fixed_knob")} | replicated["split_half"],
                 "n_cases_heldout_over_bar": int(sum(c["split_half"]["heldout_gap_points"] >= bar_points for c in checked))}
    return {**extra, "bar_points": bar_points, "largest_gap_points": best["max_abs_gap"] * QUALITY_POINTS,
            "largest_gap_case": best, "bar_met": bool(best["max_abs_gap"] * QUALITY_POINTS >= bar_points),
            "n_cases_over_bar": int(n_over), "gap_points_by_case": by_case, "full_config": full,
            "cross_workload_best": cross_best, "single_vs_multi_best": single_best}


# ----------------------------------------------------------------------------- figures

SOURCE_LABELS = {"molmoe-1b-h100": "MolmoE-1B H100 (composed)", "molmoe-1b-h200": "MolmoE-1B H200 (composed)",
                 "micro-h200-measured": "micro H200 (measured/composed)", "micro-h200": "micro H200 (composed)"}
MARKERS = {1: "o", 2: "s", 4: "^", 8: "D"}


def plot_from_results(results_dir: Path, figures_dir: Path | None = None) -> list[Path]:
    """Rebuild E2's figures from `results/e2_configs.parquet` and `results/e2_summary.json`."""
    import json

    results_dir = Path(results_dir)
    table = pd.read_parquet(results_dir / CONFIGS_FILE)
    summary = json.loads((results_dir / SUMMARY_FILE).read_text())
    figures = figures_path(results_dir, figures_dir)
    return [scatter_figure(table, figures / "e2_scatter_frontier.png"),
            *[coupling_figure(table, source, figures / f"e2_coupling_{source}.png") for source in _sources(table)],
            gaps_figure(summary, figures / "e2_coupling_gaps.png"),
            cases_figure(table, summary, figures / "e2_cases.png")]


def _sources(table: pd.DataFrame) -> list[str]:
    return [s for s in LATENCY_CHOICES if s in set(table["latency_source"])]


def _workloads(table: pd.DataFrame) -> list[str]:
    return sorted(table["workload"].unique(), key=lambda w: (w not in WORKLOADS, w))


def _title(workload: str) -> str:
    return f"{workload} ({WORKLOADS[workload]})" if workload in WORKLOADS else workload


def scatter_figure(table: pd.DataFrame, path: Path) -> Path:
    plt = pyplot()
    sources, workloads = _sources(table), _workloads(table)
    fig, axes = plt.subplots(len(sources), len(workloads), figsize=(5.6 * len(workloads) + 1, 4.3 * len(sources)), squeeze=False,
                             constrained_layout=True)
    cmap = plt.get_cmap("viridis")
    crops = sorted(table["crops"].unique())
    for i, source in enumerate(sources):
        for j, workload in enumerate(workloads):
            ax, sub = axes[i][j], table[(table["latency_source"] == source) & (table["workload"] == workload)]
            for k, v in MARKERS.items():
                pts = sub[sub["top_k"] == k]
                ax.scatter(pts["latency_mean_ms"], pts["quality"], c=[cmap(crops.index(c) / max(1, len(crops) - 1)) for c in pts["crops"]],
                           marker=v, s=10 + 2 * pts["active_blocks"], alpha=0.75, edgecolors="none", label=f"top_k={k}")
            front = sub[sub["on_frontier"]].sort_values("latency_mean_ms")
            ax.step(front["latency_mean_ms"], front["quality"], where="post", color="crimson", lw=1.3, label="Pareto frontier")
            ax.set_title(f"{_title(workload)}\n{SOURCE_LABELS.get(source, source)}, n={int(sub['n_requests'].iloc[0])}", fontsize=9)
            ax.set_xlabel("mean latency (ms)")
            ax.set_ylabel("mean quality (micro)")
            ax.grid(alpha=0.3)
            if i == 0 and j == 0:
                ax.legend(fontsize=7, loc="lower right")
    sm = plt.cm.ScalarMappable(cmap=cmap, norm=plt.Normalize(0, len(crops) - 1))
    cbar = fig.colorbar(sm, ax=axes, ticks=range(len(crops)), shrink=0.6)
    cbar.ax.set_yticklabels([str(c) for c in crops])
    cbar.set_label("crops (colour); marker size = active blocks")
    fig.suptitle("E2: 140 configs per workload, latency from replay tables", fontsize=10)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return path


def coupling_figure(table: pd.DataFrame, source: str, path: Path) -> Path:
    plt = pyplot()
    workloads = _workloads(table)
    fig, axes = plt.subplots(len(workloads), len(KNOBS), figsize=(14, 3.8 * len(workloads)), squeeze=False)
    for i, workload in enumerate(workloads):
        sub = table[(table["latency_source"] == source) & (table["workload"] == workload)]
        for j, knob in enumerate(KNOBS):
            ax = axes[i][j]
            values = sorted(sub[knob].unique())
            cmap = plt.get_cmap("plasma")
            for n, v in enumerate(values):
                part = sub[sub[knob] == v]
                idx = pareto_frontier(part["latency_mean_ms"], part["quality"])
                front = part.iloc[idx]
                x = np.append(front["latency_mean_ms"].to_numpy(), sub["latency_mean_ms"].max())
                y = np.append(front["quality"].to_numpy(), front["quality"].iloc[-1])
                ax.step(x, y, where="post", color=cmap(n / max(1, len(values) - 0.5)), lw=1.4, label=f"{knob}={v}")
                ax.plot(front["latency_mean_ms"], front["quality"], "o", ms=3, color=cmap(n / max(1, len(values) - 0.5)))
            ax.set_title(f"{_title(workload)}: {knob} fixed", fontsize=9)
            ax.set_xlabel("mean latency (ms)")
            ax.set_ylabel("frontier quality over the other two knobs")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7, loc="lower right")
    fig.suptitle(f"E2 coupling: frontier over two knobs at each value of the third; {SOURCE_LABELS.get(source, source)}", fontsize=10)
    return save_figure(fig, path, 130)


def gaps_figure(summary: dict, path: Path) -> Path:
    plt = pyplot()
    cases = summary["analysis"]["best_cases"]
    labels = [f"{c['workload'].replace('coco_2014_', '').replace('coco_', '')}\n{c['latency_source'].replace('-h100', '')}\n{c['fixed_knob']}"
              for c in cases]
    gaps = [c["max_abs_gap"] * QUALITY_POINTS for c in cases]
    lo = [c["bootstrap"]["ci95"][0] * QUALITY_POINTS * np.sign(c["signed_gap"]) for c in cases]
    hi = [c["bootstrap"]["ci95"][1] * QUALITY_POINTS * np.sign(c["signed_gap"]) for c in cases]
    lower = [g - min(a, b) for g, a, b in zip(gaps, lo, hi)]
    upper = [max(a, b) - g for g, a, b in zip(gaps, lo, hi)]
    fig, ax = plt.subplots(figsize=(max(6, 0.8 * len(cases)), 5))
    ax.bar(range(len(cases)), gaps, color="steelblue")
    ax.errorbar(range(len(cases)), gaps, yerr=[np.clip(lower, 0, None), np.clip(upper, 0, None)], fmt="none", ecolor="k", capsize=3)
    ax.axhline(summary["headline"]["bar_points"], color="crimson", ls="--", label=f"issue bar ({summary['headline']['bar_points']:g} points)")
    ax.set_xticks(range(len(cases)))
    ax.set_xticklabels([label.replace("\n", " / ") for label in labels], fontsize=7, rotation=35, ha="right")
    ax.set_ylabel("largest frontier gap at equal latency\n(quality points; 95% bootstrap CI)")
    ax.set_title("E2: how far fixing one knob moves the frontier over the other two (best pair of fixed values)", fontsize=9)
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    return save_figure(fig, path, 130)


def cases_figure(table: pd.DataFrame, summary: dict, path: Path) -> Path:
    plt = pyplot()
    analysis = summary["analysis"]
    source = _sources(table)[0]
    workloads = _workloads(table)
    fig, axes = plt.subplots(1, 1 + len(workloads), figsize=(5.2 * (1 + len(workloads)), 4.2), squeeze=False)
    axes = axes[0]
    # (a) a config on one workload's frontier and off the other's: both workloads, latency normalized by full
    ax = axes[0]
    cases = analysis["cross_workload"].get(source) or []
    for workload, colour in zip(workloads, ("tab:blue", "tab:orange")):
        sub = table[(table["latency_source"] == source) & (table["workload"] == workload)]
        full = sub.iloc[-1]
        ax.scatter(sub["latency_mean_ms"] / full["latency_mean_ms"], sub["quality"], s=8, alpha=0.35, color=colour)
        front = sub[sub["on_frontier"]].sort_values("latency_mean_ms")
        ax.step(front["latency_mean_ms"] / full["latency_mean_ms"], front["quality"], where="post", color=colour, label=f"{_title(workload)} frontier")
        if cases:
            c = cases[0]["config"]["config_index"]
            pt = sub[sub["config_index"] == c].iloc[0]
            ax.plot(pt["latency_mean_ms"] / full["latency_mean_ms"], pt["quality"], "*", ms=14, color=colour, mec="k")
    if cases:
        c = cases[0]
        ax.set_title(f"(a) ({c['config']['crops']},{c['config']['top_k']},{c['config']['active_blocks']}) on the {c['on_frontier_of']} frontier,\n"
                     f"{c['shortfall_points']:.1f} points below the {c['off_frontier_of']} frontier", fontsize=8.5)
    ax.set_xlabel("mean latency / full-config mean latency")
    ax.set_ylabel("mean quality")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    # (b) single-knob configs vs the best multi-knob configs at equal latency, per workload
    for ax, workload in zip(axes[1:], workloads):
        sub = table[(table["latency_source"] == source) & (table["workload"] == workload)]
        ax.scatter(sub["latency_mean_ms"], sub["quality"], s=8, alpha=0.3, color="grey", label="all configs")
        full = sub.iloc[-1]
        for knob, colour in zip(KNOBS, ("tab:green", "tab:purple", "tab:red")):
            others = [k for k in KNOBS if k != knob]
            path_rows = sub[(sub[others[0]] == sub[others[0]].max()) & (sub[others[1]] == sub[others[1]].max())]
            path_rows = path_rows.sort_values("latency_mean_ms")
            ax.plot(path_rows["latency_mean_ms"], path_rows["quality"], "-o", ms=3, color=colour, label=f"only {knob} reduced")
        front = sub[sub["on_frontier"]].sort_values("latency_mean_ms")
        ax.step(front["latency_mean_ms"], front["quality"], where="post", color="k", lw=1, label="frontier (all knobs)")
        best = (analysis["single_vs_multi"].get(f"{workload}|{source}") or [None])[0]
        if best:
            s, m = best["single"], best["multi"]
            ax.annotate("", xy=(m["latency_ms"], m["quality"]), xytext=(s["latency_ms"], s["quality"]),
                        arrowprops={"arrowstyle": "->", "color": "k"})
            ax.set_title(f"(b) {_title(workload)}: single-knob ({s['crops']},{s['top_k']},{s['active_blocks']}) vs\n"
                         f"multi-knob ({m['crops']},{m['top_k']},{m['active_blocks']}) at <= latency: +{best['gain_points']:.1f} points", fontsize=8.5)
        ax.plot(full["latency_mean_ms"], full["quality"], "k*", ms=10)
        ax.set_xlabel("mean latency (ms)")
        ax.set_ylabel("mean quality")
        ax.legend(fontsize=6.5, loc="lower right")
        ax.grid(alpha=0.3)
    fig.suptitle(f"E2 illustrative cases; {SOURCE_LABELS.get(source, source)}; configs as (crops, top_k, active_blocks)", fontsize=10)
    return save_figure(fig, path, 130)
