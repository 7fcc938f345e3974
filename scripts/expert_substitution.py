"""Which experts micro's answers need: task quality when every block's routed MoE update is replaced.

    python scripts/expert_substitution.py                                    # the shipped weights, CPU, 20 per family
    python scripts/expert_substitution.py --device cuda --requests-per-family 200 --out OUT.json

Every `--requests-per-family` procedural val request per family is answered greedily at the full
configuration once per substitution (`flexvlm_env.model.routing.expert_substitution`): `top<k>` keeps
the k heaviest experts at their router weights (`top8` is the model itself, `top1` what the width
knob's smallest value runs), `rank<r>` only the r-th heaviest at the heaviest's weight, `random` one
expert drawn per token at that weight, `zero` no MoE update. The model runs on its plain path
(float32; on CUDA without graphs and with the reference MoE), so the substitution applies to every
prefill and decode step. The JSON holds the mean and per-family quality of each substitution, the
device, versions and sizes; scores per request are left out (`--keep-scores` keeps them).
"""
from __future__ import annotations

import json
import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import tyro

from flexvlm_env.config import Config
from flexvlm_env.model.routing import expert_substitution
from flexvlm_env.model.runtime import load_model
from flexvlm_env.tasks import FAMILIES, load_samples


@dataclass
class Args:
    weights: str = "shipped"
    """micro checkpoint (.safetensors file or directory); "shipped" is the packaged weights"""
    substitutions: tuple[str, ...] = ("top8", "top4", "top2", "top1", "rank2", "rank4", "rank8", "random", "zero")
    """top<k>, rank<r>, random, zero (see flexvlm_env.model.routing.expert_substitution)"""
    requests_per_family: int = 20
    """procedural val requests per family"""
    split: str = "val"
    seed: int = 0
    """procedural seed; also seeds the random substitution's draws"""
    device: str = "cpu"
    """cpu or cuda (plain path either way)"""
    batch_size: int = 64
    """requests answered together"""
    keep_scores: bool = False
    """keep every request's score in the JSON"""
    out: Path = Path("results/expert_substitution.json")

    def __post_init__(self) -> None:
        if self.requests_per_family < 1:
            raise ValueError(f"--requests-per-family={self.requests_per_family} must be >= 1")
        if self.device not in ("cpu", "cuda"):
            raise ValueError(f"--device={self.device!r}: allowed 'cpu' or 'cuda'")


def main(args: Args) -> None:
    started = time.perf_counter()
    samples = [s for family in FAMILIES
               for s in load_samples(family, "procedural", args.split, n=args.requests_per_family, seed=args.seed)]
    vlm = load_model("micro", weights=None if args.weights == "shipped" else args.weights, device=args.device,
                     dtype="float32", use_cuda_graphs=False, moe_impl="reference")
    config = Config(12, 8, 16)
    out = expert_substitution(vlm, samples, config, args.substitutions, seed=args.seed, batch_size=args.batch_size)
    for name, result in out["substitutions"].items():
        lowest = min(result["per_family"].items(), key=lambda item: item[1])
        print(f"{name:>7s}  mean {result['mean']:.3f}  lowest family {lowest[0]} {lowest[1]:.3f}", flush=True)
        if not args.keep_scores:
            result.pop("scores")
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else (platform.processor() or platform.machine())
    report = {"args": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(args).items()},
              "weights_sha256": vlm.weights_sha256, **out, "device": f"{args.device} ({device_name})",
              "threads": torch.get_num_threads(), "dtype": "float32",
              "versions": {"torch": torch.__version__, "python": platform.python_version()},
              "wall_s": round(time.perf_counter() - started, 1)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {args.out} ({report['wall_s']} s)")


if __name__ == "__main__":
    main(tyro.cli(Args))
