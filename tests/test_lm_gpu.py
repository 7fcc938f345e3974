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


def test_packed_model_refuses_an_unknown_precision():
    pytest.importorskip("triton")
    from agents.lm import PROMPT_LENGTH, Vocabulary, make_model
    from agents.lm_gpu import PackedLM

    vocabulary = Vocabulary()
    with pytest.raises(ValueError, match="precision='tf32'.*allowed.*ieee.*tf32x3"):
        PackedLM(make_model(vocabulary), vocabulary.knob_ids, PROMPT_LENGTH, "cpu", precision="tf32")
    assert PackedLM(make_model(vocabulary), vocabulary.knob_ids, PROMPT_LENGTH, "cpu").precision == "ieee"  # no TF32 on a CPU


def test_packed_model_refuses_a_tree_larger_than_the_tile():
    pytest.importorskip("triton")
    from agents.lm import PROMPT_LENGTH, Vocabulary, make_model
    from agents.lm_gpu import MAX_TREE_ROWS, PackedLM
    from flexvlm_env.config import KnobGrid

    grid = KnobGrid(crops=tuple(range(1, 13)), top_k=tuple(range(1, 9)))  # 15 + 12 + 96 = 123 rows: fits
    vocabulary = Vocabulary(grid)
    assert PackedLM(make_model(vocabulary), vocabulary.knob_ids, PROMPT_LENGTH, "cpu").shape["BT"] == MAX_TREE_ROWS
    grid = KnobGrid(crops=tuple(range(1, 14)), top_k=tuple(range(1, 9)))  # 15 + 13 + 104 = 132 rows
    vocabulary = Vocabulary(grid)
    with pytest.raises(ValueError, match="132 rows.*at most 128"):
        PackedLM(make_model(vocabulary), vocabulary.knob_ids, PROMPT_LENGTH, "cpu")


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
@pytest.mark.parametrize("precision", ["tf32x3", "ieee"])
def test_gpu_kernel_equals_numpy_on_every_interpreter_case(precision):
    """The interpreter check's cases (trained and random models, other shapes and grids, a 128-row tile),
    compiled for this GPU in each product precision."""
    if precision == "tf32x3" and torch.cuda.get_device_capability() < (8, 0):
        pytest.skip("TF32 needs compute capability 8.0")
    from _interpret import Report
    from _lm_gpu_interpret_check import run_cases

    report = Report()
    run_cases(report, "cuda", precision)
    assert report.failures == 0


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
    one_by_one = np.array([controller.select_index({k: v[i] for k, v in observations.items()})
                           for i in range(len(expected))])  # one observation: its own path and the CUDA graph
    assert len(set(expected.tolist())) >= 3
    assert np.mean(batched == expected) >= 0.99, np.flatnonzero(batched != expected)
    assert np.array_equal(one_by_one, batched)
    assert controller.gpu_decoder.zero_copy is True  # the batch-1 graph's kernel works on pinned host memory
    # the graph with copy nodes (where Triton refuses host pointers) decides the same
    from agents.lm import PROMPT_LENGTH
    from agents.lm_gpu import GPUDecoder

    controller.gpu_decoder = GPUDecoder(controller.model, controller.vocabulary.knob_ids, PROMPT_LENGTH, "cuda",
                                        zero_copy=False)
    copies = np.array([controller.select_index({k: v[i] for k, v in observations.items()}) for i in range(len(expected))])
    assert controller.gpu_decoder.zero_copy is False and np.array_equal(copies, one_by_one)
    controller.use_device("cpu")
    assert np.array_equal(controller.select_indices(observations), expected)
