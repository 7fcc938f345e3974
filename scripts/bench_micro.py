"""Request latency of the shipped `micro` model on real procedural requests (JSON out).

    python scripts/bench_micro.py --out results/bench_micro_cpu.json             # this CPU
    python scripts/bench_micro.py --device cuda --out results/bench_micro_h200.json
    python scripts/bench_micro.py --weights runs/micro224/export/model.safetensors --out ...  # another checkpoint

Unlike `bench_runtime.py` (one synthetic image, forced output length), this serves what the
environment serves: `--requests-per-family` procedural `val` requests of every family at one
configuration (default full), each answered greedily until EOS or the family's token budget.
Each request is run once untimed (on CUDA: graph capture) and then `--repeats` times timed.
Reports mean, median, P95, P99, std and CoV of the end-to-end latency, stage medians and the
output-length distribution; preprocessing is included in `total_ms`.
"""
from __future__ import annotations

import json
import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import tyro

import flexvlm_env
from flexvlm_env import Config, load_model
from flexvlm_env.benchmarking import device_info, distribution_summary
from flexvlm_env.model.timing import STAGE_FIELDS
from flexvlm_env.tasks import FAMILIES
from flexvlm_env.tasks.procedural import generate_samples


@dataclass
class Args:
    out: str = "results/bench_micro_cpu.json"
    """where to write the JSON results"""
    device: str = "cpu"
    """cpu or cuda"""
    weights: str | None = None
    """a micro checkpoint (.safetensors) to time instead of the shipped weights"""
    crops: int = 12
    top_k: int = 8
    active_blocks: int = 16
    requests_per_family: int = 5
    """val requests per family"""
    repeats: int = 3
    """timed runs per request"""
    threads: int = 0
    """torch CPU threads (0: default)"""


def main(args: Args) -> None:
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    vlm = load_model("micro", args.weights, device=device)
    config = Config(args.crops, args.top_k, args.active_blocks)
    samples = [s for f in FAMILIES for s in generate_samples(f, "val", args.requests_per_family)]
    records, outputs = [], []
    started = time.perf_counter()
    for sample in samples:
        vlm.generate(sample.image, sample.prompt, config, max_new_tokens=sample.max_new_tokens)
        for _ in range(args.repeats):
            result = vlm.generate(sample.image, sample.prompt, config, max_new_tokens=sample.max_new_tokens)
            records.append(result.latency)
        outputs.append(result.tokens.output)
    stages = STAGE_FIELDS
    result = {
        "benchmark": "micro request latency on procedural val requests",
        "device": device_info(device),
        "versions": {"flexvlm": flexvlm_env.__version__, "torch": torch.__version__, "python": platform.python_version()},
        "weights_sha256": vlm.weights_sha256,
        "config": {"crops": config.crops, "top_k": config.top_k, "active_blocks": config.active_blocks},
        "requests": len(samples),
        "repeats": args.repeats,
        "total_ms": distribution_summary([r.total_ms for r in records]),
        "stage_median_ms": {s: float(np.median([getattr(r, s) for r in records])) for s in stages},
        "output_tokens": distribution_summary(outputs),
        "args": asdict(args),
        "wall_s": time.perf_counter() - started,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    total = result["total_ms"]
    print(f"{result['device']['device_name']}: median {total['median']:.1f} ms, P95 {total['p95']:.1f} ms, "
          f"mean {total['mean']:.1f} ms over {total['n']} runs of {len(samples)} requests")


if __name__ == "__main__":
    main(tyro.cli(Args))
