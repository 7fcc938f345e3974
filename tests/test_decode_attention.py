"""Tests of flexvlm_env/model/decode_attention.py: the torch reference against the masked SDPA that
decoder.decode_forward_fused runs today and against a direct float64 formula, argument errors and
dispatch, the split-KV Triton kernels in Triton's interpreter (subprocess) and, with a GPU, compiled
in bf16, captured in a CUDA graph and timed against masked SDPA."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from _decode_attention_interpret_check import (
    float64_attention,
    poison_after_,
    qk_case,
    random_case,
)
from _interpret import run_interpret_check

from flexvlm_env.model.decode_attention import (
    decode_attention,
    decode_attention_auto,
    decode_attention_qk,
    decode_attention_qk_auto,
    decode_attention_qk_reference,
    decode_attention_reference,
    split_plan,
)
from flexvlm_env.model.decoder import rope_tables
from flexvlm_env.model.fused_kernels import qk_norm_rope_kv_reference

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def sdpa_masked(q, key_cache, value_cache, slot: int):
    """What decode_forward_fused computes today: generate.decode_one_token's mask over the whole cache."""
    mask = (torch.arange(key_cache.shape[2], device=q.device) <= slot)[None, None, None, :]
    return F.scaled_dot_product_attention(q, key_cache, value_cache, attn_mask=mask)


def assert_close_ulps(out, ref, dtype):
    """Equal up to a couple of rounding steps of `dtype` (relative, and absolute scaled by the largest
    value: SDPA and the kernel round q·k or p in other places). A NaN (an unwritten element) fails."""
    eps = {torch.float32: 1e-5, torch.float16: 2**-9, torch.bfloat16: 2**-7}[dtype]
    torch.testing.assert_close(out.float(), ref.float(), rtol=eps, atol=eps * ref.float().abs().max().item())


# ---------------------------------------------------------------------------------------------------
# Reference == masked SDPA, and == float64


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("max_seq,slot", [(64, 0), (64, 37), (64, 63), (200, 128), (200, 199)])
def test_reference_matches_masked_sdpa(dtype, max_seq, slot):
    q, key_cache, value_cache = random_case(max_seq, 4, 32, dtype)
    ref = decode_attention_reference(q, key_cache, value_cache, torch.tensor([slot]))
    assert ref.dtype == dtype and ref.shape == q.shape
    assert_close_ulps(ref, sdpa_masked(q, key_cache, value_cache, slot), dtype)


def test_reference_matches_direct_float64_formula():
    q, key_cache, value_cache = (t.double() for t in random_case(50, 3, 16, torch.float32))
    slot = 20
    out = decode_attention_reference(q, key_cache, value_cache, torch.tensor([slot]))
    for head in range(3):
        scores = [float(q[0, head, 0] @ key_cache[0, head, j]) / math.sqrt(16) for j in range(slot + 1)]
        top = max(scores)
        weights = [math.exp(s - top) for s in scores]
        expected = sum(w * value_cache[0, head, j] for j, w in enumerate(weights)) / sum(weights)
        assert torch.allclose(out[0, head, 0], expected, rtol=1e-12, atol=1e-12)
    assert torch.allclose(out, float64_attention(q, key_cache, value_cache, slot), rtol=1e-12, atol=1e-12)


def test_reference_ignores_slots_after_the_slot_but_not_before():
    q, key_cache, value_cache = random_case(64, 2, 32, torch.float32)
    ref = decode_attention_reference(q, key_cache, value_cache, torch.tensor([40]))
    changed = key_cache.clone()
    changed[:, :, 41:] = 100.0  # finite: the mask (not a NaN) keeps them out
    assert torch.equal(decode_attention_reference(q, changed, value_cache, torch.tensor([40])), ref)
    changed[:, :, 40] = 100.0
    assert not torch.allclose(decode_attention_reference(q, changed, value_cache, torch.tensor([40])), ref)


