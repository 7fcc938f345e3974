"""M1: prefill-heavy (QA) vs decode-heavy (captioning) workloads (issue 10; ../shared/EXPERIMENTS.md
"M1 — Prefill-heavy vs decode-heavy workloads"; logic in `flexvlm_env.experiments.workloads`, whose
docstring defines every quantity).

Same data as E2 (recorded tables, CPU only): the `micro` quality table of the pool
(`--quality-table`, default the 500-per-family coco_2014_vqa / coco_caption sweep in
results/device_tables/ when present, else the shipped 200 per family), its request table, and per
latency source the stage tables or measured per-request table. The per-knob sensitivity table
also covers all nine families of the shipped tables (`--nine-families`).

Writes into `--out-dir`:
- `m1_summary.json`: run header (sources, devices, versions, arguments), stage breakdowns,
  full-config latency distributions, per-knob savings and the expectation's verdict per source;
- `m1_configs.parquet` (per-config quality/latency of the two workloads), `m1_requests.parquet`
  (per-request full-config latency and stages), `m1_sensitivity.parquet` (per family, source,
  knob and stage);
- `figures/m1_*.png` (rebuilt from those files by `plot_from_results`).

    python scripts/m1_workloads.py            # full
    python scripts/m1_workloads.py --quick    # shipped tables, 40 requests per family
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


from flexvlm_env.experiments import knob_coupling as e2
from flexvlm_env.experiments import workloads as m1
from flexvlm_env.experiments.common import parse_script_args, quick_out_dir, run_header, write_json

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Args:
    quality_table: Path | None = None
    """micro quality table of the pool; default: the 500-per-family sweep in results/device_tables/
    if present, else the shipped 200-per-family table (always the shipped one with --quick)"""
    requests_table: Path | None = None
    """request table of the same pool; default: the 500-per-family one if present, else the shipped one"""
    families: tuple[str, ...] = e2.DEFAULT_FAMILIES
    """QA family first, captioning family second"""
    latency: tuple[str, ...] = ("molmoe-1b-h100", "micro-h200-measured", "micro-h200")
    """latency sources (see knob_coupling.LATENCY_CHOICES); micro-h200 (composed) is free of the
    per-config measurement noise of micro-h200-measured"""
    per_family: int | None = None
    """use each family's first N requests of the pool (default: all)"""
    nine_families: bool = True
    """also the per-knob sensitivity of all nine families of the shipped tables"""
    quick: bool = False
    """shipped tables, 40 requests per family (seconds on a CPU)"""
    out_dir: Path = ROOT / "results"
    """where m1_summary.json, the m1_*.parquet files and figures/ are written"""


def resolve(args: Args) -> Args:
    e2.pool_and_validation(args)
    return args


def main(args: Args) -> dict:
    import pandas as pd

    from flexvlm_env.profiles import load_replay_data

    quick_out_dir(args)
    args = resolve(args)
    qa, caption = args.families
    configs, requests, sensitivity = [], [], []
    sources, breakdown, distributions, verdicts = {}, {}, {}, {}
    for source in args.latency:
        data, info = e2.load_pool(args.quality_table, args.requests_table, args.families, source, args.per_family)
        sources[source] = info
        pool_sens = []
        for family in args.families:
            configs.append(e2.config_stats(data, family, source))
            frame = m1.request_latencies(data, family, source)
            requests.append(frame)
            breakdown[f"{family}|{source}"] = m1.stage_breakdown(data, family)
            distributions[f"{family}|{source}"] = m1.latency_distribution(frame)
            pool_sens.append(m1.knob_sensitivity(data, family, source).assign(scope="pool"))
        pool_sens = pd.concat(pool_sens, ignore_index=True)
        verdicts[source] = m1.expectation(pool_sens, qa, caption)
        sensitivity.append(pool_sens)
        if args.nine_families:
            shipped = load_replay_data("micro", source)
            families = sorted(set(shipped.families))
            nine = pd.concat([m1.knob_sensitivity(shipped, f, source) for f in families], ignore_index=True)
            sensitivity.append(nine.assign(scope="nine_families"))
            sources[f"{source} (nine families)"] = {"replay": f"load_replay_data('micro', '{source}')",
                                                    "n_requests": shipped.n_requests, "families": families}
    sensitivity = pd.concat(sensitivity, ignore_index=True)
    summary = {**run_header("m1", args, data_sources=sources, workloads=list(args.families),
                            n_requests_per_family={f: int(c["n_requests"].iloc[0]) for c in configs[:2] for f in c["workload"].unique()}),
               "headline": {"expectation": verdicts,
                            "decode_share_full_config": {k: v["full_config"]["decode_share"] for k, v in breakdown.items()},
                            "prefill_side_share_full_config": {k: v["full_config"]["prefill_side_share"] for k, v in breakdown.items()},
                            "full_config_latency_ms": {k: {s: v["total_ms"][s] for s in ("mean", "median", "p95", "p99", "cov")}
                                                       for k, v in distributions.items()}},
               "stage_breakdown": breakdown, "latency_distributions": distributions,
               "sensitivity_total": sensitivity[sensitivity["stage"] == "total"].drop(columns=["stage"]).to_dict(orient="records")}
    args.out_dir.mkdir(parents=True, exist_ok=True)
    pd.concat(configs, ignore_index=True).to_parquet(args.out_dir / m1.CONFIGS_FILE, index=False)
    pd.concat(requests, ignore_index=True).to_parquet(args.out_dir / m1.REQUESTS_FILE, index=False)
    sensitivity.to_parquet(args.out_dir / m1.SENSITIVITY_FILE, index=False)
    write_json(args.out_dir / m1.SUMMARY_FILE, summary)
    for path in m1.plot_from_results(args.out_dir):
        print("wrote", path)
    for source, v in verdicts.items():
        print(f"{source}: QA savings {({k: round(x, 3) for k, x in v['saving_qa'].items()})}, captioning savings "
              f"{({k: round(x, 3) for k, x in v['saving_captioning'].items()})}; QA prefill-sensitive {v['qa_prefill_sensitive']}, "
              f"captioning decode-sensitive {v['captioning_decode_sensitive']}")
    return summary


if __name__ == "__main__":
    main(parse_script_args(Args, resolve))
