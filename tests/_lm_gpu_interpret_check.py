"""Runs the LM controller's decision kernel (agents/lm_gpu.py) in Triton's CPU interpreter against
`NumpyDecoder`'s greedy constrained decisions.

Started by tests/test_lm_gpu.py in a subprocess with TRITON_INTERPRET=1. Cases: the committed DPO and
GRPO controllers of M3 (trained weights, the default shape) and fresh random models of other shapes
(one layer with an MLP narrower than the kernel's MLP chunk, three layers with two heads of 16 and a
wider MLP) and of other knob grids (every top_k 1..8: a 78-row token tree in a 128-row tile; a single
top_k value), on held-out observations of the replay env at three budget fractions, one kernel program per observation. Outputs start at -1, so a step left
unwritten shows. A decision may differ from NumPy's only where NumPy's own top two logits at the first
differing step are within float32 noise (1e-4), which would be a tie; no such case is expected.
tests/test_lm_gpu.py also runs the same cases compiled on a GPU (`run_cases(report, "cuda", precision)`),
in each product precision.
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch
from _interpret import start

import flexvlm_env  # noqa: F401  (registers the envs)
from agents.base import load_controller
from agents.lm import PROMPT_LENGTH, LMController, pool_observations
from agents.lm_gpu import PackedLM
from flexvlm_env.config import KnobGrid

ROOT = Path(__file__).resolve().parents[1]
TIE = 1e-4


def numpy_margins(controller: LMController, prompts: np.ndarray, answers: np.ndarray) -> np.ndarray:
    """[B, 3]: at each step of NumPy's own answer, its best minus second-best constrained logit."""
    margins = np.empty(answers.shape, dtype=np.float64)

    def choose(step, logits):
        knob = np.sort(logits[:, controller.vocabulary.knob_ids[step]], axis=1)
        margins[:, step] = knob[:, -1] - knob[:, -2] if knob.shape[1] > 1 else np.inf  # one value: no tie
        return answers[:, step]

    controller.decoder.decode(prompts, choose, 3)
    return margins


def check(report, name: str, controller: LMController, observations, device: str = "cpu", precision: str | None = None) -> None:
    prompts = controller.prompt_ids(observations)
    expected = controller.generate(observations, constrained=True)
    packed = PackedLM(controller.model, controller.vocabulary.knob_ids, PROMPT_LENGTH, device, precision)
    out = torch.full((len(prompts), 3), -1, dtype=torch.int64, device=device)
    packed.launch(torch.from_numpy(prompts).to(device), out)
    got = out.cpu().numpy()
    problems = []
    if (got < 0).any():
        problems.append(f"{int((got < 0).any(axis=1).sum())} rows with an unwritten step")
    differ = np.flatnonzero((got != expected).any(axis=1))
    margins = numpy_margins(controller, prompts, expected)
    for row in differ:
        step = int(np.flatnonzero(got[row] != expected[row])[0])
        if margins[row, step] > TIE:
            problems.append(f"row {row}: {got[row].tolist()} != {expected[row].tolist()} at step {step}, "
                            f"NumPy margin {margins[row, step]:.2e}")
    distinct = len({tuple(row) for row in expected.tolist()})
    if distinct < 3:  # a model answering the same to everything would make the comparison weak
        problems.append(f"only {distinct} distinct answers from NumPy")
    report.check(f"{name}: {len(prompts)} decisions, {distinct} distinct, {len(differ)} differ", problems[:5])


def run_cases(report, device: str = "cpu", precision: str | None = None) -> None:
    """Every case, the kernel launched on `device` (the interpreter for "cpu") with `precision` products."""
    import gymnasium as gym

    env = gym.make("FlexVLMReplay-v0", split="heldout", episode_length=1)
    observations, _, _ = pool_observations(env, (0.35, 0.7, 1.0))
    rng = np.random.default_rng(0)
    pick = rng.choice(len(observations["family"]), size=40, replace=False)
    sample = {k: v[pick] for k, v in observations.items()}
    for kind in ("dpo", "grpo"):
        check(report, f"M3 {kind} controller", load_controller(ROOT / "results/m3_controllers" / kind), sample, device, precision)
    cases = [(dict(hidden_size=64, num_layers=1, num_heads=4, intermediate_size=16), None),  # MLP narrower than a chunk
             (dict(hidden_size=32, num_layers=3, num_heads=2, intermediate_size=256), None),
             ({}, KnobGrid(top_k=tuple(range(1, 9)))),
             ({}, KnobGrid(crops=(1, 4, 12), top_k=(8,), active_blocks=(8, 16)))]
    for shape, grid in cases:
        for _ in range(10):
            controller = LMController.create(observations, grid=grid, seed=int(torch.randint(0, 1000, ()).item()), **shape)
            # random weights give small, near-uniform logits: scale them up so the argmax is decided by the model
            # (in place: the NumPy decoder's weight views see it)
            with torch.no_grad():
                for p in controller.model.parameters():
                    if p.ndim == 2:
                        p.mul_(4.0)
            # A random model answering (almost) the same to every row is a weak case, not a failure: draw
            # another (on the 6-configuration grid, 1 in 400 draws gives 2 distinct answers in 40 rows).
            if len({tuple(row) for row in controller.generate(sample, constrained=True).tolist()}) >= 3:
                break
        check(report, f"random model {shape or 'default shape'}, grid {controller.grid.shape}", controller, sample,
              device, precision)


def main() -> int:
    report, _ = start(__doc__)
    run_cases(report)
    return report.finish()


if __name__ == "__main__":
    sys.exit(main())