# ---------------------------------------------------------------------------------------------------
# Arguments and dispatch


def attention_args(**change):
    q, key_cache, value_cache = random_case(64, 4, 32, torch.float32)
    args = {"q": q, "key_cache": key_cache, "value_cache": value_cache, "slot": torch.tensor([10])}
    return {**args, **{k: v(args) for k, v in change.items()}}


@pytest.mark.parametrize("change,argument", [
    ({"q": lambda a: a["q"].expand(2, -1, -1, -1)}, "q"),
    ({"q": lambda a: a["q"].expand(-1, -1, 3, -1)}, "q"),
    ({"q": lambda a: a["q"].int()}, "q"),
    ({"q": lambda a: torch.ones(1, 4, 1, 512)}, "q"),
    ({"key_cache": lambda a: a["key_cache"][:, :2]}, "key_cache"),
    ({"key_cache": lambda a: a["key_cache"][..., :16]}, "key_cache"),
    ({"key_cache": lambda a: a["key_cache"].half()}, "key_cache"),
    ({"key_cache": lambda a: a["key_cache"].transpose(2, 3).contiguous().transpose(2, 3)}, "key_cache"),
    ({"value_cache": lambda a: a["value_cache"][:, :, :-1]}, "value_cache"),
    ({"value_cache": lambda a: a["value_cache"].bfloat16()}, "value_cache"),
    ({"slot": lambda a: torch.tensor([1, 2])}, "slot"),
    ({"slot": lambda a: torch.tensor([1.0])}, "slot"),
])
def test_bad_arguments_name_the_argument(change, argument):
    with pytest.raises(ValueError, match=argument):
        decode_attention_auto(**attention_args(**change))



def test_bench_script_dry_run(tmp_path):
    """scripts/bench_decode_attention.py end to end on the CPU reference path: rows per split count."""
    root = Path(__file__).resolve().parents[1]
    out_path = tmp_path / "attn.json"
    subprocess.run([sys.executable, str(root / "scripts" / "bench_decode_attention.py"), "--dry-run",
                    "--out", str(out_path)], cwd=root, check=True, capture_output=True, timeout=300)
    rows = json.loads(out_path.read_text())["rows"]
    assert [(r["chunk"], r["num_splits"]) for r in rows] == [(64, 16), (16, 64)]  # micro: 1024 slots
    assert all(r["max_abs_err_vs_reference"] == 0.0 and r["us_per_call"] > 0 for r in rows)

def test_split_plan_and_preallocated_buffers_are_checked():
    assert split_plan(2048, 128) == (32, 64, 64)  # the decoder's shape: 32 x 16 heads = 512 one-tile programs
    assert split_plan(200, 32) == (4, 50, 64)
    assert split_plan(64, 32, 24) == (24, 3, 16)
    for bad in (0, 65, 2.0):
        with pytest.raises(ValueError, match="num_splits"):
            split_plan(64, 32, bad)
    args = attention_args()
    with pytest.raises(ValueError, match="workspace"):
        decode_attention_auto(**args, impl="triton", workspace=torch.empty(4, 2, 34))  # 1 split for 64 slots
    with pytest.raises(ValueError, match="workspace"):
        decode_attention_auto(**args, impl="triton", num_splits=2, workspace=torch.empty(4, 2, 34).half())
    with pytest.raises(ValueError, match="out"):
        decode_attention_auto(**args, impl="triton", out=torch.empty(1, 4, 1, 32).half())
    with pytest.raises(ValueError, match="out"):
        decode_attention_auto(**args, out=torch.empty(1, 4, 32))
    with pytest.raises(ValueError, match="num_warps=3"):
        decode_attention(**args, num_warps=3)


