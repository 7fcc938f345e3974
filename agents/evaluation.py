"""Held-out evaluation of a controller on a FlexVLM env, the same for every method and baseline.

Every (request, budget fraction) pair of the env's request pool (or a seeded subset of the
requests) is served once: the env is reset with that request and budget pinned, the controller
decides on a batch of all the observations (so batched controllers are evaluated as they run),
and the env executes each decision. The full configuration's quality on the same requests is the
reference for quality retention. Metric names are the ones every trainer logs (`METRICS`).
"""
from __future__ import annotations

import time
from collections.abc import Sequence

import gymnasium as gym
import numpy as np

from flexvlm_env.envs.core import DEFAULT_BUDGET_FRACTIONS

from .base import Controller, stack_observations

METRICS = ("reward", "quality", "quality_retention", "violation_rate", "latency_p50_ms", "latency_p95_ms")


def _summary(rewards, qualities, full_qualities, latencies, violations) -> dict[str, float]:
    full = float(np.mean(full_qualities))
    quality = float(np.mean(qualities))
    return {
        "reward": float(np.mean(rewards)),
        "quality": quality,
        "full_quality": full,
        "quality_retention": quality / full if full > 0 else float("nan"),
        "violation_rate": float(np.mean(violations)),
        "latency_p50_ms": float(np.percentile(latencies, 50)),
        "latency_p95_ms": float(np.percentile(latencies, 95)),
        "latency_mean_ms": float(np.mean(latencies)),
        "n": len(rewards),
    }


def evaluation_requests(env: gym.Env, n_requests: int | None, seed: int) -> list[str]:
    """The request ids evaluated: all of the env's pool, or `n_requests` of them drawn with `seed`."""
    ids = list(env.unwrapped.request_ids)
    if n_requests is None or n_requests >= len(ids):
        return ids
    if n_requests < 1:
        raise ValueError(f"n_requests={n_requests!r} must be >= 1 or None (the whole pool)")
    chosen = np.random.default_rng(seed).choice(len(ids), size=n_requests, replace=False)
    return [ids[i] for i in sorted(chosen.tolist())]


def evaluation_cases(env: gym.Env, requests: Sequence[str], budget_fractions: Sequence[float],
                     seed: int) -> tuple[list[tuple[str, float]], list[dict]]:
    """The (request, budget fraction) cases `evaluate` serves, fraction-major, and the observation of each: the
    env reset with the case pinned and seed `seed + case index`, as `evaluate` resets it."""
    cases = [(request_id, float(f)) for f in budget_fractions for request_id in requests]
    observations = [env.reset(seed=seed + i, options={"request_id": request_id, "budget_fraction": fraction})[0]
                    for i, (request_id, fraction) in enumerate(cases)]
    return cases, observations


def evaluate(
    controller: Controller,
    env: gym.Env,
    budget_fractions: Sequence[float] = DEFAULT_BUDGET_FRACTIONS,
    n_requests: int | None = None,
    seed: int = 0,
) -> dict:
    """`{"by_fraction": {"0.35": metrics, ...}, "mean": metrics averaged over the fractions,
    "decision_ms_per_request": ..., "env_steps": ...}` on `env`'s requests (see module docstring)."""
    requests = evaluation_requests(env, n_requests, seed)
    full_action = np.array([n - 1 for n in env.unwrapped.grid.shape], dtype=np.int64)
    full_quality = {}
    for i, request_id in enumerate(requests):
        env.reset(seed=seed + i, options={"request_id": request_id})
        full_quality[request_id] = env.step(full_action)[4]["quality"]
    cases, observations = evaluation_cases(env, requests, budget_fractions, seed)
    start = time.perf_counter()
    actions = controller.select_action(stack_observations(observations))
    decision_ms = (time.perf_counter() - start) * 1e3 / len(cases)
    steps = []
    for i, ((request_id, fraction), action) in enumerate(zip(cases, actions)):
        env.reset(seed=seed + i, options={"request_id": request_id, "budget_fraction": fraction})
        _, reward, _, _, info = env.step(action)
        steps.append((fraction, reward, info["quality"], full_quality[request_id], info["latency_ms"], info["violation"]))
    by_fraction = {}
    for f in budget_fractions:
        rows = [s[1:] for s in steps if s[0] == float(f)]
        by_fraction[f"{float(f):g}"] = _summary(*map(list, zip(*rows)))
    keys = [k for k in next(iter(by_fraction.values())) if k != "n"]
    mean = {k: float(np.mean([m[k] for m in by_fraction.values()])) for k in keys}
    return {"by_fraction": by_fraction, "mean": mean, "decision_ms_per_request": decision_ms,
            "env_steps": len(steps) + len(requests), "n_requests": len(requests)}


def time_calls_ms(fn, items: Sequence, warmup: int = 10) -> np.ndarray:
    """Milliseconds of `fn(item)` for each of `items`, after `fn` ran untimed on the first `warmup`
    (the protocol of every overhead measurement: warm-up discarded, one timing per call)."""
    items = list(items)
    for item in items[:warmup]:
        fn(item)
    out = np.empty(len(items))
    for i, item in enumerate(items):
        start = time.perf_counter_ns()
        fn(item)
        out[i] = (time.perf_counter_ns() - start) / 1e6
    return out


def decision_overhead_ms(controller: Controller, env: gym.Env, n: int = 200, seed: int = 0) -> dict[str, float]:
    """Batch-1 `select_config` time on this machine (median and P95 over `n` observations, after
    a warm-up): what one decision adds to a request's latency. Observations come from resets
    only, so nothing is executed (the live env would run the model)."""
    observations = [env.reset(seed=seed + i)[0] for i in range(n)]
    times = time_calls_ms(controller.select_config, observations)
    return {"median_ms": float(np.median(times)), "p95_ms": float(np.percentile(times, 95)), "n": n}


def format_comparison(results: dict[str, dict], budget_fractions: Sequence[float] = DEFAULT_BUDGET_FRACTIONS) -> str:
    """A text table: one row per method, per budget fraction quality retention / violation rate /
    P95 latency, and the mean over the fractions."""
    columns = [f"{float(f):g}" for f in budget_fractions]
    width = max(len("method"), *(len(name) for name in results)) + 2
    header = "method".ljust(width) + "".join(f"| {c:^24}" for c in [*columns, "mean"])
    sub = " " * width + "".join("| retain  viol   p95 ms  " for _ in range(len(columns) + 1))
    lines = [header, sub, "-" * len(sub)]
    for name, result in results.items():
        cells = []
        for metrics in [*(result["by_fraction"][c] for c in columns), result["mean"]]:
            cells.append(f"| {metrics['quality_retention']:6.3f} {metrics['violation_rate']:5.3f} {metrics['latency_p95_ms']:8.2f}  ")
        lines.append(name.ljust(width) + "".join(cells))
    return "\n".join(lines)


__all__ = ["METRICS", "evaluate", "decision_overhead_ms", "evaluation_cases", "evaluation_requests", "format_comparison"]
