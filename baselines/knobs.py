"""The baselines: static full, one-knob reductions and the greedy tokens -> depth -> width policy.

Each baseline walks a fixed path through the grid, from the full configuration towards cheaper
ones, and takes the first configuration on it whose predicted latency for the request's family
(the guardrail's profiled quantile, as a fraction of the family's full-configuration latency:
`agents.guardrail.LatencyGuardrail`) meets the budget, or the
path's last one when none does. The path is what distinguishes them:

- `full`: only the full configuration (12 crops, top-8, 16 blocks), whatever the budget;
- `tokens_only` / `depth_only` / `width_only`: crops / active blocks / top_k reduced one grid step
  at a time, the other two knobs at full;
- `greedy`: crops down to the smallest, then active blocks, then top_k (tokens -> depth -> width).
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from agents.base import Controller
from agents.guardrail import LatencyGuardrail
from agents.profiles import ProfileTables
from flexvlm_env.config import KnobGrid
from flexvlm_env.envs.core import DEFAULT_BUDGET_FRACTIONS

KNOB_AXES = {"crops": 0, "top_k": 1, "active_blocks": 2}
BASELINES = {
    "full": (),
    "tokens_only": ("crops",),
    "depth_only": ("active_blocks",),
    "width_only": ("top_k",),
    "greedy": ("crops", "active_blocks", "top_k"),
}


def knob_path(grid: KnobGrid, knobs: Sequence[str]) -> list[int]:
    """Config indices from the full configuration, reducing `knobs` in turn one step at a time
    (each to its smallest value before the next starts)."""
    for knob in knobs:
        if knob not in KNOB_AXES:
            raise ValueError(f"knob={knob!r} is not a knob; allowed: {list(KNOB_AXES)}")
    index = [n - 1 for n in grid.shape]
    path = [index.copy()]
    for knob in knobs:
        axis = KNOB_AXES[knob]
        while index[axis] > 0:
            index[axis] -= 1
            path.append(index.copy())
    return [int(np.ravel_multi_index(tuple(i), grid.shape)) for i in path]


class KnobPathController(Controller):
    """A baseline: the first configuration on its path that the latency prediction says meets the budget."""

    kind = "baseline"

    def __init__(self, name: str, guardrail: LatencyGuardrail, grid: KnobGrid | None = None):
        super().__init__(grid)
        if name not in BASELINES:
            raise ValueError(f"name={name!r} is not a baseline; allowed: {list(BASELINES)}")
        self.name = name
        self.guardrail = guardrail
        self.path = np.array(knob_path(self.grid, BASELINES[name]), dtype=np.int64)
        self._path_fraction = guardrail.predicted_fraction[:, self.path]  # [F, P]

    def select_indices(self, observations):
        family = np.asarray(observations["family"], dtype=np.int64).reshape(-1)
        budget = np.asarray(observations["budget_fraction"], dtype=np.float64).reshape(-1, 1)
        meets = self._path_fraction[family] <= budget + 1e-6
        first = np.where(meets.any(axis=1), meets.argmax(axis=1), len(self.path) - 1)
        return self.path[first]

    def state(self):
        config, tensors = self.guardrail.state()
        return {"name": self.name, "guardrail": config}, tensors

    @classmethod
    def from_state(cls, config, tensors, grid):
        return cls(config["name"], LatencyGuardrail.from_state(config["guardrail"], tensors), grid)


def make_baselines(profiles: ProfileTables, budget_fractions: Sequence[float] = DEFAULT_BUDGET_FRACTIONS,
                   guardrail: LatencyGuardrail | None = None) -> dict[str, Controller]:
    """Every baseline, predicting latency with `guardrail` (default: built from `profiles`;
    `budget_fractions` is unused: baselines read each request's budget fraction; the argument
    keeps one signature with the learned methods' builders)."""
    guardrail = guardrail or LatencyGuardrail.from_profiles(profiles)
    return {name: KnobPathController(name, guardrail, profiles.grid) for name in BASELINES}