def test_auto_on_cpu_is_the_reference_and_impl_is_checked():
    args = attention_args()
    ref = decode_attention_reference(**args)
    assert torch.equal(decode_attention_auto(**args), ref)
    out = torch.full_like(args["q"], float("nan"))
    assert decode_attention_auto(**args, out=out) is out and torch.equal(out, ref)
    with pytest.raises(ValueError, match="impl"):
        decode_attention_auto(**args, impl="flash")
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.importorskip("triton")
        with pytest.raises(ValueError, match="CUDA"):
            decode_attention(**args)


def qk_args(max_seq=64, n_heads=2, head_dim=32, slot=40, dtype=torch.float32):
    torch.manual_seed(0)
    d = n_heads * head_dim
    qkv = torch.randn(1, 3 * d, dtype=dtype)
    cos, sin = rope_tables(torch.arange(max_seq), head_dim, 10_000.0)
    _, key_cache, value_cache = random_case(max_seq, n_heads, head_dim, dtype)
    return dict(qkv=qkv, square_sums=qkv[0, :2 * d].float().reshape(2, -1, 4).square().sum(-1),
                q_norm_w=torch.ones(d, dtype=dtype), k_norm_w=torch.ones(d, dtype=dtype), cos=cos, sin=sin,
                key_cache=key_cache, value_cache=value_cache, slot=torch.tensor([slot]), n_heads=n_heads, eps=1e-5)


def test_qk_reference_is_the_qk_kernel_reference_then_attention():
    args = qk_args()
    expected_caches = (args["key_cache"].clone(), args["value_cache"].clone())
    q = qk_norm_rope_kv_reference(args["qkv"], args["q_norm_w"], args["k_norm_w"], args["cos"], args["sin"],
                                  *expected_caches, args["slot"], args["n_heads"], args["eps"])
    expected = decode_attention_reference(q, *expected_caches, args["slot"])
    assert torch.equal(decode_attention_qk_reference(**args), expected)
    assert torch.equal(args["key_cache"], expected_caches[0]) and torch.equal(args["value_cache"], expected_caches[1])
    # auto on CPU is the reference (qk_args is seeded: the same inputs twice)
    assert torch.equal(decode_attention_qk_auto(**qk_args()), decode_attention_qk_reference(**qk_args()))
    with pytest.raises(ValueError, match="impl"):
        decode_attention_qk_auto(**qk_args(), impl="flash")


@pytest.mark.parametrize("square_sums", [torch.zeros(2, 8, dtype=torch.float64), torch.zeros(3), torch.zeros(16)[::2]])
def test_qk_square_sums_are_checked(square_sums):
    for call in (decode_attention_qk_reference, decode_attention_qk):
        with pytest.raises(ValueError, match="square_sums must be contiguous float32"):
            call(**qk_args() | {"square_sums": square_sums})


def test_qk_checks_its_other_arguments_as_the_qk_kernel_does():
    with pytest.raises(ValueError, match="qkv must be"):
        decode_attention_qk(**qk_args() | {"qkv": torch.randn(1, 100)})
    with pytest.raises(ValueError, match="cos must be"):
        decode_attention_qk(**qk_args() | {"cos": torch.randn(3, 32)})


# ---------------------------------------------------------------------------------------------------
# Triton interpreter


def test_triton_kernels_in_interpreter():
    run_interpret_check("_decode_attention_interpret_check.py")


