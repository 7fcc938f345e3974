"""M5: depth mask policy — importance vs prefix vs random block masks at each active-block count.

    python scripts/m5_mask_policy.py --quick                  # CPU, micro, seconds (smoke test)
    python scripts/m5_mask_policy.py                          # full analysis (+ CPU latency measurement)
    python scripts/m5_mask_policy.py --latency-only --device cuda --out-dir "$OUT/m5"   # GPU step

Quality: the full mode reads the shipped micro quality table (importance policy) and the GPU
sweeps' tables `<quality-dir>/micro_quality_val_mask_{prefix,random0,random1}.parquet` (same
requests, a crops x top_k x active_blocks sub-grid), restricted to the keys all four share. The
quick mode answers 1 request per family at 3 configs under every policy here instead.
Latency: measured on `--device` with micro (batch 1, forced output length, policies
interleaved), unless `--no-measure-latency`; every `m5_latency_*.json` in `--out-dir` (e.g. one
fetched from the GPU step) enters the summary. The frontier's latency is the replay source's.

Writes to `--out-dir`: `m5_summary.json` (headline numbers, sources, devices, arguments),
`m5_per_config.json` (mean quality and replay latency per policy and config),
`m5_latency_<device>.json` (the timed runs) and `figures/m5_*.png`.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path


from flexvlm_env.experiments import mask_policy as m5
from flexvlm_env.experiments.common import parse_script_args, quick_out_dir, run_header, write_json

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Args:
    quick: bool = False
    """answer a tiny quality table here (1 request per family, 3 configs) and time few runs"""
    out_dir: Path = ROOT / "results"
    """where the JSON files go (figures under out_dir/figures)"""
    device: str = "cpu"
    """device of the latency measurement (and of the quick mode's quality answers): cpu or cuda"""
    quality_dir: Path = ROOT / "results/device_tables"
    """folder holding micro_quality_val_mask_{prefix,random0,random1}.parquet (full mode)"""
    shipped_quality: Path = ROOT / "flexvlm_env/assets/profiles/micro_quality_val.parquet"
    """the importance-policy quality table"""
    frontier_latency: str = "molmoe-1b-h100"
    """replay latency source of the frontier (`load_replay_data(latency=...)`)"""
    policies: tuple[str, ...] = tuple(m5.POLICIES)
    """mask policies compared (labels: importance, prefix, random0, random1); importance is required"""
    latency_only: bool = False
    """only measure latency and write m5_latency_<device>.json (the GPU step)"""
    measure_latency: bool = True
    """measure latency vs blocks per policy on --device (False: use the m5_latency_*.json files present)"""
    latency_requests: int = 4
    """requests (first of each family in order) timed per (policy, block count)"""
    latency_repeats: int = 5
    """timed rounds (each times every request x block count x policy once)"""
    latency_warmup: int = 2
    """untimed rounds first"""
    output_tokens: int = 16
    """forced output length of the timed runs"""
    max_minutes: float = 2.0
    """stop the latency measurement cleanly (between rounds) after this many minutes"""


def validate(args: Args) -> None:
    if args.device not in ("cpu", "cuda") and not args.device.startswith("cuda:"):
        raise ValueError(f"--device={args.device!r}; allowed: cpu, cuda, cuda:N")
    for name in ("latency_requests", "latency_repeats", "output_tokens"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')}={getattr(args, name)!r} must be >= 1")
    if args.latency_warmup < 0:
        raise ValueError(f"--latency-warmup={args.latency_warmup!r} must be >= 0")
    if args.max_minutes <= 0:
        raise ValueError(f"--max-minutes={args.max_minutes!r} must be > 0")
    unknown = sorted(set(args.policies) - set(m5.POLICIES))
    if unknown or "importance" not in args.policies or len(args.policies) < 2:
        raise ValueError(f"--policies={args.policies!r}: unknown {unknown}; allowed: {list(m5.POLICIES)}, "
                         "importance and at least one other")
    if args.latency_only and not args.measure_latency:
        raise ValueError("--latency-only with --no-measure-latency would do nothing")


def main(args: Args) -> dict:
    quick_out_dir(args)
    validate(args)
    import torch

    from flexvlm_env import load_model
    from flexvlm_env.benchmarking import device_info
    from flexvlm_env.config import KnobGrid
    from flexvlm_env.profiles.sweeps import RequestPool

    start = time.time()
    torch.set_num_threads(1) if args.device == "cpu" else None
    vlm = None
    if args.quick or args.measure_latency:
        vlm = load_model("micro", device=args.device)
    blocks = (8, 12, 16) if args.quick else KnobGrid().active_blocks
    if args.measure_latency:
        requests = RequestPool(per_family=1).samples()[: 1 if args.quick else args.latency_requests]
        records = m5.measure_latency(vlm, requests, blocks, args.policies, output_tokens=4 if args.quick else args.output_tokens,
                                     warmup=1 if args.quick else args.latency_warmup,
                                     repeats=2 if args.quick else args.latency_repeats,
                                     deadline_s=time.time() + 60 * args.max_minutes)
        info = device_info(vlm.device)
        tag = "cpu" if args.device == "cpu" else "cuda"
        write_json(args.out_dir / f"m5_latency_{tag}.json",
                   {"device": info.get("device_name") or info.get("cpu"), "device_info": info, "preset": "micro",
                    "crops": 1, "top_k": 8, "output_tokens": 4 if args.quick else args.output_tokens,
                    "requests": [r.request_id for r in requests], "records": records})
        if args.latency_only:
            print(f"wrote {args.out_dir / f'm5_latency_{tag}.json'} ({len(records)} timed runs, {time.time() - start:.0f} s)")
            return {}
    latency = {}
    for path in sorted(args.out_dir.glob("m5_latency_*.json")):
        data = json.loads(path.read_text())
        latency[path.stem.removeprefix("m5_")] = {"device": data["device"], "file": path.name,
                                                 "n_timed_runs": len(data["records"]),
                                                 "by_blocks": m5.latency_summary(data["records"])}
    if args.quick:
        from flexvlm_env.config import Config

        samples = RequestPool(per_family=1).samples()
        frame = m5.answer_quality_table(vlm, samples, [Config(crops=1, top_k=8, active_blocks=b) for b in blocks], args.policies)
        quality_source = f"micro answered here ({len(samples)} val requests, crops 1, top_k 8)"
    else:
        frame = m5.load_quality_tables(args.shipped_quality, args.quality_dir, args.policies)
        quality_source = (f"micro quality: {args.shipped_quality.name} (importance) and "
                          f"{', '.join(m5.device_table_path(args.quality_dir, p).name for p in args.policies if p != 'importance')}")
    configs = sorted({(int(c), int(k), int(b)) for c, k, b in frame[["crops", "top_k", "active_blocks"]].itertuples(index=False)})
    config_latency = m5.replay_config_latency(args.frontier_latency, configs, sorted(frame["request_id"].unique()))
    rows = m5.per_config(frame, config_latency)
    randoms = [p for p in args.policies if p.startswith("random")]
    gaps = {}
    if "prefix" in args.policies:
        gaps["importance_minus_prefix"] = m5.paired_gap(frame, "importance", ["prefix"])
    if randoms:
        gaps["importance_minus_random"] = m5.paired_gap(frame, "importance", randoms)
    some = next(iter(gaps.values()))
    reduced = [b for b in some if int(b) < max(int(k) for k in some)]
    summary = {
        **run_header("m5", args, quality_source=quality_source, frontier_latency_source=args.frontier_latency),
        "policies": {k: {"mask_policy": p, "mask_seed": s} for k, (p, s) in m5.POLICIES.items()},
        "n_requests": int(frame["request_id"].nunique()),
        "sub_grid": {"crops": sorted({c for c, _, _ in configs}), "top_k": sorted({k for _, k, _ in configs}),
                     "active_blocks": sorted({b for _, _, b in configs})},
        "quality_by_blocks": m5.quality_by_blocks(frame),
        "gaps": gaps,
        **{f"importance_beats_{name.split('_minus_')[1]}_at_every_reduced_block_count": all(g[b]["gap"] > 0 for b in reduced)
           for name, g in gaps.items()},
        "latency": latency,
        "latency_max_rel_diff_across_policies": {k: {"paired": max(v["max_rel_diff_paired"] for v in lat["by_blocks"].values()),
                                                     "of_medians": max(v["max_rel_diff_median"] for v in lat["by_blocks"].values()),
                                                     "max_cov": max(p["cov"] for v in lat["by_blocks"].values() for p in v["per_policy"].values()),
                                                     "device": lat["device"]}
                                                 for k, lat in latency.items()},
        "frontier": m5.frontier_summary(rows),
        "elapsed_s": round(time.time() - start, 1),
    }
    write_json(args.out_dir / "m5_per_config.json", {"experiment": "m5", "rows": rows})
    write_json(args.out_dir / "m5_summary.json", summary)
    summary["figures"] = [str(p) for p in m5.plot_from_results(args.out_dir)]
    for name, g in gaps.items():
        print(name, {b: round(v["gap"], 4) for b, v in g.items()})
    print("latency max rel diff across policies:", summary["latency_max_rel_diff_across_policies"])
    return summary


if __name__ == "__main__":
    main(parse_script_args(Args, validate))
