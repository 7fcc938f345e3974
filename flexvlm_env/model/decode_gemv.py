"""Dense matrix-vector product of one decode token, optionally with the residual add + RMSNorm in front.

A batch-1 decode step multiplies one d-vector by each block's attention projections. cuBLAS runs
them as GEMMs of one row; on an H200 they reached about 2.3 TB/s of the 4.2 available (240 us per
token for MolmoE-1B's 32 projections, results/device/session8/call6_profile.log). `decode_gemv` computes out = W @ x with every program reading
`block_n` whole rows of W once (streamed past L2), x from L2, float32 accumulation.

With `residual` and `norm_weight` it also takes the place of the `fused_add_rms_norm` launch before
the projection. Every program streams the whole vector anyway: it forms s = residual + x (rounded to
x's dtype, as torch rounds the sum) chunk by chunk, multiplies the rows by s * w and sums s^2 in the
same loop, and scales its dot products by 1/RMS(s) at the end; the first program writes s to
`residual_out`, the new residual. The normalised vector is thus not rounded to x's dtype before the
product, as the separate norm's output is: the outputs differ from that path by about an ulp (a
version computing the RMS first, then the rounded vector, took 10.2 us per call against 9.1 for
this form at MolmoE-1B's q/k/v shape on an H200, its programs waiting on the reduction before their
first weight load).

With PDL (fused_kernels.pdl_enabled) each program loads its first weight tile before waiting for
the kernel that writes x, so that tile streams in while that kernel finishes.

Nothing syncs with the host or allocates data-dependent shapes, so calls can be captured in a CUDA
graph. `decode_gemv_reference` is the plain-torch equivalent and `decode_gemv_auto` dispatches like
the `*_auto` functions of fused_kernels.py.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .fused_kernels import (
    MAX_D,
    _check_float,
    _check_out,
    _check_same_device,
    _check_triton_ready,
    _use_triton,
    add_rms_norm_reference,
    pdl_enabled,
    pdl_launch_options,
)

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the reference path still works
    triton = None
else:
    from .fused_kernels import _pdl_release, _pdl_wait


@dataclass(frozen=True)
class GemvConfig:
    """Rows of W per program, columns per loop step, warps per program."""

    block_n: int = 2
    block_k: int = 1024
    num_warps: int = 4

    def __post_init__(self):
        for name in ("block_n", "block_k"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1 or value & (value - 1):
                raise ValueError(f"{name}={value!r} must be a power of two >= 1")
        if self.num_warps not in (1, 2, 4, 8, 16):
            raise ValueError(f"num_warps={self.num_warps!r} must be one of 1, 2, 4, 8, 16")


# MolmoE-1B's projections, (N, K, norm fused) -> tile: each the fastest of a sweep on an H200 (bf16,
# 16 weight sets in a CUDA graph; scripts/bench_decode_kernels.py, results/bench_decode_kernels_h200.json).
# q/k/v with the norm fused: 9.2 us against 11.5 for the norm's launch + cuBLAS; output projection:
# 4.3 us against 6.2 for cuBLAS. Other shapes take the default tile, the best of the output projection.
# Launched with PDL the sweep's best output-projection tile becomes 2/2048/2 (3.08 against 3.33 us a
# call), but in the whole decode step the two were within noise (0.882 against 0.887 ms per token at
# top_k 8; results/device/session10): the tile measured in more runs stays. The LM head with ln_f
# fused (the decode step's last projection): 51.4 us against 56.2 for ln_f's launch + cuBLAS, with PDL
# (results/device/session11/call2_bench_decode_kernels_head_h200.json.gz; >= 4 rows a program, so
# that the programs re-read the 2048-vector from L2 less than the head's 206 MB from memory).
DEFAULT_CONFIGS: dict[tuple[int, int, bool], GemvConfig] = {
    (6144, 2048, True): GemvConfig(block_n=16, block_k=512, num_warps=4),
    (50304, 2048, True): GemvConfig(block_n=16, block_k=512, num_warps=8),
    (2048, 2048, False): GemvConfig(block_n=2, block_k=1024, num_warps=4),
}


def default_gemv_config(n: int, k: int, norm: bool) -> GemvConfig:
    return DEFAULT_CONFIGS.get((n, k, norm), GemvConfig())


def check_decode_gemv_args(x, weight, residual, norm_weight) -> None:
    """Raise a ValueError naming the argument, its shape or dtype and what is expected."""
    if x.dim() != 2 or x.shape[0] != 1 or not 1 <= x.shape[1] <= MAX_D:
        raise ValueError(f"x must be one token [1, d <= {MAX_D}], got {tuple(x.shape)}")
    _check_float("x", x)
    if weight.dim() != 2 or weight.shape[1] != x.shape[1]:
        raise ValueError(f"weight must be [out, d={x.shape[1]}], got {tuple(weight.shape)}")
    if weight.dtype != x.dtype:
        raise ValueError(f"weight must share x's dtype {x.dtype}, got {weight.dtype}")
    if residual is not None and (residual.shape != x.shape or residual.dtype != x.dtype):
        raise ValueError(f"residual must match x ({x.dtype} {tuple(x.shape)}), got {residual.dtype} {tuple(residual.shape)}")
    if residual is not None and norm_weight is None:
        raise ValueError("residual needs norm_weight: the add is fused only together with the RMSNorm")
    if norm_weight is not None:
        if tuple(norm_weight.shape) != (x.shape[1],):
            raise ValueError(f"norm_weight must be [d] = [{x.shape[1]}], got {tuple(norm_weight.shape)}")
        _check_float("norm_weight", norm_weight)
    tensors = {"x": x, "weight": weight, **({"residual": residual} if residual is not None else {}),
               **({"norm_weight": norm_weight} if norm_weight is not None else {})}
    _check_same_device(**tensors)


def decode_gemv_reference(x, weight, *, residual=None, norm_weight=None, eps: float = 1e-5):
    """torch: F.linear(h, weight) with h = x, or, given norm_weight, h = the RMSNorm of residual + x
    (of x alone without residual) as `add_rms_norm_reference` computes it. Returns (out, new residual
    or None): decoder.py's `att_proj(attn_norm(x + sublayer(x)))` and the x it carries on."""
    check_decode_gemv_args(x, weight, residual, norm_weight)
    if norm_weight is None:
        return F.linear(x, weight), None
    if residual is None:
        return F.linear(F.rms_norm(x, (x.shape[1],), norm_weight.to(x.dtype), eps), weight), None
    h, new_residual = add_rms_norm_reference(x, residual, norm_weight, eps)
    return F.linear(h, weight), new_residual


