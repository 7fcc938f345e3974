"""What the methods whose controller is a tiny causal LM (`dpo`, `grpo`) share: arguments, the
run's start (envs, observation pools, the fresh controller) and the held-out evaluation record."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple

import torch

from agents.evaluation import evaluate
from agents.lm import DEFAULT_BUCKETS, LMController, pool_observations, quiet_libraries

from .common import CommonArgs, Run, eval_requests, make_env


@dataclass
class LMArgs(CommonArgs):
    format_warmup_steps: int = 300
    """steps of the format warm start (random valid answers; 0 turns it off)"""
    hidden_size: int = 64
    """LM hidden size"""
    num_layers: int = 2
    """LM decoder layers"""
    num_heads: int = 4
    """LM attention heads"""
    intermediate_size: int = 128
    """LM MLP width"""
    n_buckets: int = DEFAULT_BUCKETS
    """buckets per observation feature in the text rendering"""
    torch_threads: int = 1
    """PyTorch CPU threads (a model this small gains little from more; on shared cores more threads can be far slower)"""

    def validate(self) -> None:
        super().validate()
        for name in ("hidden_size", "num_layers", "num_heads", "intermediate_size", "n_buckets", "torch_threads"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')}={getattr(self, name)!r} must be >= 1")
        if self.format_warmup_steps < 0:
            raise ValueError(f"--format-warmup-steps={self.format_warmup_steps!r} must be >= 0")


class LMRun(NamedTuple):
    run: Run
    train_env: Any
    heldout: Any
    observations: dict  # every train-half (request, budget fraction), fraction-major
    request_ids: list
    fractions: list
    heldout_observations: dict
    controller: LMController


def start_lm_run(args: LMArgs, method: str) -> LMRun:
    """The run directory, seeded torch, the train and held-out envs (one request per episode),
    their observation pools, and a freshly initialised controller of `method`."""
    run = Run(method, args)
    torch.set_num_threads(args.torch_threads)
    quiet_libraries()
    torch.manual_seed(args.seed)
    train_env = make_env(args, "train", episode_length=1)
    heldout = make_env(args, "heldout", episode_length=1)
    observations, request_ids, fractions = pool_observations(train_env, args.budget_fractions)
    heldout_observations, _, _ = pool_observations(heldout, args.budget_fractions)
    controller = LMController.create(observations, kind=method, seed=args.seed, n_buckets=args.n_buckets,
                                     hidden_size=args.hidden_size, num_layers=args.num_layers, num_heads=args.num_heads,
                                     intermediate_size=args.intermediate_size)
    return LMRun(run, train_env, heldout, observations, request_ids, fractions, heldout_observations, controller)


def log_lm_evaluation(args: LMArgs, run: Run, controller: LMController, heldout, heldout_observations, env_steps: int,
                      metrics: dict) -> dict:
    """Evaluate on the held-out requests and log it with the training `metrics` and the rate of
    answers that would not parse without constrained decoding."""
    result = evaluate(controller, heldout, args.budget_fractions, eval_requests(args), args.seed)
    metrics = {**metrics, "unconstrained_invalid_rate": controller.invalid_output_rate(heldout_observations)}
    return run.log_eval(env_steps, result, metrics)
