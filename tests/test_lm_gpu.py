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


@pytest.mark.parametrize("spin_s", [-1e-3, 2.0, float("nan"), "1ms", True])
def test_gpu_decoder_refuses_a_bad_spin(spin_s):
    from agents.lm import PROMPT_LENGTH, Vocabulary, make_model
    from agents.lm_gpu import GPUDecoder

    vocabulary = Vocabulary()
    with pytest.raises(ValueError, match=r"spin_s=.*seconds in \[0, 1\]"):
        GPUDecoder(make_model(vocabulary), vocabulary.knob_ids, PROMPT_LENGTH, "cuda", spin_s=spin_s)


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


def test_layer0_tables_equal_the_per_token_forward():
    """The kernel reads layer 0's queries, keys (after RoPE) and values through the output projection from
    tables; they must be the model's own layer-0 computation for every (token, position), here done as
    NumpyDecoder does it (rotate_half by concatenation, not the table's permuted columns)."""
    pytest.importorskip("triton")
    from agents.base import load_controller
    from agents.lm import PROMPT_LENGTH
    from agents.lm_gpu import PackedLM

    controller = load_controller(ROOT / "results/m3_controllers/grpo")
    packed = PackedLM(controller.model, controller.vocabulary.knob_ids, PROMPT_LENGTH, "cpu")
    sd = {k: v.double() for k, v in controller.model.state_dict().items()}
    config = controller.model.config
    NH, D = config.num_attention_heads, config.hidden_size
    HD, eps = D // NH, config.rms_norm_eps
    emb = sd["model.embed_tokens.weight"]
    x = sd["model.layers.0.input_layernorm.weight"] * emb / torch.sqrt((emb * emb).mean(-1, keepdim=True) + eps)
    n_positions = PROMPT_LENGTH + 2  # the tree's positions: the prompt's, then one per answer token but the last
    cos = torch.from_numpy(controller.decoder._cos[:n_positions]).double()[None, :, None]  # [1, NPOS, 1, HD]
    sin = torch.from_numpy(controller.decoder._sin[:n_positions]).double()[None, :, None]

    def rope(t):  # [V, D] -> [V, NPOS, D]
        t = t.reshape(len(t), 1, NH, HD)
        rotated = torch.cat([-t[..., HD // 2:], t[..., : HD // 2]], -1)
        return (t * cos + rotated * sin).reshape(len(t), n_positions, D)

    q = rope(x @ sd["model.layers.0.self_attn.q_proj.weight"].T)
    k = rope(x @ sd["model.layers.0.self_attn.k_proj.weight"].T)
    v = (x @ sd["model.layers.0.self_attn.v_proj.weight"].T).reshape(-1, NH, HD)
    o = sd["model.layers.0.self_attn.o_proj.weight"].T.reshape(NH, HD, D)
    vo = torch.einsum("vhd,hde->vhe", v, o)
    tables = packed.weights
    assert tables["q0"].shape == q.shape and tables["vo0"].shape == vo.shape
    for name, want in (("q0", q), ("k0", k), ("vo0", vo)):
        got = tables[name].double()
        assert torch.allclose(got, want, rtol=1e-6, atol=1e-6 * want.abs().max().item()), name


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
    # waiting on the stream alone (no polling of the pinned answer) decides the same
    controller.gpu_decoder = GPUDecoder(controller.model, controller.vocabulary.knob_ids, PROMPT_LENGTH, "cuda", spin_s=0)
    waited = np.array([controller.select_index({k: v[i] for k, v in observations.items()}) for i in range(len(expected))])
    assert np.array_equal(waited, one_by_one)
    controller.use_device("cpu")
    assert np.array_equal(controller.select_indices(observations), expected)


@pytest.mark.gpu
@gpu
def test_batch_1_decision_outlasting_its_polling_waits_on_the_stream():
    """Work queued ahead of a decision in the stream (here a ~50 ms sleep kernel) outlasts the 0.1 ms of polling:
    the decision then waits on the stream and returns its own answer, not the unwritten marker."""
    from agents.base import load_controller
    from agents.lm import PROMPT_LENGTH
    from agents.lm_gpu import GPUDecoder

    controller = load_controller(ROOT / "results/m3_controllers/grpo")
    observations = heldout_observations(20)
    singles = [{k: v[i] for k, v in observations.items()} for i in range(20)]
    controller.use_device("cuda")
    expected = [controller.select_index(single) for single in singles]
    controller.gpu_decoder = GPUDecoder(controller.model, controller.vocabulary.knob_ids, PROMPT_LENGTH, "cuda", spin_s=1e-4)
    got = []
    for single in singles:
        torch.cuda._sleep(100_000_000)  # GPU clock cycles
        got.append(controller.select_index(single))
    assert got == expected and len(set(expected)) >= 2
