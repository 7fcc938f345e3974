"""Router mass in the top-k experts for one or more micro checkpoints (why top_k costs so little quality).

    python scripts/router_mass.py                                            # the shipped weights
    python scripts/router_mass.py --weights shipped runs/stage5/export/model.safetensors --out OUT.json

For every checkpoint: each of `--requests-per-family` procedural requests per family is prefilled at
the full configuration on the CPU (float32, plain path), and every block's gate logits are recorded;
the JSON holds (`flexvlm_env.model.routing.router_mass`), per block and over blocks, the mean share
of a token's router probability in its 1, 2, 4 and 8 heaviest experts and the size of the attention
and MoE updates against the residual stream, with the device, versions and sizes. A share near 1 at
k = 1 means top-1 computes nearly what top-8 does; a small MoE update means the experts carry
little at any width.
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
from flexvlm_env.model.routing import router_mass
from flexvlm_env.model.runtime import load_model
from flexvlm_env.tasks import FAMILIES, load_samples


@dataclass
class Args:
    weights: tuple[str, ...] = ("shipped",)
    """micro checkpoints (.safetensors files or directories); "shipped" is the packaged weights"""
    requests_per_family: int = 8
    """procedural requests per family"""
    split: str = "val"
    seed: int = 0
    ks: tuple[int, ...] = (1, 2, 4, 8)
    """the k of each reported share"""
    out: Path = Path("results/router_mass.json")

    def __post_init__(self) -> None:
        if self.requests_per_family < 1:
            raise ValueError(f"--requests-per-family={self.requests_per_family} must be >= 1")
        if not self.weights:
            raise ValueError("--weights is empty: name at least one checkpoint (or 'shipped')")


def main(args: Args) -> None:
    samples = [s for family in FAMILIES
               for s in load_samples(family, "procedural", args.split, n=args.requests_per_family, seed=args.seed)]
    results = []
    for weights in args.weights:
        started = time.perf_counter()
        vlm = load_model("micro", weights=None if weights == "shipped" else weights, device="cpu", dtype="float32")
        mass = router_mass(vlm, samples, Config(12, 8, 16), ks=args.ks)
        # Five decimals are far below the spread between requests; they keep the file small.
        per_block = {b: {k: ([round(x, 5) for x in v] if isinstance(v, list) else round(v, 5)) for k, v in stats.items()}
                     for b, stats in mass["per_block"].items()}
        results.append({"weights": weights, "sha256": vlm.weights_sha256, **mass, "per_block": per_block,
                        "wall_s": time.perf_counter() - started})
        shares = "  ".join(f"top-{k} {m:.3f}" for k, m in zip(mass["ks"], mass["mean_top_k_mass"]))
        print(f"{weights[-40:]:>40s}  sha {str(vlm.weights_sha256)[:8]}  router mass {shares}  |update|/|residual|: "
              f"attention {mass['median_attn_update_ratio']:.3f}, MoE {mass['median_moe_update_ratio']:.3f} (medians over blocks)  ({mass['tokens']} tokens per block)")
    report = {"args": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(args).items()},
              "config": [12, 8, 16], "requests": len(samples), "device": "cpu", "threads": torch.get_num_threads(),
              "machine": platform.machine(), "versions": {"torch": torch.__version__, "python": platform.python_version()},
              "results": results}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main(tyro.cli(Args))
