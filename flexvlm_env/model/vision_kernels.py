"""The vision tower's MLP activation (CLIP's quick_gelu) as one Triton kernel, next to its torch reference.

`h * sigmoid(1.702 * h)` in eager torch is three elementwise kernels (scale, sigmoid, product), each
reading and writing the whole [views x 577, 4096] hidden tensor (61 MB in bf16 for MolmoE-1B's 13
views at 12 crops). `quick_gelu` reads h once and writes the output once: on an H200, 0.82 ms for the
ViT's 22 blocks at 12 crops against 2.39 ms for the three kernels, and the vision encoder 9.9 ms
against 11.5 (results/device/session13/). It rounds as torch does after each of the three steps (the
scaled input and the sigmoid to h's dtype, the sigmoid in float32 with IEEE division and CUDA's
`expf`), so on CUDA its output is bit-identical to the reference
(tests/test_vision_kernels.py::test_quick_gelu_is_bit_identical_on_gpu).

`add_layer_norm` is the ViT block's residual add followed by the next LayerNorm (`x = x + sublayer;
norm(x)`), one read of both inputs and one write of both outputs per row, where torch reads and
writes the sum once more and its LayerNorm kernel reached ~1.5 TB/s on these [7501, 1024] rows. On an
H200 the vision encoder at 12 crops took 9.23-9.24 ms with it against 9.88-9.90 (results/device/
session13/call5_*). Its statistics are summed in float32 in another order than torch's kernel (two
passes, not Welford), so an output may differ from the reference's by an ulp.

Neither has a backward: the `*_auto` dispatchers take them only on CUDA when autograd does not need the
result (inference, or a frozen tower), and the references otherwise (training).
"""
from __future__ import annotations

import torch

import torch.nn.functional as F

from .fused_kernels import MAX_D, _check_float, _check_out, _check_same_device, _check_triton_ready, _row_warps, _use_triton

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
    out = torch.empty_like(h) if out is None else out
    _check_out("out", out, h.shape, h.dtype, h.device)
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


# ---------------------------------------------------------------------------------------------------
# Residual add + LayerNorm

MAX_WIDTH = MAX_D  # one program holds a whole row in registers, as in fused_kernels


def check_add_layer_norm_args(x, residual, weight, bias) -> None:
    """Raise a ValueError naming the argument, its shape or dtype and what is expected."""
    if x.dim() < 1 or not 1 <= x.shape[-1] <= MAX_WIDTH:
        raise ValueError(f"x must be [..., width] with 1 <= width <= {MAX_WIDTH}, got {tuple(x.shape)}")
    _check_float("x", x, allow_float64=False)
    if residual.shape != x.shape or residual.dtype != x.dtype:
        raise ValueError(f"residual must match x ({x.dtype} {tuple(x.shape)}), got {residual.dtype} {tuple(residual.shape)}")
    for name, p in (("weight", weight), ("bias", bias)):
        if tuple(p.shape) != (x.shape[-1],):
            raise ValueError(f"{name} must be [width] = [{x.shape[-1]}], got {tuple(p.shape)}")
        _check_float(name, p, allow_float64=False)
    _check_same_device(x=x, residual=residual, weight=weight, bias=bias)


def add_layer_norm_reference(x, residual, weight, bias, eps: float):
    """(layer_norm(residual + x), residual + x), as the ViT block computes `x = x + sublayer(...)` and then
    the next `nn.LayerNorm` (statistics in float32, parameters as stored)."""
    check_add_layer_norm_args(x, residual, weight, bias)
    new_residual = residual + x
    return F.layer_norm(new_residual, (x.shape[-1],), weight, bias, eps), new_residual


if triton is not None:

    @triton.jit
    def _add_layer_norm_kernel(x_ptr, res_ptr, w_ptr, b_ptr, out_ptr, res_out_ptr, width, eps, BLOCK: tl.constexpr):
        # One program per row; res_out may alias res (the row is read before it is written).
        dtype = x_ptr.dtype.element_ty
        row = tl.program_id(0).to(tl.int64) * width
        offs = tl.arange(0, BLOCK)
        mask = offs < width
        x = tl.load(x_ptr + row + offs, mask=mask, other=0.0).to(tl.float32)
        r = tl.load(res_ptr + row + offs, mask=mask, other=0.0).to(tl.float32)
        s = (x + r).to(dtype)  # rounded as torch's `residual + x`; the norm reads that value
        tl.store(res_out_ptr + row + offs, s, mask=mask)
        s = s.to(tl.float32)
        mean = tl.sum(s, axis=0) / width
        centred = tl.where(mask, s - mean, 0.0)
        rstd = tl.rsqrt(tl.sum(centred * centred, axis=0) / width + eps)
        w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        b = tl.load(b_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(out_ptr + row + offs, (centred * rstd * w + b).to(dtype), mask=mask)


def add_layer_norm(x, residual, weight, bias, eps: float, *, out=None, residual_out=None):
    """Triton: (normed, new_residual) as `add_layer_norm_reference`, one launch. `out` / `residual_out`
    (contiguous, like x) avoid allocation; `residual_out` may be `residual` itself (in-place update)."""
    check_add_layer_norm_args(x, residual, weight, bias)
    _check_triton_ready(x, "add + LayerNorm")
    x, residual = x.contiguous(), residual.contiguous()
    out = torch.empty_like(x) if out is None else out
    residual_out = torch.empty_like(x) if residual_out is None else residual_out
    _check_out("out", out, x.shape, x.dtype, x.device)
    _check_out("residual_out", residual_out, x.shape, x.dtype, x.device)
    width = x.shape[-1]
    block = triton.next_power_of_2(width)
    if x.numel():
        _add_layer_norm_kernel[(x.numel() // width,)](x, residual, weight.contiguous(), bias.contiguous(), out,
                                                       residual_out, width, eps, BLOCK=block, num_warps=_row_warps(block))
    return out, residual_out


def add_layer_norm_auto(x, residual, norm: torch.nn.LayerNorm, *, impl: str = "auto"):
    """impl "auto": triton on CUDA unless autograd needs the result; "triton" / "reference" force one.
    `norm` is the `nn.LayerNorm` that follows the add (its weight, bias and eps)."""
    if norm.weight is None or norm.bias is None:
        raise ValueError("norm must be an elementwise-affine nn.LayerNorm with a bias (the ViT's are)")
    needs_grad = torch.is_grad_enabled() and (x.requires_grad or residual.requires_grad or norm.weight.requires_grad)
    if impl == "triton" and needs_grad:
        raise ValueError("impl='triton': the triton add + LayerNorm has no backward, and an input requires grad "
                         "(use impl='auto' or 'reference', or run under torch.no_grad())")
    if _use_triton(impl, x) and not needs_grad:
        return add_layer_norm(x, residual, norm.weight, norm.bias, norm.eps)
    return add_layer_norm_reference(x, residual, norm.weight, norm.bias, norm.eps)