if triton is not None:

    @triton.jit
    def _gemv_vector(x_ptr, res_ptr, nw_ptr, res_out_ptr, offs_k, mask_k, pid, NORM: tl.constexpr,
                     HAS_RESIDUAL: tl.constexpr):
        """The float32 chunk the weights multiply, and its contribution to sum(s^2) (the norm's input)."""
        dtype = x_ptr.dtype.element_ty
        h = tl.load(x_ptr + offs_k, mask=mask_k, other=0.0).to(tl.float32)
        squares = tl.zeros_like(h)
        if NORM:
            if HAS_RESIDUAL:
                # Rounded to the storage dtype as torch's `residual + x` rounds it; the norm reads that.
                h = (h + tl.load(res_ptr + offs_k, mask=mask_k, other=0.0).to(tl.float32)).to(dtype)
                if pid == 0:
                    tl.store(res_out_ptr + offs_k, h, mask=mask_k)
                h = h.to(tl.float32)
            squares = h * h
            # RMSNorm casts its weight to x's dtype first. 1/RMS is one factor of every product:
            # applied to the sums after the loop, so the loop never waits for a reduction.
            h = h * tl.load(nw_ptr + offs_k, mask=mask_k, other=0.0).to(dtype).to(tl.float32)
        return h, squares

    @triton.jit
    def _decode_gemv_kernel(x_ptr, res_ptr, nw_ptr, w_ptr, out_ptr, res_out_ptr, sq_ptr, N, K, n_square_parts, eps,
                            NORM: tl.constexpr, HAS_RESIDUAL: tl.constexpr, BLOCK_N: tl.constexpr,
                            BLOCK_K: tl.constexpr, SQUARES: tl.constexpr, USE_PDL: tl.constexpr):
        # Program: out[rows] for rows [pid * BLOCK_N, +BLOCK_N), over all K columns.
        _pdl_release(USE_PDL)
        pid = tl.program_id(0)
        offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_n = offs_n < N
        row_ptrs = w_ptr + offs_n[:, None].to(tl.int64) * K
        # The first weight tile is loaded before waiting for the kernel that writes x: a constant, it
        # streams in while that kernel finishes (PDL). Weights are read once per token: evict_first
        # keeps them from pushing the vectors out of L2.
        offs_k = tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        w = tl.load(row_ptrs + offs_k[None, :], mask=mask_n[:, None] & mask_k[None, :], other=0.0,
                    eviction_policy="evict_first")
        _pdl_wait(USE_PDL)
        h, squares = _gemv_vector(x_ptr, res_ptr, nw_ptr, res_out_ptr, offs_k, mask_k, pid, NORM, HAS_RESIDUAL)
        # Elementwise accumulation, one reduction at the end: keeps the loop free of shuffles.
        acc = w.to(tl.float32) * h[None, :]
        for k_start in range(BLOCK_K, K, BLOCK_K):
            offs_k = k_start + tl.arange(0, BLOCK_K)
            mask_k = offs_k < K
            h, sq = _gemv_vector(x_ptr, res_ptr, nw_ptr, res_out_ptr, offs_k, mask_k, pid, NORM, HAS_RESIDUAL)
            squares += sq
            w = tl.load(row_ptrs + offs_k[None, :], mask=mask_n[:, None] & mask_k[None, :], other=0.0,
                        eviction_policy="evict_first")
            acc += w.to(tl.float32) * h[None, :]
        out = tl.sum(acc, axis=1)
        if NORM:
            out = out * tl.rsqrt(tl.sum(squares, axis=0) / K + eps)
        out = out.to(out_ptr.dtype.element_ty)
        tl.store(out_ptr + offs_n, out, mask=mask_n)
        if SQUARES:
            # This block's share of sum(out^2) over the rounded outputs (a later kernel's RMSNorm input).
            if pid < n_square_parts:
                rounded = tl.where(mask_n, out.to(tl.float32), 0.0)
                tl.store(sq_ptr + pid, tl.sum(rounded * rounded, axis=0))


