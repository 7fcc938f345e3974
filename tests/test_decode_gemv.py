"""Tests of flexvlm_env/model/decode_gemv.py: the torch reference against what decoder.py computes (the
attention norm then the projection), argument errors and dispatch, the Triton kernel in Triton's
interpreter (subprocess) and, with a GPU, compiled in bf16 at MolmoE-1B's shapes and captured in a
CUDA graph."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from _interpret import nonzero_randn, run_interpret_check

from flexvlm_env.model.args import ModelArgs
from flexvlm_env.model.decode_gemv import (
    GemvConfig,
    decode_gemv,
    decode_gemv_auto,
    decode_gemv_reference,
    default_gemv_config,
)
from flexvlm_env.model.decoder import Attention

EPS = 1e-5
gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_reference_is_the_decoders_norm_then_projection(dtype):
    """decoder.py: x = x + sublayer(x), then att_proj(attn_norm(x)): the reference gives both, bit for bit."""
    attn = Attention(ModelArgs(d_model=64, n_heads=4)).to(dtype)
    torch.nn.init.normal_(attn.attn_norm.weight, 1.0, 0.3)
    y, residual = nonzero_randn(1, 64).to(dtype), nonzero_randn(1, 64).to(dtype)
    new_residual = residual + y
    out, got_residual = decode_gemv_reference(y, attn.att_proj.weight, residual=residual,
                                              norm_weight=attn.attn_norm.weight, eps=attn.attn_norm.eps)
    assert torch.equal(got_residual, new_residual)
    assert torch.equal(out, attn.att_proj(attn.attn_norm(new_residual)))
    # Without residual: the norm of x alone (the first block); without norm_weight: the projection.
    out, none = decode_gemv_reference(y, attn.att_proj.weight, norm_weight=attn.attn_norm.weight, eps=attn.attn_norm.eps)
    assert none is None and torch.equal(out, attn.att_proj(attn.attn_norm(y)))
    assert torch.equal(decode_gemv_reference(y, attn.att_proj.weight)[0], F.linear(y, attn.att_proj.weight))


def _args(**change):
    args = {"x": torch.randn(1, 64), "weight": torch.randn(48, 64), "residual": torch.randn(1, 64),
            "norm_weight": torch.randn(64)}
    return {**args, **change}


@pytest.mark.parametrize("change,message", [
    ({"x": torch.randn(2, 64)}, "x must be one token"),
    ({"x": torch.randn(64)}, "x must be one token"),
    ({"x": torch.zeros(1, 64, dtype=torch.int64)}, "x must be one of"),
    ({"weight": torch.randn(48, 32)}, "weight must be"),
    ({"weight": torch.randn(48, 64).half()}, "weight must share"),
    ({"residual": torch.randn(1, 32)}, "residual must match"),
    ({"norm_weight": torch.randn(32)}, "norm_weight must be"),
    ({"norm_weight": None}, "residual needs norm_weight"),
])
def test_bad_arguments_name_the_argument(change, message):
    for call in (decode_gemv_reference, decode_gemv):
        with pytest.raises(ValueError, match=message):
            call(**_args(**change))


def test_buffers_and_config_are_checked():
    args = _args()
    for alias in ("residual", "x"):
        with pytest.raises(ValueError, match="residual_out must be another buffer"):
            decode_gemv(**args, residual_out=args[alias])
    with pytest.raises(ValueError, match="residual_out needs residual"):
        decode_gemv(**_args(residual=None), residual_out=torch.empty(1, 64))
    with pytest.raises(ValueError, match="weight must be contiguous"):
        decode_gemv(**_args(weight=torch.randn(64, 48).t()))
    for bad in ({"block_n": 3}, {"block_k": 0}, {"block_k": True}, {"num_warps": 3}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            GemvConfig(**bad)
    assert default_gemv_config(96, 64, True) == GemvConfig()  # a shape without a measured tile


def test_auto_on_cpu_is_the_reference_and_impl_is_checked():
    args = _args()
    out, residual = decode_gemv_auto(**args)
    ref, ref_residual = decode_gemv_reference(**args)
    assert torch.equal(out, ref) and torch.equal(residual, ref_residual)
    with pytest.raises(ValueError, match="impl"):
        decode_gemv_auto(**args, impl="cublas")


def test_triton_kernel_in_interpreter():
    run_interpret_check("_gemv_interpret_check.py")


@pytest.mark.gpu
@gpu
def test_decode_gemv_bf16_in_cuda_graph():
    """MolmoE-1B's projections (q/k/v with the add and norm fused, 6144 x 2048; output, 2048 x 2048),
    16 launches in a graph replayed with new inputs: outputs within two bf16 ulps of the largest output
    of the reference (the norm's scale is applied to the sums, not to a rounded vector), new residuals
    exact."""
    torch.manual_seed(0)
    d, blocks = 2048, 16
    ws_qkv = [(torch.randn(3 * d, d, device="cuda") * d ** -0.5).bfloat16() for _ in range(blocks)]
    ws_out = [(torch.randn(d, d, device="cuda") * d ** -0.5).bfloat16() for _ in range(blocks)]
    norm_w = (1 + 0.3 * torch.randn(d, device="cuda")).bfloat16()
    y, residual = (torch.empty(1, d, dtype=torch.bfloat16, device="cuda") for _ in range(2))
    outs = [(torch.empty(1, 3 * d, dtype=torch.bfloat16, device="cuda"), torch.empty(1, d, dtype=torch.bfloat16, device="cuda"),
             torch.empty(1, d, dtype=torch.bfloat16, device="cuda")) for _ in range(blocks)]

    def step():
        for w_qkv, w_out, (qkv, new_residual, out) in zip(ws_qkv, ws_out, outs):
            decode_gemv(y, w_qkv, residual=residual, norm_weight=norm_w, eps=EPS, out=qkv, residual_out=new_residual)
            decode_gemv(qkv[:, :d], w_out, out=out)

    y.copy_(torch.randn(1, d)); residual.copy_(torch.randn(1, d))
    step()  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    for _ in range(3):
        y.copy_(torch.randn(1, d)); residual.copy_(torch.randn(1, d))
        for buffers in outs:
            for b in buffers:
                b.fill_(float("nan"))
        graph.replay()
        for w_qkv, w_out, (qkv, new_residual, out) in zip(ws_qkv, ws_out, outs):
            ref, ref_residual = decode_gemv_reference(y, w_qkv, residual=residual, norm_weight=norm_w, eps=EPS)
            assert torch.equal(new_residual, ref_residual)
            torch.testing.assert_close(qkv.float(), ref.float(), rtol=0, atol=2 * 2 ** -8 * ref.float().abs().max().item())
            ref_out = F.linear(qkv[:, :d], w_out)
            torch.testing.assert_close(out.float(), ref_out.float(), rtol=0, atol=2 * 2 ** -8 * ref_out.float().abs().max().item())


def test_bench_decode_kernels_script_dry_run(tmp_path):
    """scripts/bench_decode_kernels.py end to end on the CPU references: every section writes rows, the
    GEMV rows match the reference and the greedy token is torch's argmax."""
    root = Path(__file__).resolve().parents[1]
    out_path = tmp_path / "kernels.json"
    subprocess.run([sys.executable, str(root / "scripts" / "bench_decode_kernels.py"), "--dry-run", "--out", str(out_path)],
                   cwd=root, check=True, capture_output=True, timeout=300)
    rows = json.loads(out_path.read_text())["rows"]
    assert {r["kernel"] for r in rows} == {"greedy", "gemv", "moe_reference"}
    gemv = [r for r in rows if r.get("method") == "decode_gemv"]
    assert {r["norm_fused"] for r in gemv} == {True, False} and all(r["max_rel_err_vs_reference"] == 0.0 for r in gemv)
    assert all(r["equal_to_argmax"] == "2/2" for r in rows if r.get("method") == "greedy_token")
    assert all(r["us"] > 0 for r in rows)
