"""Which knob values trained controllers choose, per budget fraction, on the replay env's held-out requests.

    python scripts/knob_choices.py runs/e5/*grpo*/controller [more controller dirs] [--out choices.json]

For each saved controller (`agents.base.load_controller`) and budget fraction: the share of requests at each
value of `crops`, `top_k` and `active_blocks`, and the held-out quality retention. For an LM controller (GRPO,
DPO) also the probability its model gives each `crops` value as the first answer token (mean over the requests):
a value whose probability is near zero is one the controller can no longer write, and one sampling will not
bring back during training. That is how GRPO's conservatism at loose budgets shows (docs/LM_CONTROLLERS.md).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import gymnasium as gym
import numpy as np
import tyro

import flexvlm_env  # noqa: F401  (registers the env ids)
from agents.base import load_controller, stack_observations
from agents.evaluation import evaluate, evaluation_cases, evaluation_requests
from agents.lm import LMController
from flexvlm_env.envs.core import DEFAULT_BUDGET_FRACTIONS


@dataclass
class Args:
    controllers: tyro.conf.Positional[tuple[Path, ...]]
    """saved controller directories (a run's `controller/`)"""
    fractions: tuple[float, ...] = DEFAULT_BUDGET_FRACTIONS
    """budget fractions of the family's full-configuration latency"""
    requests: int | None = None
    """held-out requests, drawn with seed 0 as the trainers' evaluation draws them (None: all 900, as E5)"""
    out: Path | None = None
    """write the table as JSON here"""


def shares(values: np.ndarray, grid_values) -> dict[str, float]:
    return {str(v): float(np.mean(values == i)) for i, v in enumerate(grid_values)}


def first_token_probabilities(controller: LMController, observations: dict) -> dict[str, float]:
    """Mean probability of each `crops` value as the first token the LM writes after the prompt."""
    import torch

    ids = torch.from_numpy(controller.prompt_ids(observations))
    with torch.no_grad():
        probabilities = torch.softmax(controller.model(input_ids=ids).logits[:, -1].float(), dim=-1).mean(0)
    crops_ids = controller.vocabulary.knob_ids[0]
    return {str(v): float(probabilities[int(i)]) for v, i in zip(controller.vocabulary.knob_values[0], crops_ids)}


def knob_choices(controller, env: gym.Env, fractions, n_requests: int | None) -> dict:
    grid = env.unwrapped.grid
    requests = evaluation_requests(env, n_requests, 0)
    retention = evaluate(controller, env, fractions, n_requests, 0)["by_fraction"]
    # evaluate's own cases and observations (seed 0), fraction-major: one block of len(requests) per fraction
    _, observations = evaluation_cases(env, requests, fractions, 0)
    table = {}
    for k, fraction in enumerate(fractions):
        batch = stack_observations(observations[k * len(requests):(k + 1) * len(requests)])
        actions = np.asarray(controller.select_action(batch))
        row = {"quality_retention": retention[f"{float(fraction):g}"]["quality_retention"]}
        for knob, (name, values) in enumerate((("crops", grid.crops), ("top_k", grid.top_k),
                                               ("active_blocks", grid.active_blocks))):
            row[name] = shares(actions[:, knob], values)
        if isinstance(controller, LMController):
            row["first_token_crops_probability"] = first_token_probabilities(controller, batch)
        table[f"{float(fraction):g}"] = row
    return table


def main(args: Args) -> dict:
    if not args.controllers:
        raise ValueError("controllers: give at least one saved controller directory")
    env = gym.make("FlexVLMReplay-v0", split="heldout", episode_length=1)
    result = {"env": "FlexVLMReplay-v0", "split": "heldout", "requests": args.requests, "controllers": {}}
    for path in args.controllers:
        controller = load_controller(path)
        table = knob_choices(controller, env, args.fractions, args.requests)
        # a run's controller is saved as <run>/controller: name it by its run
        result["controllers"][path.parent.name if path.name == "controller" else str(path)] = table
        print(path)
        for fraction, row in table.items():
            crops = " ".join(f"{v}:{s:.2f}" for v, s in row["crops"].items() if s > 0)
            line = f"  {fraction:>4}: retention {row['quality_retention']:.3f}  crops chosen {crops}"
            if "first_token_crops_probability" in row:
                p = row["first_token_crops_probability"]
                line += f"  | P(first token) crops 9: {p['9']:.3f}, 12: {p['12']:.3f}"
            print(line)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main(tyro.cli(Args))
