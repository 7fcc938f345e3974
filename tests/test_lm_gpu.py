"""The LM controller's decision kernel (agents/lm_gpu.py): in Triton's interpreter here, compiled on a GPU.

Decisions must equal `NumpyDecoder`'s greedy constrained ones (but for exact near-ties of its logits);
`use_device` must refuse what it cannot run, naming the device."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from _interpret import run_interpret_check

ROOT = Path(__file__).resolve().parents[1]
gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def test_decision_kernel_in_interpreter():
    run_interpret_check("_lm_gpu_interpret_check.py")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_use_device_without_cuda_names_the_device():
    from agents.base import load_controller

    controller = load_controller(ROOT / "results/m3_controllers/dpo")
    with pytest.raises((ValueError, RuntimeError), match="(?i)cuda"):
        controller.use_device("cuda")
    assert controller.gpu_decoder is None  # still deciding on the CPU
    controller.use_device("cpu")


@pytest.mark.parametrize("device", ["tpu", "cuda:x", "mps"])
def test_use_device_refuses_an_unknown_device(device):
    from agents.base import load_controller

    controller = load_controller(ROOT / "results/m3_controllers/dpo")
    with pytest.raises(ValueError, match=f"device='{device}'.*allowed"):
        controller.use_device(device)
    assert controller.gpu_decoder is None


def test_packed_model_shape_errors():
    pytest.importorskip("triton")
    from agents.lm import PROMPT_LENGTH, Vocabulary, make_model
    from agents.lm_gpu import PackedLM

    vocabulary = Vocabulary()
    model = make_model(vocabulary, hidden_size=48, num_heads=4, intermediate_size=96)  # head size 12
    with pytest.raises(ValueError, match="hidden_size=48"):
        PackedLM(model, vocabulary.knob_ids, PROMPT_LENGTH, "cpu")


def heldout_observations(n: int):
    import gymnasium as gym

    import flexvlm_env  # noqa: F401
    from agents.lm import pool_observations

    env = gym.make("FlexVLMReplay-v0", split="heldout", episode_length=1)
    observations, _, _ = pool_observations(env, (0.35, 0.5, 0.7, 0.85, 1.0))
    pick = np.random.default_rng(0).choice(len(observations["family"]), size=n, replace=False)
    return {k: v[pick] for k, v in observations.items()}


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("kind", ["dpo", "grpo"])
def test_gpu_decisions_equal_numpy(kind):
    from agents.base import load_controller

    controller = load_controller(ROOT / "results/m3_controllers" / kind)
    observations = heldout_observations(200)
    expected = controller.select_indices(observations)
    controller.use_device("cuda")
    batched = controller.select_indices(observations)
    one_by_one = np.array([controller.select_indices({k: v[i : i + 1] for k, v in observations.items()})[0]
                           for i in range(len(expected))])  # batch 1: the CUDA graph
    assert len(set(expected.tolist())) >= 3
    assert np.mean(batched == expected) >= 0.99, np.flatnonzero(batched != expected)
    assert np.array_equal(one_by_one, batched)
    controller.use_device("cpu")
    assert np.array_equal(controller.select_indices(observations), expected)
