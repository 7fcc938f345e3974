"""Tests of flexvlm_env/model/moe_kernels.py: the torch reference against a direct formula, the
sorting helper, argument errors, the Triton kernels in Triton's interpreter (subprocess) and, with
a GPU, compiled in bf16 and captured in a CUDA graph."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from _interpret import REPO_ROOT, rel_err, run_interpret_check
from _moe_interpret_check import random_moe

from flexvlm_env.model.moe_kernels import (
    align_block_size,
    default_prefill_config,
    moe_decode_triton,
    moe_forward,
    moe_prefill_triton,
    moe_reference,
)

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def direct_moe(x, topk_ids, topk_weights, w_gate_up, w_down):
    """The formula written out token by token, slot by slot, in float64."""
    hidden = w_down.shape[2]
    out = torch.zeros(x.shape, dtype=torch.float64)
    for t in range(x.shape[0]):
        for j in range(topk_ids.shape[1]):
            e = int(topk_ids[t, j])
            gate = w_gate_up[e, :hidden].double() @ x[t].double()
            up = w_gate_up[e, hidden:].double() @ x[t].double()
            out[t] += float(topk_weights[t, j]) * (w_down[e].double() @ (F.silu(gate) * up))
    return out


@pytest.mark.parametrize("num_tokens,top_k,num_experts,d_model,hidden", [
    (1, 1, 4, 16, 8), (1, 4, 4, 16, 8), (1, 3, 8, 24, 12), (7, 2, 8, 16, 8), (13, 5, 5, 16, 8), (30, 3, 8, 24, 12),
])
def test_reference_matches_direct_formula(num_tokens, top_k, num_experts, d_model, hidden):
    args = random_moe(num_tokens, top_k, num_experts, d_model, hidden, torch.float64, unused_expert=0)
    assert rel_err(moe_reference(*args), direct_moe(*args)) < 1e-12


def test_reference_keeps_dtype_and_shape_and_int32_ids():
    x, ids, weights, w_gate_up, w_down = random_moe(1, 2, 4, 16, 8, torch.bfloat16)
    out = moe_reference(x[0], ids.int(), weights, w_gate_up, w_down)
    assert out.dtype == torch.bfloat16 and out.shape == (16,)
    assert rel_err(out[None], direct_moe(x, ids, weights, w_gate_up, w_down)) < 1e-2


@pytest.mark.parametrize("num_experts,hot_expert", [(6, 4), (300, 257)])  # uint8 and int32 sort keys
def test_align_block_size_places_each_pair_once_in_blocks_of_one_expert(num_experts, hot_expert):
    block_m = 4
    _, topk_ids, *_ = random_moe(11, 3, num_experts, 8, 4, torch.float32, unused_expert=1, hot_expert=hot_expert)
    sorted_pair_ids, expert_ids, num_padded = align_block_size(topk_ids, block_m, num_experts)
    num_pairs, num_padded = topk_ids.numel(), int(num_padded)
    assert num_padded % block_m == 0 and num_padded <= sorted_pair_ids.numel()
    used = sorted_pair_ids[:num_padded]
    real = used[used < num_pairs].long()
    assert sorted(real.tolist()) == list(range(num_pairs))
    assert (sorted_pair_ids[num_padded:] == num_pairs).all()
    flat_ids = topk_ids.flatten()
    for block in range(num_padded // block_m):
        pairs = used[block * block_m:(block + 1) * block_m]
        pairs = pairs[pairs < num_pairs].long()
        assert len(pairs) > 0, "a block holds padding only"
        assert (flat_ids[pairs] == expert_ids[block]).all()
    # Stable: each expert's pairs keep their order (token, then slot), as with a stable sort of the ids.
    assert torch.equal(real, torch.sort(flat_ids.long(), stable=True)[1])


@pytest.mark.parametrize("change,argument", [
    (lambda a: {**a, "x": a["x"][:, :-1]}, "x"),
    (lambda a: {**a, "topk_ids": a["topk_ids"][:-1]}, "topk_ids"),
    (lambda a: {**a, "topk_ids": a["topk_ids"].float()}, "topk_ids"),
    (lambda a: {**a, "topk_weights": a["topk_weights"][:, :1]}, "topk_weights"),
    (lambda a: {**a, "w_gate_up": a["w_gate_up"][:, :-1]}, "w_gate_up"),
    (lambda a: {**a, "w_down": a["w_down"][:-1]}, "w_down"),
])
def test_bad_arguments_name_the_argument(change, argument):
    args = dict(zip(["x", "topk_ids", "topk_weights", "w_gate_up", "w_down"],
                    random_moe(3, 2, 4, 16, 8, torch.float32)))
    with pytest.raises(ValueError, match=argument):
        moe_forward(**change(args))


def test_moe_forward_rejects_unknown_impl_and_cpu_triton():
    args = random_moe(3, 2, 4, 16, 8, torch.float32)
    with pytest.raises(ValueError, match="impl"):
        moe_forward(*args, impl="fast")
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.importorskip("triton")
        with pytest.raises(ValueError, match="CUDA"):
            moe_forward(*args, impl="triton")


def test_moe_forward_auto_on_cpu_is_the_reference():
    args = random_moe(5, 2, 4, 16, 8, torch.float32)
    assert torch.equal(moe_forward(*args), moe_reference(*args))


def test_triton_kernels_in_interpreter():
    run_interpret_check("_moe_interpret_check.py", "--size", "small")


@pytest.mark.slow
def test_triton_kernels_in_interpreter_larger_cases():
    run_interpret_check("_moe_interpret_check.py", "--size", "large")


def test_prefill_tiles_per_card():
    # pairs per expert -> block_m. The H200 never takes 16-row blocks (slower in its whole-model prefill at
    # 6-16 pairs per expert); the H100 keeps them up to 16; other cards get the H100's table.
    expected = {"H100": {64: 16, 16 * 64: 16, 17 * 64: 64, 96 * 64: 64, 97 * 64: 128},
                "H200": {64: 64, 16 * 64: 64, 96 * 64: 64, 97 * 64: 128},
                "A100": {64: 16, 97 * 64: 128}}
    for card, by_pairs in expected.items():
        for num_pairs, block_m in by_pairs.items():
            assert default_prefill_config(num_pairs, 64, 2, card).block_m == block_m, (card, num_pairs)
    # float32: half the K tile, two stages (shared memory), same rows
    config = default_prefill_config(64, 64, 4, "H200")
    assert (config.block_m, config.block_k, config.num_stages) == (64, 32, 2)


def test_bench_script_dry_run(tmp_path):
    out_path = tmp_path / "bench.json"
    subprocess.run([sys.executable, str(REPO_ROOT / "scripts" / "bench_moe_kernels.py"), "--dry-run",
                    "--out", str(out_path)], cwd=REPO_ROOT, check=True, capture_output=True, timeout=300)
    result = json.loads(out_path.read_text())
    assert result["decode"] and result["prefill"]
    assert all("error" not in row for row in result["decode"])
    assert all(row["rel_err_vs_fp64"] < 1e-4 for row in result["decode"] + result["prefill"] if "error" not in row)
    # The tile sweep alone (on the dry run: the card's default tile, one row per token count).
    subprocess.run([sys.executable, str(REPO_ROOT / "scripts" / "bench_moe_kernels.py"), "--dry-run",
                    "--sections", "prefill_tiles", "--out", str(out_path)], cwd=REPO_ROOT, check=True,
                   capture_output=True, timeout=300)
    result = json.loads(out_path.read_text())
    assert set(result) == {"meta", "prefill_tiles"}
    assert [row["num_tokens"] for row in result["prefill_tiles"]] == [16, 40]
    assert all(row["default"] and row["rel_err_vs_fp64"] < 1e-4 for row in result["prefill_tiles"])
    bad = subprocess.run([sys.executable, str(REPO_ROOT / "scripts" / "bench_moe_kernels.py"), "--dry-run",
                          "--sections", "tiles", "--out", str(out_path)], cwd=REPO_ROOT, capture_output=True,
                         text=True, timeout=300)
    assert bad.returncode != 0 and "--sections" in bad.stderr
    bad = subprocess.run([sys.executable, str(REPO_ROOT / "scripts" / "bench_moe_kernels.py"), "--dry-run",
                          "--prefill-tile-block-m", "24", "--out", str(out_path)], cwd=REPO_ROOT, capture_output=True,
                         text=True, timeout=300)
    assert bad.returncode != 0 and "--prefill-tile-block-m (24,)" in bad.stderr


# ---------------------------------------------------------------------------------------------------
# GPU: compiled kernels, bf16


def random_moe_cuda(num_tokens, top_k, num_experts=64, d_model=2048, hidden=1024, **kw):
    return random_moe(num_tokens, top_k, num_experts, d_model, hidden, torch.bfloat16, device="cuda", **kw)


def reference_fp64(args):
    return moe_reference(*(t.double() if t.is_floating_point() else t for t in args))


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("top_k", [1, 2, 8, 64])
def test_decode_triton_bf16_gpu(top_k):
    args = random_moe_cuda(1, top_k)
    out = torch.full_like(args[0], float("nan"))
    moe_decode_triton(*args, out=out)
    assert rel_err(out, reference_fp64(args)) < 1e-2


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("num_tokens,top_k,num_experts,d_model,hidden", [
    (2, 1, 64, 2048, 1024), (100, 8, 64, 2048, 1024), (1300, 8, 64, 2048, 1024), (37, 64, 64, 256, 128),
    (333, 4, 8, 256, 128),
])
def test_prefill_triton_bf16_gpu(num_tokens, top_k, num_experts, d_model, hidden):
    args = random_moe_cuda(num_tokens, top_k, num_experts, d_model, hidden, unused_expert=3, hot_expert=5)
    assert rel_err(moe_prefill_triton(*args), reference_fp64(args)) < 1e-2
    assert rel_err(moe_forward(*args), reference_fp64(args)) < 1e-2


@pytest.mark.gpu
@gpu
def test_decode_replays_in_cuda_graph_with_new_ids():
    top_k = 4
    x, ids, weights, w_gate_up, w_down = random_moe_cuda(1, top_k)
    out = torch.empty_like(x)
    workspace = torch.empty(top_k * w_down.shape[2], dtype=torch.float32, device="cuda")
    moe_decode_triton(x, ids, weights, w_gate_up, w_down, out=out, workspace=workspace)  # compile first
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        moe_decode_triton(x, ids, weights, w_gate_up, w_down, out=out, workspace=workspace)
    for _ in range(3):
        x_new, ids_new, weights_new, *_ = random_moe_cuda(1, top_k)
        x.copy_(x_new), ids.copy_(ids_new), weights.copy_(weights_new)
        out.fill_(float("nan"))
        graph.replay()
        ref = reference_fp64((x, ids, weights, w_gate_up, w_down))
        assert rel_err(out, ref) < 1e-2
        assert torch.equal(out, moe_decode_triton(x, ids, weights, w_gate_up, w_down))