# ---------------------------------------------------------------------------------------------------
# GPU: compiled kernels, bf16, CUDA graphs, timing


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("max_seq,n_heads,head_dim", [(2048, 16, 128), (200, 2, 128), (64, 16, 32)])
def test_decode_attention_bf16_gpu(max_seq, n_heads, head_dim):
    _, chunk, _ = split_plan(max_seq, head_dim)
    for slot in sorted({0, chunk - 1, min(chunk, max_seq - 1), max_seq // 2 + 1, max_seq - 1}):
        q, key_cache, value_cache = (t.cuda() for t in random_case(max_seq, n_heads, head_dim, torch.bfloat16))
        slot_t = torch.tensor([slot], device="cuda")
        ref = decode_attention_reference(q, key_cache, value_cache, slot_t)
        poison_after_(key_cache, value_cache, slot)
        assert_close_ulps(decode_attention(q, key_cache, value_cache, slot_t), ref, torch.bfloat16)


class _GpuReport:
    """The interpreter check's report, asserting instead of counting."""

    def check(self, name, problems):
        assert not problems, f"{name}: {problems}"


@pytest.mark.gpu
@gpu
def test_decode_attention_qk_bf16_gpu():
    """The q/k norms, RoPE and cache writes inside the compiled split programs, at the decoder's shape and a
    small one, against the reference (outputs, and the caches at the slot and nowhere else)."""
    torch.set_default_device("cuda")
    try:
        for slot in (0, 63, 64, 1300, 2047):
            qk_case(_GpuReport(), 2048, 16, 128, slot, torch.bfloat16, block_rows=16)
        qk_case(_GpuReport(), 200, 2, 32, 137, torch.float32)
    finally:
        torch.set_default_device("cpu")


@pytest.mark.gpu
@gpu
def test_decode_attention_replays_in_cuda_graph_with_new_slot():
    max_seq, n_heads, head_dim = 2048, 16, 128
    q, key_cache, value_cache = (t.cuda() for t in random_case(max_seq, n_heads, head_dim, torch.bfloat16))
    slot = torch.zeros(1, dtype=torch.long, device="cuda")
    out = torch.empty_like(q)
    decode_attention(q, key_cache, value_cache, slot, out=out)  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        decode_attention(q, key_cache, value_cache, slot, out=out)
    for new_slot in (1300, 0, 127, 128, max_seq - 1, 5):
        new_q, new_k, new_v = random_case(max_seq, n_heads, head_dim, torch.bfloat16)
        for buf, new in ((q, new_q), (key_cache, new_k), (value_cache, new_v)):
            buf.copy_(new)
        slot.fill_(new_slot)
        ref = decode_attention_reference(q, key_cache, value_cache, slot)
        poison_after_(key_cache, value_cache, new_slot)
        out.fill_(float("nan"))
        graph.replay()
        assert_close_ulps(out, ref, torch.bfloat16)


@pytest.mark.gpu
@gpu
def test_decode_attention_timing_vs_masked_sdpa_gpu():
    """Prints (asserts nothing) the time of one decode attention, the decoder's shape at slot 1300."""
    import triton.testing

    max_seq, n_heads, head_dim, slot, repeats = 2048, 16, 128, 1300, 16
    q, key_cache, value_cache = (t.cuda() for t in random_case(max_seq, n_heads, head_dim, torch.bfloat16))
    slot_t = torch.tensor([slot], device="cuda")
    mask = (torch.arange(max_seq, device="cuda") <= slot_t)[None, None, None, :]
    out = torch.empty_like(q)
    workspace = torch.empty(n_heads, split_plan(max_seq, head_dim)[0], head_dim + 2, device="cuda")
    calls = {
        "masked SDPA": lambda: F.scaled_dot_product_attention(q, key_cache, value_cache, attn_mask=mask),
        "split-KV triton": lambda: decode_attention(q, key_cache, value_cache, slot_t, workspace=workspace, out=out),
    }
    # Timed as the decode step runs them: replayed from a CUDA graph (16 calls a graph, as 16 blocks),
    # since eager launches of a few-microsecond kernel measure the host, not the GPU.
    times = {}
    for name, call in calls.items():
        call()
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(repeats):
                call()
        times[name] = triton.testing.do_bench(graph.replay) * 1e3 / repeats
    assert_close_ulps(out, decode_attention_reference(q, key_cache, value_cache, slot_t), torch.bfloat16)
    print(f"\ndecode attention H={n_heads} S={max_seq} hd={head_dim} slot={slot} bf16, "
          f"{torch.cuda.get_device_name()}: " + ", ".join(f"{name} {us:.1f} us" for name, us in times.items())
          + f", speedup {times['masked SDPA'] / times['split-KV triton']:.1f}x")
