"""Which kernels a decode token spends its device time in (PyTorch profiler), per configuration.

    python scripts/profile_decode.py --preset molmoe-1b --weights random --out results/profile_decode_h100.json
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import tyro
from PIL import Image

from flexvlm_env import Config, load_model
from flexvlm_env.benchmarking import device_info, profile_decode_kernels


@dataclass
class Args:
    preset: str = "molmoe-1b"
    """model preset"""
    weights: str = "random"
    """checkpoint or 'random'"""
    configs: str = "12,8,16;12,1,16;12,8,8"
    """semicolon-separated crops,top_k,active_blocks triples"""
    steps: int = 20
    """profiled decode steps per config"""
    top: int = 15
    """kernels printed per config"""
    out: str = "results/profile_decode_h100.json"
    """JSON output"""


def main() -> None:
    args = tyro.cli(Args, description=__doc__.splitlines()[0])
    if not torch.cuda.is_available():
        raise SystemExit("profile_decode.py needs a CUDA device")
    vlm = load_model(args.preset, weights=args.weights, device="cuda")
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (768, 1024, 3), dtype=np.uint8))
    prompt = "What is the color of the large circle in the picture? Answer briefly."
    results = {}
    for triple in args.configs.split(";"):
        crops, top_k, blocks = (int(x) for x in triple.split(","))
        rows = profile_decode_kernels(vlm, image, prompt, Config(crops=crops, top_k=top_k, active_blocks=blocks), args.steps)
        total = sum(r["us_per_token"] for r in rows)
        print(f"\n{args.preset} crops={crops} top_k={top_k} blocks={blocks}: {total:.0f} us of kernels per token, "
              f"{sum(r['calls_per_token'] for r in rows):.0f} launches")
        for r in rows[: args.top]:
            print(f"  {r['us_per_token']:8.1f} us  {r['calls_per_token']:5.1f}x  {r['kernel'][:90]}")
        results[triple] = {"kernel_us_per_token": total, "rows": rows}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"args": asdict(args), "device_info": device_info(torch.device("cuda")), "results": results}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
