"""Runs the Triton MoE kernels in Triton's CPU interpreter against the float64 reference.

Started by tests/test_moe_kernels.py in a subprocess with TRITON_INTERPRET=1, which must be set
before triton is first imported and would slow every other triton user of a shared process.
Exits non-zero, naming the case, if any output is off. `--size large` adds bigger (slower) cases.

Interpreter limits (triton 3.9): tl.dot on bfloat16 tiles multiplies the raw bits, so the grouped
GEMM is checked here in float32 and float16; bfloat16 is covered by the GPU tests.
"""
from __future__ import annotations

import sys

import torch
from _interpret import rel_err, start

from flexvlm_env.model.moe_kernels import (
    DecodeConfig,
    PrefillConfig,
    moe_decode_triton,
    moe_forward,
    moe_prefill_triton,
    moe_reference,
)

# Relative error ||out - ref|| / ||ref|| allowed per storage dtype (intermediates are kept in it).
TOLERANCE = {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}


def random_moe(num_tokens, top_k, num_experts, d_model, hidden, dtype, *, unused_expert=None, hot_expert=None,
               device="cpu"):
    """Router-like inputs: softmax over random logits, top-k without renormalisation."""
    logits = torch.randn(num_tokens, num_experts, device=device)
    if unused_expert is not None:
        logits[:, unused_expert] = -float("inf")
    if hot_expert is not None:
        logits[:, hot_expert] = 100.0
    topk_weights, topk_ids = torch.softmax(logits, dim=-1).topk(top_k, dim=-1)
    x = torch.randn(num_tokens, d_model, device=device).to(dtype)
    w_gate_up = (torch.randn(num_experts, 2 * hidden, d_model, device=device) / d_model**0.5).to(dtype)
    w_down = (torch.randn(num_experts, d_model, hidden, device=device) / hidden**0.5).to(dtype)
    return x, topk_ids, topk_weights, w_gate_up, w_down


def relative_error(out, args):
    ref = moe_reference(*(t.double() if t.is_floating_point() else t for t in args))
    assert torch.isfinite(out).all(), "non-finite output (an element left unwritten?)"
    return rel_err(out, ref)


def check(report, name, out, args, dtype):
    err = relative_error(out, args)
    report.record(name, err < TOLERANCE[dtype], f"rel err {err:.2e} (tol {TOLERANCE[dtype]:.0e})")


def decode_case(report, name, top_k, num_experts, d_model, hidden, dtype, config, flat_x=False, **kw):
    args = random_moe(1, top_k, num_experts, d_model, hidden, dtype, **kw)
    x = args[0][0] if flat_x else args[0]
    # Poisoned buffers: a NaN left anywhere means the kernels skipped an element.
    out = torch.full_like(x, float("nan"))
    workspace = torch.full((top_k * hidden,), float("nan"))
    out = moe_decode_triton(x, *args[1:], out=out, workspace=workspace, config=config)
    assert out.shape == x.shape, (out.shape, x.shape)
    check(report, f"decode {name}", out.reshape(1, -1), args, dtype)


def prefill_case(report, name, num_tokens, top_k, num_experts, d_model, hidden, dtype, config=None, **kw):
    args = random_moe(num_tokens, top_k, num_experts, d_model, hidden, dtype, **kw)
    check(report, f"prefill {name}", moe_prefill_triton(*args, config=config), args, dtype)


def main() -> int:
    def size_argument(parser):
        parser.add_argument("--size", choices=["small", "large"], default="small")

    report, opts = start(__doc__, size_argument)
    f32, f16, bf16 = torch.float32, torch.float16, torch.bfloat16
    tiny = PrefillConfig(block_m=16, block_n=16, block_k=16)
    odd = DecodeConfig(block_h=8, block_d=16, block_out=8, block_hk=16)  # blocks that don't divide the dims
    decode_case(report, "k=1", 1, 4, 32, 16, f32, DecodeConfig(4, 16, 8, 16))
    decode_case(report, "k=E", 4, 4, 32, 16, f32, DecodeConfig(4, 16, 8, 16))
    decode_case(report, "ragged dims, x 1-D", 3, 6, 40, 20, f32, odd, flat_x=True)
    decode_case(report, "bf16", 3, 8, 64, 32, bf16, DecodeConfig(8, 32, 16, 16))
    decode_case(report, "fp16 default config", 2, 8, 64, 32, f16, None)
    prefill_case(report, "T=37 k=3 (T not a multiple of block_m), unused + all-token experts",
                 37, 3, 8, 32, 16, f32, tiny, unused_expert=2, hot_expert=5)
    prefill_case(report, "T=2 k=1", 2, 1, 4, 32, 16, f32, tiny)
    prefill_case(report, "T=5 k=E", 5, 6, 6, 32, 16, f32, tiny)
    prefill_case(report, "ragged dims", 9, 2, 5, 40, 24, f32, tiny)
    prefill_case(report, "fp16 default config", 20, 4, 8, 64, 32, f16)
    args = random_moe(3, 2, 4, 32, 16, f32)
    check(report, "moe_forward impl=triton T=3", moe_forward(*args, impl="triton"), args, f32)
    if opts.size == "large":
        prefill_case(report, "T=300 k=8 E=16 default config", 300, 8, 16, 64, 32, f32)
        prefill_case(report, "T=129 k=16 E=16 block_m=32", 129, 16, 16, 64, 32, f32,
                     PrefillConfig(block_m=32, block_n=32, block_k=32), unused_expert=0)
        decode_case(report, "k=16 E=16 default config", 16, 16, 128, 64, f32, None)
    return report.exit_code


if __name__ == "__main__":
    sys.exit(main())
