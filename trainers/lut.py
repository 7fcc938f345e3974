"""`flexvlm-train lut`: the training-free lookup table, built from a growing profiling budget.

Training is profiling: train-half requests are profiled in a seeded order, each at every grid
configuration (140 env steps a request), and at each evaluation point the table is rebuilt from
the requests profiled so far (`agents.lut.LUTController.fit`) and evaluated on the held-out half.
The learning curve is thus held-out quality against profiling cost, comparable to the learned
methods' curves against env steps. Resuming recomputes nothing but the table: the profiling order
is fixed by the seed.
"""
from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
from tqdm import tqdm

from agents.evaluation import evaluate
from agents.lut import DEFAULT_MAX_VIOLATION_RATE, LUTController

from .common import CommonArgs, Run, check_number, eval_requests, load_profiles, make_env, whole_unit_points


@dataclass
class Args(CommonArgs):
    total_env_steps: int = 126_000
    """profiled (request, configuration) executions: 140 per request; 126,000 profiles all 900 train requests"""
    eval_every_env_steps: int = 14_000
    """rebuild and evaluate the table every this many profiled executions"""
    max_violation_rate: float = DEFAULT_MAX_VIOLATION_RATE
    """largest profiled violation rate a tabulated configuration may have"""

    def validate(self) -> None:
        super().validate()
        check_number("max_violation_rate", self.max_violation_rate, at_least=0, at_most=1)


def profiled_rows(n_requests: int, seed: int) -> np.ndarray:
    """The order in which train requests are profiled (a seeded permutation)."""
    return np.random.default_rng(seed).permutation(n_requests)


def request_points(args: CommonArgs, profiles, start: int = 0) -> list[int]:
    """Env-step counts at which to evaluate: whole profiled requests (a grid's worth of env steps each), every
    ~eval_every, up to the budget or every train request profiled."""
    n_configs = len(profiles.grid)
    total = min(args.total_env_steps, profiles.n_profiled)
    points = whole_unit_points(total, args.eval_every_env_steps, n_configs, start)
    if points and points[-1] != args.total_env_steps and start == 0:
        print(f"--total-env-steps={args.total_env_steps}: profiling {points[-1] // n_configs} whole requests "
              f"({points[-1]} env steps, {n_configs} per request)")
    return points


def main(args: Args) -> dict:
    run = Run("lut", args)
    profiles = load_profiles(args)
    order = profiled_rows(profiles.n_requests, args.seed)
    n_configs = len(profiles.grid)
    heldout = make_env(args, "heldout", episode_length=1)
    done = 0
    state_path = run.checkpoint_dir / "state.json"
    if args.resume is not None and state_path.exists():
        state = json.loads(state_path.read_text())
        done = state["env_steps"]
        run.resumed_from(done, state["wall_clock_s"])
    elif args.resume is not None:
        run.resumed_from(-1, 0.0)  # no checkpoint yet: start over, dropping every curve line
    lut = None
    for point in tqdm(request_points(args, profiles, done), desc="lut", unit="eval"):
        n = point // n_configs
        lut = LUTController.fit(profiles.subset(order[:n]), args.budget_fractions, args.max_violation_rate)
        result = evaluate(lut, heldout, args.budget_fractions, eval_requests(args), args.seed)
        run.log_eval(point, result, {"profiled_requests": n})
        run.checkpoint_dir.mkdir(exist_ok=True)
        state_path.write_text(json.dumps({"env_steps": point, "wall_clock_s": run.wall_clock_s}))
        run.checkpointed(point)
        done = point
    if lut is None:  # resumed after the last point: rebuild the final table
        lut = LUTController.fit(profiles.subset(order[: max(1, done // n_configs)]), args.budget_fractions,
                                args.max_violation_rate)
    return run.finish(lut, profiles, heldout, done)
