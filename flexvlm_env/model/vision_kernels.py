"""The vision tower's MLP activation (CLIP's quick_gelu) as one Triton kernel, next to its torch reference.

`h * sigmoid(1.702 * h)` in eager torch is three elementwise kernels (scale, sigmoid, product), each
reading and writing the whole [views x 577, 4096] hidden tensor (61 MB in bf16 for MolmoE-1B's 13
views at 12 crops). `quick_gelu` reads h once and writes the output once: on an H200, 0.82 ms for the
ViT's 22 blocks at 12 crops against 2.39 ms for the three kernels, and the vision encoder 9.9 ms
against 11.5 (results/device/session13/). It rounds as torch does after each of the three steps (the
scaled input and the sigmoid to h's dtype, the sigmoid in float32 with IEEE division and CUDA's
`expf`), so on CUDA its output is bit-identical to the reference
(tests/test_vision_kernels.py::test_quick_gelu_is_bit_identical_on_gpu).

It has no backward: `quick_gelu_auto` takes it only on CUDA when autograd does not need the result
(inference, or a frozen tower), and the reference otherwise (training).
"""
from __future__ import annotations

import torch

from .fused_kernels import _check_float, _check_triton_ready, _use_triton

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the reference path still works
    triton = None

QUICK_GELU_SCALE = 1.702  # CLIP's sigmoid approximation of GELU
BLOCK = 4096  # elements a program: 16 a thread with 8 warps, two 16-byte loads of bf16
WARPS = 8


def quick_gelu_reference(h: torch.Tensor) -> torch.Tensor:
    """h * sigmoid(1.702 h), three torch kernels, as CLIP was trained."""
    return h * torch.sigmoid(QUICK_GELU_SCALE * h)


if triton is not None:
    try:  # CUDA's expf, for bit-identical sigmoids; the interpreter has no libdevice and uses tl.exp
        from triton.language.extra.cuda import libdevice as _libdevice
    except ImportError:  # pragma: no cover - Triton builds without the CUDA backend
        _libdevice = None

    @triton.jit
    def _quick_gelu_kernel(h_ptr, out_ptr, n, scale, BLOCK: tl.constexpr, PRECISE: tl.constexpr):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        h = tl.load(h_ptr + offs, mask=mask, other=0.0)
        dtype = h.dtype
        hf = h.to(tl.float32)
        # Each step rounded to the storage dtype where torch's three kernels round: 1.702 * h, then
        # sigmoid (float32 inside: 1 / (1 + expf(-t)), IEEE division), then the product.
        t = (hf * scale).to(dtype).to(tl.float32)
        if PRECISE:
            e = _libdevice.exp(-t)
        else:
            e = tl.exp(-t)
        s = tl.math.div_rn(1.0, 1.0 + e).to(dtype).to(tl.float32)
        tl.store(out_ptr + offs, (hf * s).to(dtype), mask=mask)


def quick_gelu(h: torch.Tensor, *, out: torch.Tensor | None = None) -> torch.Tensor:
    """Triton: `quick_gelu_reference(h)` in one launch (no autograd). `out` (contiguous, like h) avoids allocation."""
    _check_float("h", h, allow_float64=False)
    _check_triton_ready(h, "quick_gelu")
    h = h.contiguous()
    if out is None:
        out = torch.empty_like(h)
    elif out.shape != h.shape or out.dtype != h.dtype or out.device != h.device or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous {h.dtype} tensor {tuple(h.shape)} on {h.device}, "
                         f"got {out.dtype} {tuple(out.shape)} on {out.device}")
    n = h.numel()
    if n:
        _quick_gelu_kernel[(triton.cdiv(n, BLOCK),)](h, out, n, QUICK_GELU_SCALE, BLOCK=BLOCK,
                                                     PRECISE=h.is_cuda and _libdevice is not None, num_warps=WARPS)
    return out


def quick_gelu_auto(h: torch.Tensor, *, impl: str = "auto") -> torch.Tensor:
    """impl "auto": triton on CUDA unless autograd needs the result (then the reference, which has a
    backward); "triton" / "reference" force one ("triton" refuses a result autograd would need)."""
    needs_grad = torch.is_grad_enabled() and h.requires_grad
    if impl == "triton" and needs_grad:
        raise ValueError("impl='triton': the triton quick_gelu has no backward, and h requires grad "
                         "(use impl='auto' or 'reference', or run under torch.no_grad())")
    if _use_triton(impl, h) and not needs_grad:
        return quick_gelu(h)
    return quick_gelu_reference(h)
