"""Measure `FlexVLMReplay-v0` throughput: one env through `gym.make`, and the native vector env.

    python scripts/bench_replay.py --out results/replay_throughput.json

Random actions are drawn before timing; each timed run steps for `--seconds`, resets included
(the single env resets after every `episode_length` steps; the vector env autoresets in
Gymnasium's NEXT_STEP mode, so one sub-env step in `episode_length + 1` is a reset step, counted
as a step as Gymnasium does). The median of `--repeats` runs is reported, with the data source
(`--data synthetic`: a synthetic table of the shipped size; `--data shipped`: the recorded
tables), the CPU and the package versions.
"""
from __future__ import annotations

import json
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import gymnasium as gym
import numpy as np
import torch
import tyro

import flexvlm_env.envs  # noqa: F401  (registers the ids)
from flexvlm_env.benchmarking import device_info
from flexvlm_env.envs.replay import resolve_replay_data
from flexvlm_env.envs.synthetic import synthetic_replay_data
from flexvlm_env.envs.wrappers import package_versions


@dataclass
class Args:
    out: str = "results/replay_throughput.json"
    """where to write the JSON results"""
    data: str = "shipped"
    """'synthetic' (1800 requests x 140 configs, the shipped size) or 'shipped' (the recorded tables)"""
    quality: str = "micro"
    """shipped quality table (with --data shipped)"""
    latency: str = "molmoe-1b-h100"
    """shipped latency table (with --data shipped)"""
    num_envs: int = 1024
    """sub-envs of the native vector env"""
    episode_length: int = 16
    """requests per episode"""
    seconds: float = 2.0
    """length of one timed run"""
    repeats: int = 3
    """timed runs per env kind (the median is reported)"""
    seed: int = 0


def time_single(env: gym.Env, actions: list[np.ndarray], seconds: float) -> float:
    env.reset(seed=0)
    steps, n_actions = 0, len(actions)
    start = time.perf_counter()
    while True:
        for _ in range(1000):
            _, _, terminated, _, _ = env.step(actions[steps % n_actions])
            steps += 1
            if terminated:
                env.reset()
        elapsed = time.perf_counter() - start
        if elapsed >= seconds:
            return steps / elapsed


def time_vector(env: gym.vector.VectorEnv, actions: list[np.ndarray], seconds: float) -> float:
    env.reset(seed=0)
    steps, n_actions = 0, len(actions)
    start = time.perf_counter()
    while True:
        for _ in range(20):
            env.step(actions[steps % n_actions])
            steps += 1
        elapsed = time.perf_counter() - start
        if elapsed >= seconds:
            return steps * env.num_envs / elapsed


def main(args: Args) -> dict:
    if args.data == "synthetic":
        data = synthetic_replay_data(n_requests=1800, seed=args.seed)
    elif args.data == "shipped":
        data = resolve_replay_data(None, args.quality, args.latency)
    else:
        raise ValueError(f"--data={args.data!r} is not valid; allowed: 'synthetic', 'shipped'")
    rng = np.random.default_rng(args.seed)
    nvec = np.array(data.grid.shape)

    single = gym.make("FlexVLMReplay-v0", data=data, episode_length=args.episode_length)
    single_actions = [rng.integers(0, nvec) for _ in range(4096)]
    time_single(single, single_actions, 0.2)  # warm-up
    single_runs = [time_single(single, single_actions, args.seconds) for _ in range(args.repeats)]

    vector = gym.make_vec(
        "FlexVLMReplay-v0", num_envs=args.num_envs, vectorization_mode="vector_entry_point", data=data,
        episode_length=args.episode_length,
    )
    vector_actions = [rng.integers(0, nvec, size=(args.num_envs, 3)) for _ in range(64)]
    time_vector(vector, vector_actions, 0.2)
    vector_runs = [time_vector(vector, vector_actions, args.seconds) for _ in range(args.repeats)]

    results = {
        "single_env_steps_per_s": statistics.median(single_runs),
        "vector_env_steps_per_s": statistics.median(vector_runs),
        "num_envs": args.num_envs,
        "single_env_runs_steps_per_s": single_runs,
        "vector_env_runs_steps_per_s": vector_runs,
        "single_env": "gym.make('FlexVLMReplay-v0') (OrderEnforcing and PassiveEnvChecker wrappers)",
        "vector_env": "gym.make_vec('FlexVLMReplay-v0', vectorization_mode='vector_entry_point') (autoreset NEXT_STEP)",
        "data_source": args.data,
        "data_metadata": {key: str(value) for key, value in data.metadata.items()},
        "n_requests": data.n_requests,
        "n_configs": len(data.grid),
        "cpu": device_info(torch.device("cpu")),
        "versions": package_versions(),
        "args": asdict(args),
    }
    print(
        f"single env: {results['single_env_steps_per_s']:,.0f} steps/s; vector env ({args.num_envs} envs): "
        f"{results['vector_env_steps_per_s']:,.0f} steps/s  [{args.data} data, {data.n_requests} x {len(data.grid)}]"
    )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {out}")
    return results


if __name__ == "__main__":
    main(tyro.cli(Args))
