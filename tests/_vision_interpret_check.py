"""Runs the vision tower's quick_gelu kernel in Triton's CPU interpreter against the torch reference.

Started by tests/test_vision_kernels.py in a subprocess with TRITON_INTERPRET=1. Outputs are poisoned
with NaN first, so an element left unwritten shows. The interpreter has no libdevice (the kernel uses
tl.exp there, not CUDA's expf) and truncates float32 -> bfloat16 casts, so results may differ from
torch by an ulp; bit-identity with CUDA's expf is checked by the GPU test.
"""
from __future__ import annotations

import sys

import torch
from _interpret import BF16, F16, F32, compare, start

from flexvlm_env.model.vision_kernels import BLOCK, quick_gelu, quick_gelu_auto, quick_gelu_reference


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


def main() -> int:
    report, _ = start(__doc__)
    for dtype in (F32, F16, BF16):
        # One element, a partial program, exactly one program, several with a tail; 3-D as in the ViT.
        for shape in ((1,), (1000,), (BLOCK,), (2, 7, 1031)):
            case(report, shape, dtype)
    case(report, (3, 500), F32, scale=40.0)  # saturated sigmoid tails: 0 and 1, no NaN from exp overflow
    h = torch.randn(5, 64)
    problems = []
    compare("auto impl=triton", quick_gelu_auto(h, impl="triton"), quick_gelu_reference(h), None, F32, problems)
    report.check("quick_gelu_auto impl=triton", problems)
    return report.finish()


if __name__ == "__main__":
    sys.exit(main())
