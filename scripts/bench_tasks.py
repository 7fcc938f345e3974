"""Measure procedural task generation throughput (samples/s per family) on one CPU core.

    python scripts/bench_tasks.py --out results/bench_tasks_cpu.json --samples 500

The process is pinned to one core (where the OS allows it) so the number is a per-core rate.
Each family gets a warm-up, then `--repeats` timed runs of `--samples` samples; the median run is
reported. The JSON carries the CPU, the library versions and the generator version.
"""
from __future__ import annotations

import json
import os
import platform
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import tyro
import PIL

import flexvlm_env
from flexvlm_env.tasks import FAMILIES
from flexvlm_env.tasks.procedural import GENERATOR_VERSION, generate_sample


@dataclass
class Args:
    out: str = "results/bench_tasks_cpu.json"
    """where to write the JSON results"""
    samples: int = 500
    """samples per timed run"""
    repeats: int = 3
    """timed runs per family (the median is reported)"""
    warmup: int = 20
    """untimed samples per family first (font cache, imports)"""
    split: str = "train"
    """split to generate"""
    seed: int = 0
    """procedural seed"""
    pin_core: bool = True
    """pin the process to one CPU core"""


def parse_args() -> Args:
    return tyro.cli(Args, description=__doc__.splitlines()[0])


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main(args: Args) -> None:
    pinned_core = None
    if args.pin_core and hasattr(os, "sched_setaffinity"):
        pinned_core = min(os.sched_getaffinity(0))
        os.sched_setaffinity(0, {pinned_core})
    results = {}
    for family in FAMILIES:
        for index in range(args.warmup):
            generate_sample(family, args.split, 10**9 + index, args.seed)
        run_s = []
        for repeat in range(args.repeats):
            start = time.perf_counter()
            for index in range(repeat * args.samples, (repeat + 1) * args.samples):
                generate_sample(family, args.split, index, args.seed)
            run_s.append(time.perf_counter() - start)
        median_s = statistics.median(run_s)
        results[family] = {
            "samples_per_s": round(args.samples / median_s, 1),
            "mean_ms_per_sample": round(1000 * median_s / args.samples, 3),
        }
        print(f"{family:16s} {results[family]['samples_per_s']:8.1f} samples/s  {results[family]['mean_ms_per_sample']:.3f} ms/sample")
    report = {
        "benchmark": "procedural task generation, one CPU core",
        "cpu": cpu_name(),
        "pinned_core": pinned_core,
        "python": platform.python_version(),
        "numpy": np.__version__,
        "pillow": PIL.__version__,
        "flexvlm": flexvlm_env.__version__,
        "generator_version": GENERATOR_VERSION,
        "args": asdict(args),
        "results": results,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main(parse_args())
