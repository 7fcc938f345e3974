"""`flexvlm-train supervised`: an MLP classifier on oracle labels from a growing profiling budget.

As for the LUT, training data is profiling: train-half requests are profiled in a seeded order at
every configuration (140 env steps each). At each evaluation point the classifier trains further
(`epochs_per_eval` epochs, warm-started from the previous point) on the oracle labels of every
request profiled so far at every budget fraction (`agents.supervised.oracle_dataset`), then is
evaluated on the held-out half. Checkpoints hold the network, the optimizer and the progress.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from tqdm import tqdm

from agents.evaluation import evaluate
from agents.supervised import SupervisedController, oracle_dataset
from flexvlm_env.training.state import load_training_state, save_training_state

from .common import CommonArgs, Run, check_number, eval_requests, load_profiles, make_env, make_guardrail
from .lut import profiled_rows, request_points


@dataclass
class Args(CommonArgs):
    total_env_steps: int = 126_000
    """profiled (request, configuration) executions: 140 per request; 126,000 profiles all 900 train requests"""
    eval_every_env_steps: int = 14_000
    """train further and evaluate every this many profiled executions"""
    hidden: tuple[int, ...] = (128, 128)
    """hidden layer widths of the MLP"""
    epochs_per_eval: int = 40
    """epochs over the profiled data between evaluations"""
    batch_size: int = 256
    """minibatch size"""
    learning_rate: float = 1e-3
    """Adam learning rate"""
    weight_decay: float = 1e-4
    """AdamW weight decay"""
    guardrail: bool = True
    """mask configurations the profiled latency rules out for the budget before the argmax"""

    def validate(self) -> None:
        super().validate()
        for name in ("epochs_per_eval", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')}={getattr(self, name)!r} must be >= 1")
        if not self.hidden or any(n < 1 for n in self.hidden):
            raise ValueError(f"--hidden={self.hidden!r}: one or more layer widths, each >= 1")
        check_number("learning_rate", self.learning_rate, above=0)
        check_number("weight_decay", self.weight_decay, at_least=0)


def main(args: Args) -> dict:
    run = Run("supervised", args)
    profiles = load_profiles(args)
    order = profiled_rows(profiles.n_requests, args.seed)
    n_configs = len(profiles.grid)
    heldout = make_env(args, "heldout", episode_length=1)
    controller = SupervisedController.create(profiles, args.hidden, False, args.seed)
    controller.guardrail = make_guardrail(args, profiles) if args.guardrail else None
    optimizer = torch.optim.AdamW(controller.net.parameters(), lr=args.learning_rate, weight_decay=args.weight_decay)
    generator = torch.Generator().manual_seed(args.seed)
    done = 0
    if args.resume is not None and (run.checkpoint_dir / "state.json").exists():
        progress = load_training_state(run.checkpoint_dir, controller.net, optimizer)
        done = progress["env_steps"]
        generator.set_state(torch.tensor(progress["generator_state"], dtype=torch.uint8))
        run.resumed_from(done, progress["wall_clock_s"])
    elif args.resume is not None:
        run.resumed_from(-1, 0.0)  # no checkpoint yet: start over, dropping every curve line
    for point in tqdm(request_points(args, profiles, done), desc="supervised", unit="eval"):
        n = point // n_configs
        features, targets = oracle_dataset(profiles.subset(order[:n]), args.budget_fractions)
        loss = controller.train_epochs(features, targets, optimizer, args.epochs_per_eval, args.batch_size, generator)
        result = evaluate(controller, heldout, args.budget_fractions, eval_requests(args), args.seed)
        run.log_eval(point, result, {"loss": loss, "profiled_requests": n})
        done = point
        save_training_state(run.checkpoint_dir, controller.net, optimizer, {
            "env_steps": done, "wall_clock_s": run.wall_clock_s, "generator_state": generator.get_state().tolist()})
        run.checkpointed(done)
    return run.finish(controller, profiles, heldout, done)
