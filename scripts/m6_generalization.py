"""M6: generalization — a task family held out of controller training, recalibrated with n requests.

    python scripts/m6_generalization.py --quick     # one family, n in {0, 10}, a few seconds (smoke test)
    python scripts/m6_generalization.py             # doc_qa, coco_caption, science_qa_img; n in {0, 10, 25, 50}

For each held-out family: the LUT and the supervised controller are trained on the other eight
families' train half of the replay pool (`--latency` source, micro quality), then evaluated on the
held-out family's held-out half at every budget fraction, after recalibrating the family's budget
reference, latency-fraction table (guardrail row) and LUT row from n of its train requests
(`--draws` seeded draws per n); the baselines (full, single-knob, greedy) use the same
recalibrated guardrail. See `flexvlm_env.experiments.generalization` for how the held-out
family is presented to the controllers. CPU only (replay tables).

Writes to `--out-dir`: `m6_summary.json` (headline per method at each n, per family and fraction
detail, sources, arguments) and `figures/m6_*.png`.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path


from flexvlm_env.envs.core import DEFAULT_BUDGET_FRACTIONS, FAMILY_NAMES
from flexvlm_env.experiments import generalization as m6
from flexvlm_env.experiments.common import parse_script_args, quick_out_dir, run_header, write_json

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Args:
    quick: bool = False
    """one family, n in {0, 10}, one draw, 5 training epochs, 20 evaluation requests"""
    out_dir: Path = ROOT / "results"
    """where m6_summary.json goes (figures under out_dir/figures)"""
    families: tuple[str, ...] = ("doc_qa", "coco_caption", "science_qa_img")
    """families held out, one at a time"""
    ns: tuple[int, ...] = (0, 10, 25, 50)
    """recalibration sizes: profiled train requests of the held-out family (0: none)"""
    draws: int = 5
    """seeded draws of the n requests per n > 0"""
    latency: str = "molmoe-1b-h100"
    """replay latency source"""
    budget_fractions: tuple[float, ...] = tuple(DEFAULT_BUDGET_FRACTIONS)
    """budget fractions of the family's full-configuration latency"""
    epochs: int = 150
    """supervised controller training epochs"""
    quantile: float = 0.95
    """latency quantile of the guardrail's tables"""
    seed: int = 0
    """seed of the training, the draws and the evaluation"""


def validate(args: Args) -> None:
    unknown = sorted(set(args.families) - set(FAMILY_NAMES))
    if unknown or not args.families:
        raise ValueError(f"--families={args.families!r}: unknown {unknown}; allowed: {list(FAMILY_NAMES)}")
    if not args.ns or any(n < 0 or n > 100 for n in args.ns):
        raise ValueError(f"--ns={args.ns!r} must be non-empty integers in 0..100 (a family has 100 train requests)")
    if args.draws < 1 or args.epochs < 1:
        raise ValueError(f"--draws={args.draws!r} and --epochs={args.epochs!r} must be >= 1")
    if not 0 < args.quantile <= 1:
        raise ValueError(f"--quantile={args.quantile!r} must be in (0, 1]")


def main(args: Args) -> dict:
    quick_out_dir(args)
    validate(args)
    import torch

    from flexvlm_env.profiles import load_replay_data

    torch.set_num_threads(1)
    start = time.time()
    families = args.families[:1] if args.quick else args.families
    ns = tuple(n for n in args.ns if n <= 10)[:2] if args.quick else args.ns
    data = load_replay_data(latency=args.latency)
    results = {}
    for family in families:
        results[family] = m6.run_family(data, family, ns, 1 if args.quick else args.draws, args.budget_fractions,
                                        5 if args.quick else args.epochs, args.quantile, args.seed, 20 if args.quick else None)
        print(f"{family}: " + ", ".join(f"n={n} lut {r['methods']['lut']['mean']['quality_retention']:.3f}/"
                                        f"{r['methods']['lut']['mean']['violation_rate']:.3f}"
                                        for n, r in results[family]["by_n"].items()), flush=True)
    summary = {
        **run_header("m6", args, latency_source=args.latency, quality_source="micro", split="heldout half of the held-out family",
                     training="train half of the other eight families"),
        "ns": list(ns),
        "headline": {str(n): m6.headline(results, n) for n in ns},
        "families": results,
        "elapsed_s": round(time.time() - start, 1),
    }
    write_json(args.out_dir / "m6_summary.json", summary)
    summary["figures"] = [str(p) for p in m6.plot_from_results(args.out_dir)]
    top = summary["headline"][str(max(ns))]
    for name, m in top.items():
        print(f"n={max(ns)} {name:18s} retention {m['quality_retention']:.3f} violation {m['violation_rate']:.3f}")
    return summary


if __name__ == "__main__":
    main(parse_script_args(Args, validate))