def square_parts(rows: int, config: GemvConfig) -> int:
    """How many partial sums `decode_gemv(square_sums=...)` writes for the first `rows` outputs: one per
    program (`config.block_n` rows each); `rows` must be a multiple of block_n."""
    if rows % config.block_n:
        raise ValueError(f"rows={rows} must be a multiple of the GEMV's block_n={config.block_n}")
    return rows // config.block_n


def decode_gemv(x, weight, *, residual=None, norm_weight=None, eps: float = 1e-5, out=None, residual_out=None,
                config: GemvConfig | None = None, square_sums=None):
    """Triton: as `decode_gemv_reference`, one launch; returns (out [1, N], residual_out or None).

    `square_sums` (contiguous float32 [P], P = `square_parts(rows, config)`) also receives, for each of
    the first P programs, the sum of squares of its `config.block_n` outputs as rounded to x's dtype:
    partial sums of an RMSNorm over out[:rows] that a later kernel adds up (the decode step's q/k norms,
    `decode_attention_qk`), so that no launch of its own is needed to reduce them.

    `residual_out` (new residual, given residual) must not be `residual` or `x`: other programs are
    still reading them when the first one writes. `out` and `residual_out` (contiguous, x's dtype) avoid
    allocation. The dot products are summed in float32 in another order than cuBLAS's, so an output
    may round to the neighbouring value of x's dtype.
    """
    check_decode_gemv_args(x, weight, residual, norm_weight)
    n, k = weight.shape
    out = torch.empty((1, n), dtype=x.dtype, device=x.device) if out is None else out
    _check_out("out", out, (1, n), x.dtype, x.device)
    if residual is not None:
        residual_out = torch.empty_like(x) if residual_out is None else residual_out
        _check_out("residual_out", residual_out, x.shape, x.dtype, x.device)
        if residual_out.data_ptr() in (residual.data_ptr(), x.data_ptr()):
            raise ValueError("residual_out must be another buffer than residual and x (programs read them while "
                             "the first one writes residual_out)")
    elif residual_out is not None:
        raise ValueError("residual_out needs residual (there is no new residual without the add)")
    if not weight.is_contiguous():
        # Read through its pointer: a silent .contiguous() would copy the whole matrix every call.
        raise ValueError(f"weight must be contiguous, got strides {weight.stride()}")
    config = config or default_gemv_config(n, k, norm_weight is not None)
    if square_sums is not None:
        if (square_sums.dtype != torch.float32 or not square_sums.is_contiguous() or square_sums.device != x.device
                or not 1 <= square_sums.numel() * config.block_n <= n):
            raise ValueError(f"square_sums must be contiguous float32 on {x.device} with 1..{n // config.block_n} "
                             f"elements (one per {config.block_n}-row block of out), got {square_sums.dtype} "
                             f"{tuple(square_sums.shape)} on {square_sums.device}")
    _check_triton_ready(x, "decode GEMV")
    x = x if x.is_contiguous() else x.contiguous()
    norm = norm_weight is not None
    _decode_gemv_kernel[(triton.cdiv(n, config.block_n),)](
        x, residual if residual is not None else x, norm_weight if norm else x, weight, out,
        residual_out if residual is not None else out, square_sums if square_sums is not None else out, n, k,
        square_sums.numel() if square_sums is not None else 0, eps,
        NORM=norm, HAS_RESIDUAL=residual is not None, BLOCK_N=config.block_n, BLOCK_K=config.block_k,
        SQUARES=square_sums is not None, num_warps=config.num_warps, **pdl_launch_options(pdl_enabled(x)))
    return out, residual_out


def decode_gemv_auto(x, weight, *, residual=None, norm_weight=None, eps: float = 1e-5, impl: str = "auto",
                     square_sums=None):
    """impl "auto": triton on CUDA, reference elsewhere; "triton" / "reference" force one. The reference
    leaves `square_sums` unwritten (its reader's reference recomputes the sums)."""
    if _use_triton(impl, x):
        return decode_gemv(x, weight, residual=residual, norm_weight=norm_weight, eps=eps, square_sums=square_sums)
    return decode_gemv_reference(x, weight, residual=residual, norm_weight=norm_weight, eps=eps)
