"""E6: ablations (knobs, depth mask, guardrail, family input) and portability (task family, GPU).

    python scripts/e6_ablations.py --quick     # 90 held-out requests, 5 epochs, one recalibration draw (smoke test)
    python scripts/e6_ablations.py             # all 900 held-out requests (a few minutes on a CPU)

Controllers: the LUT and the supervised MLP with its guardrail, trained on the train half of the
replay pool (`--latency`, micro quality) and evaluated on the held-out half at every budget
fraction (see `flexvlm_env.experiments.ablations` for each ablation). Portability to another
GPU replays MolmoE-1B's H200 latency composed from `--h200-stages`, with the guardrail
recalibrated from `--recal-n` H200 points of the H100 stage estimator (fitted on
`--source-stages`), the points replayed from the H200 tables or measured (`--h200-validation`). The depth-mask and task-family parts read M5's and M6's summaries from
`--out-dir` when present (run those first); with the M5 quality tables in `--quality-dir`, the
LUT is also rerun on M5's sub-grid under each mask policy. No other MoE VLM exists here: the
summary says so. CPU only.

Writes to `--out-dir`: `e6_summary.json` (headlines, per-ablation metrics per budget fraction,
sources, arguments) and `figures/e6_*.png`.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path


from flexvlm_env.envs.core import DEFAULT_BUDGET_FRACTIONS
from flexvlm_env.experiments import ablations as e6
from flexvlm_env.experiments.common import parse_script_args, quick_out_dir, run_header, write_json

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Args:
    quick: bool = False
    """90 held-out requests, 5 training epochs, one recalibration draw, no mask-policy rerun"""
    out_dir: Path = ROOT / "results"
    """where e6_summary.json goes (and where m5_summary.json / m6_summary.json are read)"""
    latency: str = "molmoe-1b-h100"
    """replay latency source the controllers are trained and evaluated on"""
    budget_fractions: tuple[float, ...] = tuple(DEFAULT_BUDGET_FRACTIONS)
    """budget fractions of the family's full-configuration latency"""
    epochs: int = 150
    """supervised controller training epochs"""
    seed: int = 0
    """seed of training, evaluation and recalibration draws"""
    h200_stages: Path = ROOT / "results/device_tables/molmoe-1b_h200_stages.parquet"
    """MolmoE-1B stage table measured on the H200 (target GPU)"""
    h200_validation: Path = ROOT / "results/replay_latency_validation_molmoe-1b_h200.parquet"
    """end-to-end H200 measurements the recalibration draws from"""
    source_stages: Path = ROOT / "flexvlm_env/assets/profiles/molmoe-1b_h100_stages.parquet"
    """the source (H100) stage table the stage latency estimator is fitted on"""
    recal_n: int = 25
    """H200 measurements per recalibration"""
    recal_draws: int = 5
    """seeded recalibration draws (results averaged)"""
    quality_dir: Path = ROOT / "results/device_tables"
    """M5's per-policy quality tables (micro_quality_val_mask_*.parquet), for the mask-policy rerun"""


def validate(args: Args) -> None:
    for name in ("h200_stages", "h200_validation", "source_stages"):
        if not getattr(args, name).is_file():
            raise ValueError(f"--{name.replace('_', '-')}={getattr(args, name)} is not a file")
    if args.epochs < 1 or args.recal_draws < 1:
        raise ValueError(f"--epochs={args.epochs!r} and --recal-draws={args.recal_draws!r} must be >= 1")
    if args.recal_n < 2:
        raise ValueError(f"--recal-n={args.recal_n!r} must be >= 2 (an affine map needs two points)")
    if not args.budget_fractions or any(not 0 < f <= 10 for f in args.budget_fractions):
        raise ValueError(f"--budget-fractions={args.budget_fractions!r} must be non-empty numbers in (0, 10]")


