"""What the methods whose controller is a tiny causal LM (`dpo`, `grpo`) share: arguments, the
run's start (envs, observation pools, the controller to train: fresh or `--init-from`'s) and the held-out
evaluation record."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch

from agents.base import CONTROLLER_FILE, load_controller
from agents.evaluation import evaluate
from agents.lm import DEFAULT_BUCKETS, LMController, pool_observations, quiet_libraries
from flexvlm_env.config import KnobGrid

from .common import CommonArgs, Run, eval_requests, make_env


# LMArgs' architecture arguments and the names the Llama config gives them
ARCHITECTURE = {"hidden_size": "hidden_size", "num_layers": "num_hidden_layers", "num_heads": "num_attention_heads",
                "intermediate_size": "intermediate_size"}


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
    init_from: Path | None = None
    """start from a saved LM controller (a dpo or grpo run directory, or its controller/ directory) instead of a fresh
    model: its weights, architecture and feature buckets are kept, the format warm start is skipped, and the env
    steps of the run that trained it are not counted in this run's"""

    def validate(self) -> None:
        super().validate()
        for name in ("hidden_size", "num_layers", "num_heads", "intermediate_size", "n_buckets", "torch_threads"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')}={getattr(self, name)!r} must be >= 1")
        if self.format_warmup_steps < 0:
            raise ValueError(f"--format-warmup-steps={self.format_warmup_steps!r} must be >= 0")
        if self.init_from is not None:
            self.load_init_from()  # a controller this run cannot start from is a usage error, found up front

    def absolutize_paths(self) -> None:
        super().absolutize_paths()
        if self.init_from is not None:
            self.init_from = Path(self.init_from).resolve()

    def load_init_from(self) -> LMController:
        """The saved controller --init-from names (the directory itself, or a run directory's controller/), checked
        against this run: an LM controller on the env's knob grid whose architecture and buckets are the ones
        this run's arguments give (a run's args.json says what its model is), so that they tell the truth."""
        found = [p for p in (Path(self.init_from), Path(self.init_from) / "controller") if (p / CONTROLLER_FILE).is_file()]
        if not found:
            raise ValueError(f"--init-from={self.init_from} is not a saved controller or a run directory holding one "
                             f"(no {CONTROLLER_FILE} in it or in its controller/)")
        controller = load_controller(found[0])
        if not isinstance(controller, LMController):
            raise ValueError(f"--init-from={self.init_from} holds a {controller.kind!r} controller; allowed: an LM "
                             f"controller ({', '.join(LMController.KINDS)})")
        if controller.grid != KnobGrid():
            raise ValueError(f"--init-from={self.init_from}: its knob grid {controller.grid} is not the env's {KnobGrid()}")
        saved = {"n_buckets": controller.buckets.n_buckets,
                 **{name: getattr(controller.model.config, key) for name, key in ARCHITECTURE.items()}}
        wrong = [f"--{name.replace('_', '-')}={getattr(self, name)} (the saved model's is {value})"
                 for name, value in saved.items() if getattr(self, name) != value]
        if wrong:
            raise ValueError(f"--init-from={self.init_from}: {', '.join(wrong)}; pass the saved model's values")
        return controller

    def warmup_steps(self) -> int:
        """Format warm-start steps: none for a model that already writes answers (--init-from)."""
        return 0 if self.init_from is not None else self.format_warmup_steps


def initial_controller(args: LMArgs, method: str, observations: dict) -> LMController:
    """A fresh controller of `method`, or the one `--init-from` names (`LMArgs.load_init_from`)."""
    if args.init_from is None:
        return LMController.create(observations, kind=method, seed=args.seed, n_buckets=args.n_buckets,
                                   hidden_size=args.hidden_size, num_layers=args.num_layers, num_heads=args.num_heads,
                                   intermediate_size=args.intermediate_size)
    controller = args.load_init_from()
    controller.kind = method
    controller.model.train()  # loaded for inference (eval mode); trained from here, as a fresh model is
    return controller


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
    their observation pools, and the controller of `method` to train (fresh, or `--init-from`'s)."""
    run = Run(method, args)  # validates the arguments (--init-from's controller included) first
    torch.set_num_threads(args.torch_threads)
    quiet_libraries()
    torch.manual_seed(args.seed)
    train_env = make_env(args, "train", episode_length=1)
    heldout = make_env(args, "heldout", episode_length=1)
    observations, request_ids, fractions = pool_observations(train_env, args.budget_fractions)
    heldout_observations, _, _ = pool_observations(heldout, args.budget_fractions)
    controller = initial_controller(args, method, observations)
    return LMRun(run, train_env, heldout, observations, request_ids, fractions, heldout_observations, controller)


def log_lm_evaluation(args: LMArgs, run: Run, controller: LMController, heldout, heldout_observations, env_steps: int,
                      metrics: dict) -> dict:
    """Evaluate on the held-out requests and log it with the training `metrics` and the rate of
    answers that would not parse without constrained decoding."""
    result = evaluate(controller, heldout, args.budget_fractions, eval_requests(args), args.seed)
    metrics = {**metrics, "unconstrained_invalid_rate": controller.invalid_output_rate(heldout_observations)}
    return run.log_eval(env_steps, result, metrics)
