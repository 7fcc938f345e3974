"""Runs the vision tower's kernels (quick_gelu, residual add + LayerNorm) in Triton's CPU interpreter
against the torch references.

Started by tests/test_vision_kernels.py in a subprocess with TRITON_INTERPRET=1. Outputs are poisoned
with NaN first, so an element left unwritten shows. The interpreter has no libdevice (the kernel uses
tl.exp there, not CUDA's expf) and truncates float32 -> bfloat16 casts, so results may differ from
torch by an ulp; bit-identity with CUDA's expf is checked by the GPU test.
"""
from __future__ import annotations

import sys

import torch
from _interpret import BF16, F16, F32, compare, nonzero_randn, start

from flexvlm_env.model.vision_kernels import (
    BLOCK,
    add_layer_norm,
    add_layer_norm_reference,
    quick_gelu,
    quick_gelu_auto,
    quick_gelu_reference,
)

EPS = 1e-5


def case(report, shape, dtype, scale=4.0):
    h = (torch.randn(*shape) * scale).to(dtype)
    ref = quick_gelu_reference(h)
    ref64 = h.double() * torch.sigmoid(1.702 * h.double())
    out = torch.full(shape, float("nan"), dtype=dtype)
    got = quick_gelu(h, out=out)
    problems = [] if got is out else ["did not write into `out`"]
    # float64 from the same inputs: the three roundings of the reference are part of the error budget.
    compare("quick_gelu", got, ref, ref64 if dtype == F32 else None, dtype, problems)
    report.check(f"quick_gelu {dtype} {tuple(shape)}", problems)


def add_layer_norm_case(report, shape, dtype, in_place=False):
    width = shape[-1]
    x, residual = nonzero_randn(*shape).to(dtype), nonzero_randn(*shape, scale=3.0).to(dtype)
    weight, bias = nonzero_randn(width).to(dtype), nonzero_randn(width).to(dtype)
    ref, ref_res = add_layer_norm_reference(x, residual, weight, bias, EPS)
    res64 = x.double() + residual.double()  # float64 from the same inputs
    ref64 = torch.nn.functional.layer_norm(res64, (width,), weight.double(), bias.double(), EPS)
    out = torch.full(shape, float("nan"), dtype=dtype)
    res_in = residual.clone()
    res_out = res_in if in_place else torch.full(shape, float("nan"), dtype=dtype)
    normed, new_res = add_layer_norm(x, res_in, weight, bias, EPS, out=out, residual_out=res_out)
    problems = [] if normed is out and new_res is res_out else ["did not write into `out` / `residual_out`"]
    compare("normed", normed, ref, ref64, dtype, problems)
    compare("new residual", new_res, ref_res, res64, dtype, problems)
    report.check(f"add_layer_norm {dtype} {tuple(shape)}{' in place' if in_place else ''}", problems)


def main() -> int:
    report, _ = start(__doc__)
    for dtype in (F32, F16, BF16):
        # One element, a partial program, exactly one program, several with a tail; 3-D as in the ViT.
        for shape in ((1,), (1000,), (BLOCK,), (2, 7, 1031)):
            case(report, shape, dtype)
    case(report, (3, 500), F32, scale=40.0)  # saturated sigmoid tails: 0 and 1, no NaN from exp overflow
    for dtype in (F32, F16, BF16):
        for shape in ((1, 64), (3, 1024), (2, 5, 96), (4, 1000)):
            add_layer_norm_case(report, shape, dtype)
    add_layer_norm_case(report, (3, 96), BF16, in_place=True)
    h = torch.randn(5, 64)
    problems = []
    compare("auto impl=triton", quick_gelu_auto(h, impl="triton"), quick_gelu_reference(h), None, F32, problems)
    report.check("quick_gelu_auto impl=triton", problems)
    return report.finish()


if __name__ == "__main__":
    sys.exit(main())