def read_summary(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.exists() else None


def main(args: Args) -> dict:
    quick_out_dir(args)
    validate(args)
    import gymnasium as gym
    import torch

    import flexvlm_env  # noqa: F401  (registers the env ids)
    from agents.profiles import ProfileTables
    from flexvlm_env.profiles import load_replay_data

    torch.set_num_threads(1)
    start = time.time()
    fractions = tuple(args.budget_fractions)
    epochs = 5 if args.quick else args.epochs
    eval_requests = 90 if args.quick else None
    data = load_replay_data(latency=args.latency)
    profiles = ProfileTables.from_replay(data, "train")
    env = gym.make("FlexVLMReplay-v0", data=data, split="heldout", episode_length=1, budget_fractions=fractions)

    knobs = e6.knob_ablation(profiles, env, fractions, epochs, args.seed, eval_requests)
    print("knobs done", round(time.time() - start), "s", flush=True)
    switches = e6.switch_ablation(profiles, env, fractions, epochs, args.seed, eval_requests)
    print("switches done", round(time.time() - start), "s", flush=True)
    target = e6.h200_replay_data(args.h200_stages)
    target_env = gym.make("FlexVLMReplay-v0", data=target, split="heldout", episode_length=1, budget_fractions=fractions)
    port = e6.portability_gpu(profiles, env, target, target_env, fractions, epochs, args.seed, e6.source_estimator(args.source_stages),
                              args.h200_validation, args.recal_n, 1 if args.quick else args.recal_draws, eval_requests)
    keys = [f"{f:g}" for f in fractions]
    baselines = ["tokens_only", "depth_only", "width_only", "greedy"]
    port_gains = {setting: {m: e6.gains(r, m, baselines, keys) for m in ("lut", "supervised")} for setting, r in port.items()}
    h100 = "h100 (trained here)"
    retained = {setting: {m: {b: (g[m][b]["mean"]["quality_retention"] / port_gains[h100][m][b]["mean"]["quality_retention"]
                                  if port_gains[h100][m][b]["mean"]["quality_retention"] else None) for b in baselines}
                          for m in ("lut", "supervised")} for setting, g in port_gains.items() if setting != h100}
    print("portability done", round(time.time() - start), "s", flush=True)

    m5 = read_summary(args.out_dir / "m5_summary.json")
    mask = {"m5_gaps": m5["gaps"] if m5 else None, "m5_quality_source": m5["quality_source"] if m5 else None}
    tables = [args.quality_dir / f"micro_quality_val_mask_{p}.parquet" for p in ("prefix", "random0", "random1")]
    if not args.quick and all(t.exists() for t in tables):
        from flexvlm_env.experiments.mask_policy import load_quality_tables

        frame = load_quality_tables(ROOT / "flexvlm_env/assets/profiles/micro_quality_val.parquet", args.quality_dir)
        mask["lut_on_m5_sub_grid"] = e6.mask_policy_system(data, frame, fractions, args.seed, eval_requests)
    else:
        mask["lut_on_m5_sub_grid"] = None
        mask["note"] = "M5's per-policy quality tables were not all present (or --quick): no system-level rerun"
    m6 = read_summary(args.out_dir / "m6_summary.json")
    family = ({"source": "m6_summary.json", "ns": m6["ns"], "headline": m6["headline"],
               "held_out_families": list(m6["families"])} if m6 else None)

    full = knobs["lut"]["all"]["mean"]
    summary = {
        **run_header("e6", args, latency_source=args.latency, quality_source="micro", split="heldout",
                     target_gpu_latency=f"molmoe-1b@NVIDIA H200 composed from {args.h200_stages.name}",
                     controllers="LUT (agents.lut) and supervised MLP + guardrail (agents.supervised), trained on the train half"),
        "headline": {
            "lut_all_knobs_mean": full,
            "best_single_knob_lut": max((k for k in ("crops", "top_k", "active_blocks")), key=lambda k: knobs["lut"][k]["mean"]["quality_retention"]
                                        - 10 * max(0.0, knobs["lut"][k]["mean"]["violation_rate"] - full["violation_rate"])),
            "guardrail_off_minus_on": {k: switches["supervised (guardrail off)"]["mean"][k] - switches["supervised (guardrail on, family on)"]["mean"][k]
                                       for k in ("quality_retention", "violation_rate")},
            "family_off_minus_on_lut": {k: switches["lut (family off)"]["mean"][k] - switches["lut (family on)"]["mean"][k]
                                        for k in ("quality_retention", "violation_rate")},
            "family_off_minus_on_supervised": {k: switches["supervised (family off)"]["mean"][k] - switches["supervised (guardrail on, family on)"]["mean"][k]
                                               for k in ("quality_retention", "violation_rate")},
            # per setting and controller: (retention, violation) minus greedy's, and the controller's own violation rate
            "gain_over_greedy": {st: {m: {"quality_retention_delta": g[m]["greedy"]["mean"]["quality_retention"],
                                          "violation_rate_delta": g[m]["greedy"]["mean"]["violation_rate"],
                                          "violation_rate": port[st][m]["mean"]["violation_rate"]} for m in g}
                                 for st, g in port_gains.items()},
            "lut_on_m5_sub_grid_retention": ({k: v["mean"]["quality_retention"] for k, v in mask["lut_on_m5_sub_grid"].items()}
                                             if mask["lut_on_m5_sub_grid"] else None),
        },
        "knobs": knobs,
        "knob_deltas": e6.knob_deltas(knobs),
        "switches": switches,
        "depth_mask": mask,
        "portability_gpu": {"results": port, "gains_over_baselines": port_gains, "retained_retention_gain": retained,
                            "stage_medians": {"h100": e6.stage_medians(data), "h200": e6.stage_medians(target)},
                            "recalibration": {"method": "per_stage_affine (E3)", "n": args.recal_n,
                                              "draws": 1 if args.quick else args.recal_draws,
                                              "measurements": args.h200_validation.name, "source_estimator": f"StageLatencyEstimator fitted on {args.source_stages.name}"}},
        "portability_task_family": family,
        "portability_other_moe_vlm": "not run: no other MoE VLM is available in this repository (only the MolmoE topology: "
                                     "presets micro and molmoe-1b); nothing was substituted for it",
        "elapsed_s": round(time.time() - start, 1),
    }
    write_json(args.out_dir / "e6_summary.json", summary)
    summary["figures"] = [str(p) for p in e6.plot_from_results(args.out_dir)]
    for controller, subsets in knobs.items():
        for name, r in subsets.items():
            print(f"{controller:10s} {name:22s} retention {r['mean']['quality_retention']:.3f} violation {r['mean']['violation_rate']:.3f} "
                  f"p95 {r['mean']['latency_p95_ms']:.2f} ms")
    for name, r in switches.items():
        print(f"{name:40s} retention {r['mean']['quality_retention']:.3f} violation {r['mean']['violation_rate']:.3f}")
    for setting, r in port.items():
        print(setting, {m: (round(v["mean"]["quality_retention"], 3), round(v["mean"]["violation_rate"], 3)) for m, v in r.items()})
    return summary


if __name__ == "__main__":
    main(parse_script_args(Args, validate))
