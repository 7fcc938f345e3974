"""E2: knob coupling and Pareto structure on a QA and a captioning workload (issue 10;
../shared/EXPERIMENTS.md "E2 — Knob coupling and Pareto structure"; logic in
`flexvlm_env.experiments.knob_coupling`, whose docstring defines every quantity).

Reads recorded tables only (CPU, no model runs): the `micro` quality table of the pool
(`--quality-table`; by default the 500-per-family sweep of coco_2014_vqa and coco_caption in
results/device_tables/ when present, else the shipped 200-per-family table), its request table
(token counts; `flexvlm-profile request-table`) and, per latency source, the stage tables
(composed with `build_replay_data`) or the measured per-request table.

Writes into `--out-dir`:
- `e2_summary.json`: run header (data sources, devices, versions, arguments), headline numbers
  (largest frontier gap at equal latency and the issue's 5-point bar, illustrative cases) and the
  full analysis (per workload x latency source x fixed knob: frontiers, pairwise gaps, bootstrap);
- `e2_configs.parquet`: per (workload, latency source, config) quality and latency mean/P95/P99;
- `figures/e2_*.png` (rebuilt from those two files by `plot_from_results`).

    python scripts/e2_knob_coupling.py                # full: every request of the pool
    python scripts/e2_knob_coupling.py --quick        # shipped tables, 40 requests per family
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


from flexvlm_env.experiments import knob_coupling as e2
from flexvlm_env.experiments.common import parse_script_args, quick_out_dir, run_header, write_json

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Args:
    quality_table: Path | None = None
    """micro quality table (columns of micro_quality_val.parquet); default: the 500-per-family sweep
    in results/device_tables/ if present, else the shipped 200-per-family table (always the shipped
    one with --quick)"""
    requests_table: Path | None = None
    """request table of the same pool (token counts); default: the 500-per-family table in
    results/device_tables/ if present (a superset of the shipped pool's two families), else the shipped one"""
    families: tuple[str, ...] = e2.DEFAULT_FAMILIES
    """the two workloads compared (QA first, captioning second)"""
    latency: tuple[str, ...] = ("molmoe-1b-h100", "micro-h200-measured")
    """latency sources: molmoe-1b-h100 (composed, the main one), molmoe-1b-h200 (composed, the current
    engine), micro-h200-measured (measured where recorded, else composed), micro-h200 (composed)"""
    per_family: int | None = None
    """use each family's first N requests of the pool (default: all of them)"""
    n_boot: int = 1000
    """bootstrap resamples of requests for each best case's gap interval"""
    bar_points: float = 5.0
    """the issue's bar: a frontier moved by at least this many quality points at equal latency"""
    seed: int = 0
    """bootstrap seed"""
    quick: bool = False
    """shipped tables, 40 requests per family, 20 bootstrap resamples (seconds on a CPU)"""
    out_dir: Path = ROOT / "results"
    """where e2_summary.json, e2_configs.parquet and figures/ are written"""


def resolve(args: Args) -> Args:
    """Fill defaults (quick and data paths) and reject bad arguments with a clear message."""
    if args.quick:
        args.n_boot = min(args.n_boot, 20)
    e2.pool_and_validation(args)
    if args.n_boot < 1:
        raise SystemExit(f"--n-boot={args.n_boot}: must be >= 1")
    if args.bar_points <= 0:
        raise SystemExit(f"--bar-points={args.bar_points}: must be > 0")
    return args


def main(args: Args) -> dict:
    import pandas as pd

    quick_out_dir(args)
    args = resolve(args)
    from flexvlm_env.profiles.replay import request_split_mask

    tables, matrices, sources, splits, grid = {}, {}, {}, {}, None
    for source in args.latency:
        data, info = e2.load_pool(args.quality_table, args.requests_table, args.families, source, args.per_family)
        grid = data.grid
        sources[source] = info
        for family in args.families:
            tables[(family, source)] = e2.config_stats(data, family, source)
            rows = [f == family for f in data.families]
            matrices[(family, source)] = (data.quality[rows], data.total_ms[rows].astype(float))
            ids = [i for i, f in zip(data.request_ids, data.families) if f == family]
            # the replay pool's train/held-out halves (hash of the id): select on one, check on the other
            splits[family] = request_split_mask(ids, [family] * len(ids), "train")
    analysis = e2.analyze(tables, matrices, grid, args.n_boot, args.seed, splits)
    summary = {**run_header("e2", args, data_sources=sources,
                            n_requests_per_family={f: int(tables[(f, args.latency[0])]["n_requests"].iloc[0]) for f in args.families},
                            latency_axis="mean latency over the workload's requests (ms); frontiers on (mean latency, mean quality)",
                            quality="micro model's family metric, mean over requests, in [0, 1]; 1 point = 0.01"),
               "headline": e2.headline(analysis, tables, args.bar_points), "analysis": analysis}
    args.out_dir.mkdir(parents=True, exist_ok=True)
    pd.concat(tables.values(), ignore_index=True).to_parquet(args.out_dir / e2.CONFIGS_FILE, index=False)
    write_json(args.out_dir / e2.SUMMARY_FILE, summary)
    for path in e2.plot_from_results(args.out_dir):
        print("wrote", path)
    h = summary["headline"]
    case = h["largest_gap_case"]
    print(f"largest frontier gap: {h['largest_gap_points']:.2f} points ({case['workload']}, {case['latency_source']}, "
          f"{case['fixed_knob']} {case['fixed_a']} vs {case['fixed_b']} at {case['at_latency_ms']:.2f} ms); bar met: {h['bar_met']}")
    return summary


if __name__ == "__main__":
    main(parse_script_args(Args, resolve))
