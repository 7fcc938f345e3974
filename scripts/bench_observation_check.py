"""What checking an observation against the observation space adds to a batch-1 decision.

    python scripts/bench_observation_check.py --out results/bench_observation_check_cpu.json

Every controller refuses observations outside the env's observation space (`agents.base.as_batch`;
the PPO and LM batch-1 paths through `is_single_observation`). Timed on `--observations` held-out
replay observations, batch 1: the check alone (`_valid_single`), `as_batch` and
`is_single_observation` (which include it), and a whole `select_config` of the `full` baseline and
of the LUT fitted on the train profiles, for scale. Each figure is the best of `--repeats` runs of
`--number` calls per observation set, in microseconds per call (the best run is the one least
disturbed by the rest of the machine; the medians of single calls are in M3).
"""
from __future__ import annotations

import json
import timeit
from dataclasses import asdict, dataclass
from pathlib import Path

import gymnasium as gym
import torch

import flexvlm_env.envs  # noqa: F401  (registers the ids)
from agents import base
from agents.lut import LUTController
from agents.profiles import ProfileTables
from baselines import make_baselines
from flexvlm_env.benchmarking import device_info
from flexvlm_env.envs.wrappers import package_versions
from flexvlm_env.experiments.common import parse_script_args


@dataclass
class Args:
    out: str = "results/bench_observation_check_cpu.json"
    """where to write the JSON results"""
    observations: int = 50
    """held-out replay observations cycled through"""
    number: int = 100
    """passes over the observations per timed run"""
    repeats: int = 7
    """timed runs (the best is reported)"""

    def validate(self) -> None:
        for name in ("observations", "number", "repeats"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name}={getattr(self, name)!r} must be >= 1")


def per_call_us(fn, observations: list, number: int, repeats: int) -> float:
    def run():
        for observation in observations:
            fn(observation)

    return min(timeit.repeat(run, number=number, repeat=repeats)) / (number * len(observations)) * 1e6


def main(args: Args) -> dict:
    env = gym.make("FlexVLMReplay-v0", split="heldout")
    observations = [env.reset(seed=i)[0] for i in range(args.observations)]
    profiles = ProfileTables.load(split="train")
    full, lut = make_baselines(profiles)["full"], LUTController.fit(profiles)
    timed = {
        "check_alone": base._valid_single,
        "as_batch": base.as_batch,
        "is_single_observation": base.is_single_observation,
        "select_config_full_baseline": full.select_config,
        "select_config_lut": lut.select_config,
    }
    result = {
        "benchmark": "observation check at batch 1",
        "device": device_info(torch.device("cpu")),
        "versions": package_versions(),
        "args": asdict(args),
        "us_per_call": {name: round(per_call_us(fn, observations, args.number, args.repeats), 3)
                        for name, fn in timed.items()},
    }
    print(json.dumps(result["us_per_call"], indent=1))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main(parse_script_args(Args))
