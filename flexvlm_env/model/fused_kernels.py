"""Fused elementwise kernels of the batch-1 decode step, each next to its plain-torch reference.

A graphed decode step of the MoE decoder is bound by launch count, not by bytes: besides the
projections and the MoE it runs ~30 tiny kernels per block (residual adds, RMSNorms, the q/k norms,
RoPE, the KV-cache writes, the router's softmax and top-k), each a few microseconds for a few KB.
The kernels here replace them with one launch each, computing in float32 whatever the storage
dtype and rounding wherever decoder.py rounds today, so that they stand in for it:

- `fused_add_rms_norm`: residual add + RMSNorm (before each block's attention and MoE, and ln_f);
- `fused_qk_norm_rope_kv`: q/k norms (over all heads jointly), RoPE, and the token's key/value
  written into the static cache at a slot read on the device (the decode step of a LoRA-wrapped q/k/v
  projection; with a plain one the attention's split programs do this work,
  `decode_attention.decode_attention_qk`);
- `fused_qk_norm_rope_prefill`: the same for the T tokens of a prefill (decoder.Attention takes it on
  CUDA), with q/k/v laid out contiguously for the attention. The plain ops (norms over column slices,
  RoPE's stack/cat/neg, two index_copy_ writes, the attention's input copies) took 2.25 ms of a
  12-crop prefill's 11.8 on an H200; with it the prefill takes 9.6 (results/device/session13/);
- `softmax_topk`: softmax over all experts and top-k of router logits precomputed by the gate
  projection (cuBLAS), not renormalised;
- `router_topk`: the same with the gate projection inside, for one decode token: one launch instead
  of a cuBLAS GEMV (about 5 us for 256 KB on an H200, latency-bound) and `softmax_topk`;
- `greedy_token`: the argmax of one token's logits over the vocabulary, read by the whole GPU (torch's
  argmax reduces a row in one thread block: 13.9 us for MolmoE-1B's 50k logits on an H200);
- `embed_token`: the decode token's embedding row (MolmoE's two tables), one launch instead of six.

On Hopper and newer cards the decode kernels launch with programmatic dependent launch (PDL, see
`pdl_enabled`): each lets the next kernel of the stream start at once, and waits (`gdc_wait`) for the
one before it to finish only where it first reads what that kernel wrote. Before that point a kernel
reads only what was final before the kernel before it started (weights, the cache rows of earlier
tokens; the MoE down kernel the router's ids, two kernels back), so its loads overlap the tail of the
kernel before: in a graphed decode step of ~115 short kernels the gaps and ramp-ups between them are a
large part of the time.

None syncs with the host or allocates data-dependent shapes, so all can be captured in a CUDA graph;
each takes optional preallocated outputs. The `*_auto` dispatchers pick Triton on CUDA (or on CPU
under TRITON_INTERPRET=1, for tests) and the reference otherwise, like `moe_kernels.moe_forward`.
"""
from __future__ import annotations

import functools
import os

import torch
import torch.nn.functional as F

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the reference path still works
    triton = None

MAX_D = 8192  # one program holds a whole d-vector in registers
MAX_EXPERTS = 128  # the router holds all logits of a token in one program
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_IMPLS = ("auto", "triton", "reference")


# ---------------------------------------------------------------------------------------------------
# Shared checks


def _check_float(name: str, t: torch.Tensor, allow_float64: bool = True) -> None:
    allowed = _FLOAT_DTYPES + ((torch.float64,) if allow_float64 else ())
    if t.dtype not in allowed:
        raise ValueError(f"{name} must be one of {[str(d) for d in allowed]}, got {t.dtype}")


def _check_same_device(**tensors: torch.Tensor) -> None:
    devices = {t.device for t in tensors.values()}
    if len(devices) != 1:
        raise ValueError(f"{', '.join(tensors)} must share one device, got {devices}")


def _check_out(name: str, out: torch.Tensor, shape, dtype, device) -> None:
    # A preallocated output is written through its pointer: it must be exactly the expected buffer.
    if tuple(out.shape) != tuple(shape) or out.dtype != dtype or out.device != device or not out.is_contiguous():
        raise ValueError(f"{name} must be a contiguous {dtype} tensor {tuple(shape)} on {device}, "
                         f"got {out.dtype} {tuple(out.shape)} on {out.device} (contiguous={out.is_contiguous()})")


def _check_triton_ready(t: torch.Tensor, what: str) -> None:
    if triton is None:
        raise RuntimeError(f"the triton {what} kernel needs the 'triton' package (pip install flexvlm[fast])")
    if not t.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(f"the triton {what} kernel needs CUDA tensors (or TRITON_INTERPRET=1 set before triton "
                         f"is imported), got {t.device}")
    if t.dtype == torch.float64:
        raise ValueError(f"the triton {what} kernel takes float32, float16 or bfloat16 inputs, got float64")


def _use_triton(impl: str, t: torch.Tensor) -> bool:
    if impl not in _IMPLS:
        raise ValueError(f"impl must be one of {_IMPLS}, got {impl!r}")
    return impl == "triton" or (impl == "auto" and t.is_cuda and triton is not None)


def _row_warps(block: int) -> int:
    # ~8 elements (16 B of bf16) per thread: wide vector loads, few registers.
    return max(1, min(8, block // 256))


# ---------------------------------------------------------------------------------------------------
# Programmatic dependent launch (PDL)


@functools.lru_cache(maxsize=None)
def _pdl_capable(device: torch.device) -> bool:
    # Grid dependency control needs compute capability 9.0 and a Triton that exposes it (3.4 and later).
    try:
        from triton.language.extra import cuda as triton_cuda
    except ImportError:
        return False
    return torch.cuda.get_device_capability(device)[0] >= 9 and hasattr(triton_cuda, "gdc_wait")


def pdl_enabled(t: torch.Tensor) -> bool:
    """Whether kernels on t's device launch with PDL: CUDA on compute capability >= 9 (Hopper) with a
    Triton that supports it, unless the environment sets FLEXVLM_PDL=0 (read at each launch; a captured
    graph keeps the mode it was captured with). Never on CPU, so never under Triton's interpreter."""
    if triton is None or not t.is_cuda or os.environ.get("FLEXVLM_PDL", "1") == "0":
        return False
    return _pdl_capable(t.device)


def pdl_launch_options(use_pdl: bool) -> dict:
    """Launch keywords of a kernel taking the USE_PDL constexpr (`launch_pdl` only when on, so that
    Triton versions and the interpreter without the option still launch the plain way)."""
    return {"USE_PDL": use_pdl, "launch_pdl": True} if use_pdl else {"USE_PDL": False}


if triton is not None:

    @triton.jit
    def _pdl_release(USE_PDL: tl.constexpr):
        # Let the next kernel in the stream launch now: its programs wait in their own `_pdl_wait`
        # before reading anything this kernel writes, so starting early only overlaps launch latency
        # and their loads of constants with this kernel's work.
        if USE_PDL:
            tl.extra.cuda.gdc_launch_dependents()

    @triton.jit
    def _pdl_wait(USE_PDL: tl.constexpr):
        # Returns once the previous kernel in the stream has finished and its writes are visible. Every
        # read of another kernel's output, and every write, comes after it.
        if USE_PDL:
            tl.extra.cuda.gdc_wait()


# ---------------------------------------------------------------------------------------------------
# 1. Residual add + RMSNorm


def check_add_rms_norm_args(x, residual, weight) -> None:
    """Raise a ValueError naming the argument, its shape or dtype and what is expected."""
    if x.dim() < 1 or not 1 <= x.shape[-1] <= MAX_D:
        raise ValueError(f"x must be [..., d] with 1 <= d <= {MAX_D}, got {tuple(x.shape)}")
    _check_float("x", x)
    if residual.shape != x.shape or residual.dtype != x.dtype:
        raise ValueError(f"residual must match x ({x.dtype} {tuple(x.shape)}), "
                         f"got {residual.dtype} {tuple(residual.shape)}")
    if tuple(weight.shape) != (x.shape[-1],):
        raise ValueError(f"weight must be [d] = [{x.shape[-1]}], got {tuple(weight.shape)}")
    _check_float("weight", weight)
    _check_same_device(x=x, residual=residual, weight=weight)


def add_rms_norm_reference(x, residual, weight, eps: float):
    """(rms_norm(residual + x) * weight, residual + x), both in x's dtype: decoder.py's
    `x = x + sublayer(x)` followed by the next `RMSNorm` (statistics in float32, weight cast to x's dtype)."""
    check_add_rms_norm_args(x, residual, weight)
    new_residual = residual + x
    return F.rms_norm(new_residual, (x.shape[-1],), weight.to(x.dtype), eps), new_residual


if triton is not None:

    @triton.jit
    def _add_rms_norm_kernel(x_ptr, res_ptr, w_ptr, out_ptr, res_out_ptr, d, eps, BLOCK_D: tl.constexpr,
                             USE_PDL: tl.constexpr):
        # One program per row. res_out may alias res (in-place update): the row is read before it is written.
        _pdl_release(USE_PDL)
        dtype = x_ptr.dtype.element_ty
        row = tl.program_id(0).to(tl.int64) * d
        offs = tl.arange(0, BLOCK_D)
        mask = offs < d
        _pdl_wait(USE_PDL)
        x = tl.load(x_ptr + row + offs, mask=mask, other=0.0).to(tl.float32)
        r = tl.load(res_ptr + row + offs, mask=mask, other=0.0).to(tl.float32)
        # Rounded to the storage dtype as torch's `residual + x` rounds it; the norm reads that value.
        s = (x + r).to(dtype)
        tl.store(res_out_ptr + row + offs, s, mask=mask)
        s = s.to(tl.float32)
        rstd = tl.rsqrt(tl.sum(s * s, axis=0) / d + eps)
        # RMSNorm casts its weight to x's dtype first; the product is rounded once, as F.rms_norm does.
        w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(dtype).to(tl.float32)
        tl.store(out_ptr + row + offs, (s * rstd * w).to(dtype), mask=mask)


def _add_rms_norm_outputs(x, out, residual_out):
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device) if out is None else out
    residual_out = torch.empty_like(out) if residual_out is None else residual_out
    _check_out("out", out, x.shape, x.dtype, x.device)
    _check_out("residual_out", residual_out, x.shape, x.dtype, x.device)
    return out, residual_out


def fused_add_rms_norm(x, residual, weight, eps: float, *, out=None, residual_out=None):
    """Triton: returns (normed, new_residual) as `add_rms_norm_reference`, for x [..., d].

    `out` / `residual_out` (contiguous, shaped and typed like x) avoid allocation; `residual_out` may be
    `residual` itself (in-place update) and `out` may be `x`.
    """
    check_add_rms_norm_args(x, residual, weight)
    out, residual_out = _add_rms_norm_outputs(x, out, residual_out)
    _check_triton_ready(x, "add+RMSNorm")
    d = x.shape[-1]
    block = triton.next_power_of_2(d)
    _add_rms_norm_kernel[(x.numel() // d,)](
        x.contiguous(), residual.contiguous(), weight.contiguous(), out, residual_out, d, eps,
        BLOCK_D=block, num_warps=_row_warps(block), **pdl_launch_options(pdl_enabled(x)))
    return out, residual_out


def fused_add_rms_norm_auto(x, residual, weight, eps: float, *, impl: str = "auto", out=None, residual_out=None):
    """impl "auto": triton on CUDA, reference elsewhere; "triton" / "reference" force one."""
    if _use_triton(impl, x):
        return fused_add_rms_norm(x, residual, weight, eps, out=out, residual_out=residual_out)
    normed, new_residual = add_rms_norm_reference(x, residual, weight, eps)
    if out is None and residual_out is None:
        return normed, new_residual
    out, residual_out = _add_rms_norm_outputs(x, out, residual_out)
    return out.copy_(normed), residual_out.copy_(new_residual)


# ---------------------------------------------------------------------------------------------------
# 2. q/k norm + RoPE + KV-cache write, one decode token


def _check_heads_and_norms(d: int, n_heads: int, q_norm_w, k_norm_w) -> int:
    """head_dim for n_heads over d (even, d <= MAX_D), after checking the q/k norm weights are [d] floats."""
    if not 1 <= n_heads <= d or d % n_heads or (d // n_heads) % 2 or d > MAX_D:
        raise ValueError(f"n_heads={n_heads} must divide d={d} (d <= {MAX_D}) into heads of even size")
    for name, w in (("q_norm_w", q_norm_w), ("k_norm_w", k_norm_w)):
        if tuple(w.shape) != (d,):
            raise ValueError(f"{name} must be [d] = [{d}], got {tuple(w.shape)}")
        _check_float(name, w)
    return d // n_heads


def _check_kv_caches(key_cache, value_cache, n_heads: int, head_dim: int) -> None:
    """Both caches [1, n_heads, max_seq, head_dim], contiguous (written in place), one shape and dtype."""
    for name, cache in (("key_cache", key_cache), ("value_cache", value_cache)):
        if cache.dim() != 4 or cache.shape[0] != 1 or cache.shape[1] != n_heads or cache.shape[3] != head_dim:
            raise ValueError(f"{name} must be [1, n_heads={n_heads}, max_seq, head_dim={head_dim}], "
                             f"got {tuple(cache.shape)}")
        if not cache.is_contiguous():
            # Written in place: a silent .contiguous() would write into a copy.
            raise ValueError(f"{name} must be contiguous, got strides {cache.stride()}")
        _check_float(name, cache)
    if value_cache.shape != key_cache.shape or value_cache.dtype != key_cache.dtype:
        raise ValueError(f"value_cache must match key_cache ({key_cache.dtype} {tuple(key_cache.shape)}), "
                         f"got {value_cache.dtype} {tuple(value_cache.shape)}")


def check_qk_norm_rope_kv_args(qkv, q_norm_w, k_norm_w, cos, sin, key_cache, value_cache, slot, n_heads) -> None:
    """Raise a ValueError naming the argument, its shape or dtype and what is expected."""
    if qkv.dim() not in (2, 3) or qkv.numel() != qkv.shape[-1] or qkv.shape[-1] % 3:
        raise ValueError(f"qkv must be one token's fused projection [1, 3*d] (or [1, 1, 3*d]), got {tuple(qkv.shape)}")
    _check_float("qkv", qkv)
    head_dim = _check_heads_and_norms(qkv.shape[-1] // 3, n_heads, q_norm_w, k_norm_w)
    for name, t in (("cos", cos), ("sin", sin)):
        one_row = t.numel() == head_dim and t.shape[-1:] == (head_dim,)
        table = t.dim() == 2 and t.shape[1] == head_dim and t.shape[0] == key_cache.shape[2]
        if not (one_row or table) or t.dtype != torch.float32:
            raise ValueError(f"{name} must be float32 [1, head_dim] = [1, {head_dim}] (one position, as "
                             f"decoder.rope_tables returns) or a table [max_seq, head_dim] = "
                             f"[{key_cache.shape[2]}, {head_dim}] read at the slot, got {t.dtype} {tuple(t.shape)}")
    if cos.shape != sin.shape:
        raise ValueError(f"cos and sin must have one shape, got {tuple(cos.shape)} and {tuple(sin.shape)}")
    _check_kv_caches(key_cache, value_cache, n_heads, head_dim)
    if slot.numel() != 1 or slot.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"slot must be a 1-element int32/int64 tensor (on the device), "
                         f"got {slot.dtype} {tuple(slot.shape)}")
    _check_same_device(qkv=qkv, q_norm_w=q_norm_w, k_norm_w=k_norm_w, cos=cos, sin=sin,
                       key_cache=key_cache, value_cache=value_cache, slot=slot)


def qk_norm_rope_kv_reference(qkv, q_norm_w, k_norm_w, cos, sin, key_cache, value_cache, slot, n_heads: int,
                              eps: float):
    """decoder.Attention's steps for one token: q/k RMSNorm over the whole d vector (rounded to qkv's
    dtype), rotate-half RoPE in float32 (rounded again), k and raw v written at cache slot `slot`.
    cos/sin are the token's row [1, head_dim] or a table [max_seq, head_dim] read at `slot`.
    Returns q [1, n_heads, 1, head_dim] in qkv's dtype."""
    check_qk_norm_rope_kv_args(qkv, q_norm_w, k_norm_w, cos, sin, key_cache, value_cache, slot, n_heads)
    if cos.numel() != cos.shape[-1]:
        cos, sin = cos[slot.reshape(1).long()], sin[slot.reshape(1).long()]
    d = qkv.shape[-1] // 3
    q, k, v = qkv.reshape(1, 3 * d).split(d, dim=-1)
    q = F.rms_norm(q, (d,), q_norm_w.to(q.dtype), eps)
    k = F.rms_norm(k, (d,), k_norm_w.to(k.dtype), eps)
    q, k, v = (z.reshape(1, n_heads, 1, d // n_heads) for z in (q, k, v))
    half = d // n_heads // 2
    acc_dtype = torch.promote_types(qkv.dtype, torch.float32)  # float32, or float64 for a float64 check
    cos, sin = cos.reshape(-1).to(acc_dtype), sin.reshape(-1).to(acc_dtype)

    def rope(z):
        zf = z.to(acc_dtype)
        rotated = torch.cat([-zf[..., half:], zf[..., :half]], dim=-1)
        return (zf * cos + rotated * sin).to(z.dtype)

    q, k = rope(q), rope(k)
    index = slot.reshape(1).long()
    key_cache.index_copy_(2, index, k.to(key_cache.dtype))
    value_cache.index_copy_(2, index, v.to(value_cache.dtype))
    return q


if triton is not None:

    @triton.jit
    def _normed(x_ptr, w_ptr, offs, mask, rstd):
        # RMSNorm output as decoder.py holds it between the norm and RoPE: rounded to x's dtype.
        dtype = x_ptr.dtype.element_ty
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(dtype).to(tl.float32)
        return (x * rstd * w).to(dtype).to(tl.float32)

    @triton.jit
    def _norm_rope(x_ptr, w_ptr, cos_ptr, sin_ptr, d, eps, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr):
        """rope(rms_norm(x[:d]) * w) for the whole d vector (all heads), rounded to x's dtype; cos/sin
        point at the token's row."""
        offs = tl.arange(0, BLOCK_D)
        mask = offs < d
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.rsqrt(tl.sum(x * x, axis=0) / d + eps)
        i = offs % HEAD_DIM
        # Rotate-half partner within the head: i + hd/2 for the first half (taken negated), i - hd/2 after.
        # Loading the partner again is cheaper than shuffling registers; the row is in L1 anyway.
        partner = offs - i + (i + HEAD_DIM // 2) % HEAD_DIM
        a = _normed(x_ptr, w_ptr, offs, mask, rstd)
        b = _normed(x_ptr, w_ptr, partner, mask, rstd)
        rotated = tl.where(i < HEAD_DIM // 2, -b, b)
        cos = tl.load(cos_ptr + i, mask=mask, other=0.0)
        sin = tl.load(sin_ptr + i, mask=mask, other=0.0)
        return (a * cos + rotated * sin).to(x_ptr.dtype.element_ty)

    @triton.jit
    def _qk_norm_rope_kv_kernel(qkv_ptr, q_w_ptr, k_w_ptr, cos_ptr, sin_ptr, q_out_ptr, k_cache_ptr, v_cache_ptr,
                                slot_ptr, d, max_seq, stride_head, eps,
                                HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, ROPE_TABLE: tl.constexpr,
                                USE_PDL: tl.constexpr):
        # Program 0: q; 1: k; 2: v. Each spans the whole d vector, since the q/k norms span all heads.
        _pdl_release(USE_PDL)
        part = tl.program_id(0)
        offs = tl.arange(0, BLOCK_D)
        mask = offs < d
        _pdl_wait(USE_PDL)
        # Cache offset of element (head, i) at the slot, read on the device so a graph can replay it.
        # Loaded into every lane (one cached word): combining a scalar with the vector mask below is
        # mis-typed by Triton's interpreter.
        slot = tl.load(slot_ptr + offs * 0).to(tl.int64)
        if ROPE_TABLE:
            # The slot's row of the tables (clamped: an out-of-range slot writes nothing anyway).
            row = tl.load(slot_ptr).to(tl.int64)
            row = tl.minimum(tl.maximum(row, 0), max_seq - 1) * HEAD_DIM
            cos_ptr += row
            sin_ptr += row
        cache_offs = (offs // HEAD_DIM).to(tl.int64) * stride_head + slot * HEAD_DIM + offs % HEAD_DIM
        # An out-of-range slot writes nothing rather than outside the cache (checking it would need a sync).
        cache_mask = mask & (slot >= 0) & (slot < max_seq)
        if part == 0:
            q = _norm_rope(qkv_ptr, q_w_ptr, cos_ptr, sin_ptr, d, eps, HEAD_DIM, BLOCK_D)
            # [1, heads, 1, hd] contiguous is the flat [d] layout of the projection.
            tl.store(q_out_ptr + offs, q, mask=mask)
        elif part == 1:
            k = _norm_rope(qkv_ptr + d, k_w_ptr, cos_ptr, sin_ptr, d, eps, HEAD_DIM, BLOCK_D)
            tl.store(k_cache_ptr + cache_offs, k.to(k_cache_ptr.dtype.element_ty), mask=cache_mask)
        else:
            v = tl.load(qkv_ptr + 2 * d + offs, mask=mask, other=0.0)
            tl.store(v_cache_ptr + cache_offs, v.to(v_cache_ptr.dtype.element_ty), mask=cache_mask)


def _q_output(qkv, n_heads, out):
    shape = (1, n_heads, 1, qkv.shape[-1] // 3 // n_heads)
    out = torch.empty(shape, dtype=qkv.dtype, device=qkv.device) if out is None else out
    _check_out("out", out, shape, qkv.dtype, qkv.device)
    return out


def fused_qk_norm_rope_kv(qkv, q_norm_w, k_norm_w, cos, sin, key_cache, value_cache, slot, n_heads: int,
                          eps: float, *, out=None):
    """Triton: as `qk_norm_rope_kv_reference` (writes the caches in place, returns q), one launch.

    `slot` is read on the device and not range-checked on the host; a slot outside the cache writes
    nothing. cos/sin may be tables [max_seq, head_dim] read at the slot (a graphed decode step then
    needs no launches to compute the token's row). `out` (contiguous [1, n_heads, 1, head_dim], qkv's
    dtype) avoids allocating q.
    """
    check_qk_norm_rope_kv_args(qkv, q_norm_w, k_norm_w, cos, sin, key_cache, value_cache, slot, n_heads)
    out = _q_output(qkv, n_heads, out)
    _check_triton_ready(qkv, "q/k norm + RoPE + KV")
    d = qkv.shape[-1] // 3
    head_dim = d // n_heads
    block = triton.next_power_of_2(d)
    _qk_norm_rope_kv_kernel[(3,)](
        qkv.contiguous(), q_norm_w.contiguous(), k_norm_w.contiguous(), cos.contiguous(), sin.contiguous(),
        out, key_cache, value_cache, slot, d, key_cache.shape[2], key_cache.stride(1), eps,
        HEAD_DIM=head_dim, BLOCK_D=block, ROPE_TABLE=cos.numel() != head_dim, num_warps=_row_warps(block),
        **pdl_launch_options(pdl_enabled(qkv)))
    return out


def fused_qk_norm_rope_kv_auto(qkv, q_norm_w, k_norm_w, cos, sin, key_cache, value_cache, slot, n_heads: int,
                               eps: float, *, impl: str = "auto", out=None):
    """impl "auto": triton on CUDA, reference elsewhere; "triton" / "reference" force one."""
    args = (qkv, q_norm_w, k_norm_w, cos, sin, key_cache, value_cache, slot, n_heads, eps)
    if _use_triton(impl, qkv):
        return fused_qk_norm_rope_kv(*args, out=out)
    q = qk_norm_rope_kv_reference(*args)
    return q if out is None else _q_output(qkv, n_heads, out).copy_(q)


# ---------------------------------------------------------------------------------------------------
# 2b. q/k norm + RoPE + KV-cache write, a prefill of T tokens


def check_qk_norm_rope_prefill_args(qkv, q_norm_w, k_norm_w, cos, sin, key_cache, value_cache, cache_index,
                                    n_heads) -> None:
    """Raise a ValueError naming the argument, its shape or dtype and what is expected."""
    if qkv.dim() != 3 or qkv.shape[0] != 1 or qkv.shape[1] < 1 or qkv.shape[2] % 3:
        raise ValueError(f"qkv must be one sequence's fused projection [1, T, 3*d], got {tuple(qkv.shape)}")
    _check_float("qkv", qkv)
    t = qkv.shape[1]
    head_dim = _check_heads_and_norms(qkv.shape[2] // 3, n_heads, q_norm_w, k_norm_w)
    for name, r in (("cos", cos), ("sin", sin)):
        if tuple(r.shape) != (1, t, head_dim) or r.dtype != torch.float32:
            raise ValueError(f"{name} must be float32 [1, T, head_dim] = [1, {t}, {head_dim}] (decoder.rope_tables "
                             f"of the tokens' positions), got {r.dtype} {tuple(r.shape)}")
    _check_kv_caches(key_cache, value_cache, n_heads, head_dim)
    if tuple(cache_index.shape) != (t,) or cache_index.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"cache_index must be int32/int64 [T] = [{t}] (each token's cache slot), "
                         f"got {cache_index.dtype} {tuple(cache_index.shape)}")
    _check_same_device(qkv=qkv, q_norm_w=q_norm_w, k_norm_w=k_norm_w, cos=cos, sin=sin, key_cache=key_cache,
                       value_cache=value_cache, cache_index=cache_index)


def qk_norm_rope_prefill_reference(qkv, q_norm_w, k_norm_w, cos, sin, key_cache, value_cache, cache_index,
                                   n_heads: int, eps: float):
    """decoder.Attention's prefill steps: q/k RMSNorm over the whole d vector, rotate-half RoPE in float32
    (`decoder.apply_rope`), k and v written into the caches at `cache_index`. Returns (q, k, v), each
    [1, n_heads, T, head_dim] in qkv's dtype (the attention's inputs)."""
    from .decoder import apply_rope  # decoder imports this module

    check_qk_norm_rope_prefill_args(qkv, q_norm_w, k_norm_w, cos, sin, key_cache, value_cache, cache_index, n_heads)
    t, d = qkv.shape[1], qkv.shape[2] // 3
    q, k, v = qkv.split(d, dim=-1)
    q = F.rms_norm(q, (d,), q_norm_w.to(q.dtype), eps)
    k = F.rms_norm(k, (d,), k_norm_w.to(k.dtype), eps)
    q, k, v = (z.reshape(1, t, n_heads, d // n_heads).transpose(1, 2) for z in (q, k, v))
    q, k = apply_rope(torch.stack([q, k]), cos, sin).unbind(0)
    key_cache.index_copy_(2, cache_index.long(), k.to(key_cache.dtype))
    value_cache.index_copy_(2, cache_index.long(), v.to(value_cache.dtype))
    return q, k, v


if triton is not None:

    @triton.jit
    def _qk_norm_rope_prefill_kernel(qkv_ptr, q_w_ptr, k_w_ptr, cos_ptr, sin_ptr, q_ptr, k_ptr, v_ptr,
                                     k_cache_ptr, v_cache_ptr, index_ptr, t, d, max_seq, stride_cache_head, eps,
                                     HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr):
        # Program (token, part): part 0 q, 1 k, 2 v of one token, each the whole d vector (the q/k norms
        # span all heads). Outputs are [heads, T, head_dim]: element (head, i) of token `token` goes to
        # head * T * hd + token * hd + i, and to head * stride + slot * hd + i in a cache.
        token = tl.program_id(0).to(tl.int64)
        part = tl.program_id(1)
        offs = tl.arange(0, BLOCK_D)
        mask = offs < d
        row = qkv_ptr + token * 3 * d
        out_offs = (offs // HEAD_DIM).to(tl.int64) * t * HEAD_DIM + token * HEAD_DIM + offs % HEAD_DIM
        # The slot in every lane (one cached word): a scalar combined with the vector mask is mis-typed by
        # Triton's interpreter. An out-of-range slot writes nothing rather than outside the cache.
        slot = tl.load(index_ptr + token + offs * 0).to(tl.int64)
        cache_offs = (offs // HEAD_DIM).to(tl.int64) * stride_cache_head + slot * HEAD_DIM + offs % HEAD_DIM
        cache_mask = mask & (slot >= 0) & (slot < max_seq)
        if part == 0:
            q = _norm_rope(row, q_w_ptr, cos_ptr + token * HEAD_DIM, sin_ptr + token * HEAD_DIM, d, eps,
                           HEAD_DIM, BLOCK_D)
            tl.store(q_ptr + out_offs, q, mask=mask)
        elif part == 1:
            k = _norm_rope(row + d, k_w_ptr, cos_ptr + token * HEAD_DIM, sin_ptr + token * HEAD_DIM, d, eps,
                           HEAD_DIM, BLOCK_D)
            tl.store(k_ptr + out_offs, k, mask=mask)
            tl.store(k_cache_ptr + cache_offs, k.to(k_cache_ptr.dtype.element_ty), mask=cache_mask)
        else:
            v = tl.load(row + 2 * d + offs, mask=mask, other=0.0)
            tl.store(v_ptr + out_offs, v, mask=mask)
            tl.store(v_cache_ptr + cache_offs, v.to(v_cache_ptr.dtype.element_ty), mask=cache_mask)


def fused_qk_norm_rope_prefill(qkv, q_norm_w, k_norm_w, cos, sin, key_cache, value_cache, cache_index,
                               n_heads: int, eps: float):
    """Triton: as `qk_norm_rope_prefill_reference`, one launch: (q, k, v) come back contiguous
    [1, n_heads, T, head_dim], ready for SDPA, and k/v are also written into the caches at `cache_index`
    (read on the device, not range-checked on the host: a slot outside the cache writes nothing). The
    RMS is summed in another order than F.rms_norm's, so an element may differ from the reference's by
    an ulp before RoPE."""
    check_qk_norm_rope_prefill_args(qkv, q_norm_w, k_norm_w, cos, sin, key_cache, value_cache, cache_index, n_heads)
    _check_triton_ready(qkv, "q/k norm + RoPE + KV prefill")
    t, d = qkv.shape[1], qkv.shape[2] // 3
    head_dim = d // n_heads
    q, k, v = (torch.empty((1, n_heads, t, head_dim), dtype=qkv.dtype, device=qkv.device) for _ in range(3))
    block = triton.next_power_of_2(d)
    _qk_norm_rope_prefill_kernel[(t, 3)](
        qkv.contiguous(), q_norm_w.contiguous(), k_norm_w.contiguous(), cos.contiguous(), sin.contiguous(),
        q, k, v, key_cache, value_cache, cache_index.contiguous(), t, d, key_cache.shape[2], key_cache.stride(1), eps,
        HEAD_DIM=head_dim, BLOCK_D=block, num_warps=_row_warps(block))
    return q, k, v


def fused_qk_norm_rope_prefill_auto(qkv, q_norm_w, k_norm_w, cos, sin, key_cache, value_cache, cache_index,
                                    n_heads: int, eps: float, *, impl: str = "auto"):
    """impl "auto": triton on CUDA, reference elsewhere; "triton" / "reference" force one."""
    args = (qkv, q_norm_w, k_norm_w, cos, sin, key_cache, value_cache, cache_index, n_heads, eps)
    if _use_triton(impl, qkv):
        return fused_qk_norm_rope_prefill(*args)
    return qk_norm_rope_prefill_reference(*args)


# ---------------------------------------------------------------------------------------------------
# 3. Softmax + top-k of precomputed router logits


def _router_outputs(h, top_k, out_weights, out_ids):
    shape = (h.shape[0], top_k)
    out_weights = torch.empty(shape, dtype=torch.float32, device=h.device) if out_weights is None else out_weights
    out_ids = torch.empty(shape, dtype=torch.int64, device=h.device) if out_ids is None else out_ids
    _check_out("out_weights", out_weights, shape, torch.float32, h.device)
    _check_out("out_ids", out_ids, shape, torch.int64, h.device)
    return out_weights, out_ids


def softmax_topk_reference(logits, top_k: int):
    """torch: softmax over all experts in float32, the top_k largest kept (descending, unrenormalised),
    exactly `MoE.route` after its gate projection."""
    weights, ids = torch.topk(torch.softmax(logits.float(), dim=-1), top_k, dim=-1)
    return weights, ids


if triton is not None:

    @triton.jit
    def _softmax_topk_kernel(logits_ptr, weights_ptr, ids_ptr, num_experts, stride, TOP_K: tl.constexpr, BLOCK_E: tl.constexpr):
        # One program per token over E <= 128 logits. The gate projection stays with cuBLAS, whose GEMV
        # reads the router weights with the whole GPU; a single program per token reading them (the
        # earlier one-program router, since removed) took 15 us per block on an H100.
        row = tl.program_id(0).to(tl.int64)
        offs_e = tl.arange(0, BLOCK_E)
        mask_e = offs_e < num_experts
        logits = tl.load(logits_ptr + row * stride + offs_e, mask=mask_e, other=float("-inf")).to(tl.float32)
        p = tl.exp(logits - tl.max(logits, axis=0))
        p = p / tl.sum(p, axis=0)
        p = tl.where(mask_e, p, -1.0)
        for j in range(TOP_K):
            best = tl.max(p, axis=0)
            idx = tl.minimum(tl.min(tl.where(p == best, offs_e, BLOCK_E), axis=0), num_experts - 1)
            tl.store(weights_ptr + row * TOP_K + j, best)
            tl.store(ids_ptr + row * TOP_K + j, idx.to(tl.int64))
            p = tl.where(offs_e == idx, -2.0, p)


def softmax_topk(logits, top_k: int, out_weights=None, out_ids=None):
    """Triton: as `softmax_topk_reference` for logits [T, E <= 128]; one launch, ties to the lower index."""
    if logits.dim() != 2 or not 1 <= logits.shape[1] <= MAX_EXPERTS:
        raise ValueError(f"logits must be [num_tokens, num_experts <= {MAX_EXPERTS}], got {tuple(logits.shape)}")
    _check_float("logits", logits)
    if isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= logits.shape[1]:
        raise ValueError(f"top_k={top_k!r} must be an int in 1..{logits.shape[1]}")
    out_weights, out_ids = _router_outputs(logits, top_k, out_weights, out_ids)
    _check_triton_ready(logits, "softmax + top-k")
    logits = logits if logits.stride(-1) == 1 else logits.contiguous()
    _softmax_topk_kernel[(logits.shape[0],)](
        logits, out_weights, out_ids, logits.shape[1], logits.stride(0),
        TOP_K=top_k, BLOCK_E=max(16, triton.next_power_of_2(logits.shape[1])), num_warps=1)
    return out_weights, out_ids


def softmax_topk_auto(logits, top_k: int, *, impl: str = "auto"):
    """impl "auto": triton on CUDA, reference elsewhere; "triton" / "reference" force one."""
    if _use_triton(impl, logits):
        return softmax_topk(logits, top_k)
    return softmax_topk_reference(logits, top_k)


# ---------------------------------------------------------------------------------------------------
# 4. The whole decode router in one launch: gate projection, softmax, top-k

# d-columns per program: d 2048 -> 64 programs, each reading a [64, 32] slice (4 KB). Measured on an
# H200 (MolmoE-1B's router, bf16, 16 blocks in a CUDA graph; `scripts/bench_router.py`,
# results/bench_router_h200.json), top_k 8: 4.25 us per block with 4 warps, against 4.34 at 64
# columns, 5.05 at 128, 5.37 at 256, and 6.95 for cuBLAS's gate GEMV followed by `softmax_topk`
# (top_k 1: 3.56 against 6.37; 3.45 at 64 columns).
ROUTER_BLOCK_K = 32
ROUTER_WARPS = 4


def new_arrival_counter(device) -> torch.Tensor:
    """The int32 arrival counter `router_topk` and `greedy_token` need: zero, and left at zero by every call."""
    return torch.zeros(1, dtype=torch.int32, device=device)


def router_topk_reference(h, gate_weight, top_k: int):
    """torch: the gate projection in h's dtype, then `softmax_topk_reference`: `MoE.route` exactly."""
    return softmax_topk_reference(F.linear(h, gate_weight), top_k)


def check_router_args(h, gate_weight, top_k, counter, block_k: int = ROUTER_BLOCK_K, num_warps: int = ROUTER_WARPS) -> None:
    """Raise a ValueError naming the argument, its shape, dtype or value and what is expected."""
    if h.dim() != 2 or h.shape[0] != 1 or not 1 <= h.shape[1] <= MAX_D:
        raise ValueError(f"h must be one token [1, d <= {MAX_D}], got {tuple(h.shape)}")
    _check_float("h", h)
    if gate_weight.dim() != 2 or gate_weight.shape[1] != h.shape[1] or not 1 <= gate_weight.shape[0] <= MAX_EXPERTS:
        raise ValueError(f"gate_weight must be [num_experts <= {MAX_EXPERTS}, d={h.shape[1]}], got {tuple(gate_weight.shape)}")
    if gate_weight.dtype != h.dtype or not gate_weight.is_contiguous():
        raise ValueError(f"gate_weight must be contiguous {h.dtype} like h, got {gate_weight.dtype} strides {gate_weight.stride()}")
    if isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= gate_weight.shape[0]:
        raise ValueError(f"top_k={top_k!r} must be an int in 1..{gate_weight.shape[0]}")
    if counter.dtype != torch.int32 or counter.numel() != 1:
        raise ValueError(f"counter must be a 1-element int32 tensor (new_arrival_counter), got {counter.dtype} {tuple(counter.shape)}")
    _check_same_device(h=h, gate_weight=gate_weight, counter=counter)
    if isinstance(block_k, bool) or not isinstance(block_k, int) or block_k < 16 or block_k & (block_k - 1):
        raise ValueError(f"block_k={block_k!r} must be a power of two >= 16 (d-columns per program)")
    if num_warps not in (1, 2, 4, 8, 16):
        raise ValueError(f"num_warps={num_warps!r} must be one of 1, 2, 4, 8, 16")


if triton is not None:

    @triton.jit
    def _router_topk_kernel(h_ptr, res_ptr, nw_ptr, normed_ptr, res_out_ptr, w_ptr, part_ptr, count_ptr,
                            weights_ptr, ids_ptr, d, num_experts, eps,
                            NUM_SPLITS: tl.constexpr, TOP_K: tl.constexpr, BLOCK_K: tl.constexpr,
                            BLOCK_E: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
                            NORM: tl.constexpr, USE_PDL: tl.constexpr):
        # Program `split`: the partial logits of every expert over d-columns [split * BLOCK_K, +BLOCK_K).
        _pdl_release(USE_PDL)
        split = tl.program_id(0)
        offs_e = tl.arange(0, BLOCK_E)
        mask_e = offs_e < num_experts
        offs_k = split * BLOCK_K + tl.arange(0, BLOCK_K)
        mask_k = offs_k < d
        # The gate weights are constants: loaded while the previous kernel (the one producing h) runs.
        w = tl.load(w_ptr + offs_e[:, None] * d + offs_k[None, :], mask=mask_e[:, None] & mask_k[None, :],
                    other=0.0).to(tl.float32)
        _pdl_wait(USE_PDL)
        if NORM:
            # h_ptr holds the sublayer output x: every program forms s = residual + x over the whole
            # vector for the RMS (8 KB from L2 for d = 2048), then its own columns of the normed vector,
            # rounded as `_add_rms_norm_kernel` rounds them; it writes those columns of both.
            dtype = h_ptr.dtype.element_ty
            offs_d = tl.arange(0, BLOCK_D)
            mask_d = offs_d < d
            s_all = (tl.load(h_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)
                     + tl.load(res_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)).to(dtype).to(tl.float32)
            rstd = tl.rsqrt(tl.sum(s_all * s_all, axis=0) / d + eps)
            s = (tl.load(h_ptr + offs_k, mask=mask_k, other=0.0).to(tl.float32)
                 + tl.load(res_ptr + offs_k, mask=mask_k, other=0.0).to(tl.float32)).to(dtype)
            tl.store(res_out_ptr + offs_k, s, mask=mask_k)
            norm_w = tl.load(nw_ptr + offs_k, mask=mask_k, other=0.0).to(dtype).to(tl.float32)
            normed = (s.to(tl.float32) * rstd * norm_w).to(dtype)
            tl.store(normed_ptr + offs_k, normed, mask=mask_k)
            h = normed.to(tl.float32)
        else:
            h = tl.load(h_ptr + offs_k, mask=mask_k, other=0.0).to(tl.float32)
        tl.store(part_ptr + split * BLOCK_E + offs_e, tl.sum(w * h[None, :], axis=1))
        # The atomic releases this program's partial and acquires the others'; the program that arrives
        # last sums them in split order (no float atomics: the logits are the same on every run),
        # finishes the router, and zeroes the counter for the next launch (a graph replays this one).
        arrived = tl.atomic_add(count_ptr, 1, sem="acq_rel")
        if arrived == NUM_SPLITS - 1:
            offs_s = tl.arange(0, BLOCK_S)
            parts = tl.load(part_ptr + offs_s[:, None] * BLOCK_E + offs_e[None, :],
                            mask=(offs_s < NUM_SPLITS)[:, None], other=0.0, cache_modifier=".cg")
            # Rounded to the activation dtype, as the gate projection's output is in MoE.route.
            logits = tl.sum(parts, axis=0).to(h_ptr.dtype.element_ty).to(tl.float32)
            logits = tl.where(mask_e, logits, float("-inf"))
            p = tl.exp(logits - tl.max(logits, axis=0))
            p = p / tl.sum(p, axis=0)
            p = tl.where(mask_e, p, -1.0)
            for j in range(TOP_K):
                # One reduction per pick (value and index; ties to the lower index), not a max and a min.
                best, idx = tl.max(p, axis=0, return_indices=True, return_indices_tie_break_left=True)
                tl.store(weights_ptr + j, best)
                tl.store(ids_ptr + j, idx.to(tl.int64))
                p = tl.where(offs_e == idx, -2.0, p)
            tl.store(count_ptr, 0)


def _launch_router(h, gate_weight, top_k, counter, out_weights, out_ids, workspace, block_k, num_warps,
                   norm=None):
    """Shared by `router_topk` and `router_topk_norm`; norm = (residual, norm_weight, eps, normed, residual_out)."""
    _check_triton_ready(h, "router")
    out_weights, out_ids = _router_outputs(h, top_k, out_weights, out_ids)
    num_experts, d = gate_weight.shape
    num_splits = -(-d // block_k)
    block_e = max(16, triton.next_power_of_2(num_experts))
    needed = num_splits * block_e
    if workspace is None:
        workspace = torch.empty(needed, dtype=torch.float32, device=h.device)
    elif workspace.dtype != torch.float32 or workspace.numel() < needed or not workspace.is_contiguous():
        raise ValueError(f"workspace must be contiguous float32 with >= {needed} elements, "
                         f"got {workspace.dtype} {tuple(workspace.shape)}")
    h = h if h.is_contiguous() else h.contiguous()
    residual, norm_weight, eps, normed, residual_out = norm if norm is not None else (h, h, 0.0, h, h)
    _router_topk_kernel[(num_splits,)](
        h, residual, norm_weight, normed, residual_out, gate_weight, workspace, counter, out_weights, out_ids,
        d, num_experts, eps,
        NUM_SPLITS=num_splits, TOP_K=top_k, BLOCK_K=block_k, BLOCK_E=block_e,
        BLOCK_S=max(2, triton.next_power_of_2(num_splits)), BLOCK_D=triton.next_power_of_2(d), NORM=norm is not None,
        num_warps=num_warps, **pdl_launch_options(pdl_enabled(h)))
    return out_weights, out_ids


def router_topk(h, gate_weight, top_k: int, counter, *, out_weights=None, out_ids=None, workspace=None,
                block_k: int = ROUTER_BLOCK_K, num_warps: int = ROUTER_WARPS):
    """Triton: as `router_topk_reference` for one decode token h [1, d], in one launch.

    `counter` (`new_arrival_counter`) is the arrival counter of the launch's programs; launches that
    share one must not run concurrently (on one stream they do not). `workspace` (contiguous float32,
    >= ceil(d / block_k) * next_power_of_2(max(num_experts, 16)) elements) and the outputs avoid
    allocation. Logits are summed in float32 in another order than cuBLAS's GEMV, so a logit may
    round to the neighbouring value of h's dtype; ids tie to the lower index. `block_k` (d-columns per
    program) and `num_warps` are tuning knobs (see ROUTER_BLOCK_K).
    """
    check_router_args(h, gate_weight, top_k, counter, block_k, num_warps)
    return _launch_router(h, gate_weight, top_k, counter, out_weights, out_ids, workspace, block_k, num_warps)


def router_topk_norm_reference(x, residual, norm_weight, eps: float, gate_weight, top_k: int):
    """torch: `add_rms_norm_reference` then `router_topk_reference`, returning (weights, ids, normed,
    new_residual): decoder.py's residual add, MoE norm and `MoE.route` for one decode token."""
    normed, new_residual = add_rms_norm_reference(x, residual, norm_weight, eps)
    return (*router_topk_reference(normed, gate_weight, top_k), normed, new_residual)


def router_topk_norm(x, residual, norm_weight, eps: float, gate_weight, top_k: int, counter, *, normed_out=None,
                     residual_out=None, block_k: int = ROUTER_BLOCK_K, num_warps: int = ROUTER_WARPS):
    """Triton: as `router_topk_norm_reference`, one launch: the residual add and RMSNorm before the MoE
    inside the router (every program forms the RMS of the whole vector and normalises its own columns),
    one kernel boundary fewer per block than `fused_add_rms_norm` + `router_topk`. The normed vector
    and the new residual are rounded as `fused_add_rms_norm` rounds them; the RMS is summed in another
    order, so an element may differ from that path's by an ulp. `normed_out` / `residual_out` (x's shape
    and dtype) avoid allocation and must be other buffers than x and residual (all programs read those
    while each writes its columns)."""
    check_add_rms_norm_args(x, residual, norm_weight)
    check_router_args(x, gate_weight, top_k, counter, block_k, num_warps)
    normed_out, residual_out = _add_rms_norm_outputs(x, normed_out, residual_out)
    inputs = {x.data_ptr(), residual.data_ptr()}
    if normed_out.data_ptr() in inputs or residual_out.data_ptr() in inputs:
        raise ValueError("normed_out and residual_out must be other buffers than x and residual (programs read "
                         "the whole of x and residual while others write their columns)")
    weights, ids = _launch_router(x, gate_weight, top_k, counter, None, None, None, block_k, num_warps,
                                  norm=(residual.contiguous(), norm_weight.contiguous(), eps, normed_out, residual_out))
    return weights, ids, normed_out, residual_out


def router_topk_norm_auto(x, residual, norm_weight, eps: float, gate_weight, top_k: int, counter, *,
                          impl: str = "auto"):
    """impl "auto": triton on CUDA, reference elsewhere; "triton" / "reference" force one."""
    if _use_triton(impl, x):
        return router_topk_norm(x, residual, norm_weight, eps, gate_weight, top_k, counter)
    return router_topk_norm_reference(x, residual, norm_weight, eps, gate_weight, top_k)


def router_topk_auto(h, gate_weight, top_k: int, counter, *, impl: str = "auto"):
    """impl "auto": triton on CUDA, reference elsewhere; "triton" / "reference" force one."""
    if _use_triton(impl, h):
        return router_topk(h, gate_weight, top_k, counter)
    return router_topk_reference(h, gate_weight, top_k)


# ---------------------------------------------------------------------------------------------------
# 5. Greedy token: argmax over the vocabulary, one decode token

# Logits per program: MolmoE-1B's 50,304 -> 25 programs.
GREEDY_BLOCK_V = 2048


def greedy_token_reference(logits):
    """torch: the first index of the largest logit, [1, 1] int64 (`logits.argmax(-1, keepdim=True)`)."""
    return logits.argmax(dim=-1, keepdim=True)


def check_greedy_args(logits, counter, block_v: int) -> None:
    """Raise a ValueError naming the argument, its shape, dtype or value and what is expected."""
    if logits.dim() != 2 or logits.shape[0] != 1 or logits.shape[1] < 1:
        raise ValueError(f"logits must be one token's [1, vocab_size >= 1], got {tuple(logits.shape)}")
    _check_float("logits", logits, allow_float64=False)
    if counter.dtype != torch.int32 or counter.numel() != 1:
        raise ValueError(f"counter must be a 1-element int32 tensor (new_arrival_counter), got {counter.dtype} {tuple(counter.shape)}")
    _check_same_device(logits=logits, counter=counter)
    if isinstance(block_v, bool) or not isinstance(block_v, int) or block_v < 16 or block_v & (block_v - 1):
        raise ValueError(f"block_v={block_v!r} must be a power of two >= 16 (logits per program)")


if triton is not None:

    @triton.jit
    def _greedy_token_kernel(logits_ptr, val_ptr, idx_ptr, count_ptr, out_ptr, slot_ptr, history_ptr, vocab,
                             NUM_BLOCKS: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_S: tl.constexpr,
                             ADVANCE: tl.constexpr, USE_PDL: tl.constexpr):
        # Program b: the largest logit of [b * BLOCK_V, +BLOCK_V) and its first index.
        _pdl_release(USE_PDL)
        block = tl.program_id(0)
        offs = block * BLOCK_V + tl.arange(0, BLOCK_V)
        _pdl_wait(USE_PDL)
        x = tl.load(logits_ptr + offs, mask=offs < vocab, other=float("-inf")).to(tl.float32)
        best, idx = tl.max(x, axis=0, return_indices=True, return_indices_tie_break_left=True)
        tl.store(val_ptr + block, best)
        tl.store(idx_ptr + block, block * BLOCK_V + idx)
        # As in the router: the last program to arrive reduces the partials in block order (a tie goes
        # to the lower block, hence the lower index, as torch's argmax) and zeroes the counter.
        arrived = tl.atomic_add(count_ptr, 1, sem="acq_rel")
        if arrived == NUM_BLOCKS - 1:
            offs_s = tl.arange(0, BLOCK_S)
            mask_s = offs_s < NUM_BLOCKS
            vals = tl.load(val_ptr + offs_s, mask=mask_s, other=float("-inf"), cache_modifier=".cg")
            _, pos = tl.max(vals, axis=0, return_indices=True, return_indices_tie_break_left=True)
            token = tl.load(idx_ptr + pos, cache_modifier=".cg").to(tl.int64)
            tl.store(out_ptr, token)
            if ADVANCE:
                # The decode step's next inputs, written on the device: the token is `out` (the step's
                # input token buffer), the slot moves on by one, and the history keeps every token.
                slot = tl.load(slot_ptr)
                tl.store(history_ptr + slot + 1, token)
                tl.store(slot_ptr, slot + 1)
            tl.store(count_ptr, 0)


def greedy_token(logits, counter, *, out=None, workspace=None, block_v: int = GREEDY_BLOCK_V, advance=None):
    """Triton: as `greedy_token_reference` for logits [1, V], in one launch; returns [1, 1] int64.

    `counter` (`new_arrival_counter`) may be the router's: launches sharing it must not run
    concurrently (on one stream they do not). `out` ([1, 1] int64) and `workspace` (contiguous
    float32, >= 2 * ceil(V / block_v) elements) avoid allocation. NaN logits give an unspecified
    index (torch's argmax returns the first NaN's).

    `advance` = (slot, history) makes a decode step advance itself: after writing the token to `out`,
    the kernel writes it to history[slot + 1] and adds one to slot (a 1-element int64 tensor;
    history: contiguous int64 with more than slot + 1 elements, not checked on the host, which would
    sync). A graphed step whose `out` is its own input token buffer then replays again without any
    copy into its inputs.
    """
    check_greedy_args(logits, counter, block_v)
    out = torch.empty((1, 1), dtype=torch.int64, device=logits.device) if out is None else out
    _check_out("out", out, (1, 1), torch.int64, logits.device)
    if advance is not None:
        slot, history = advance
        _check_out("advance slot", slot, (1,), torch.int64, logits.device)
        if history.dim() != 1 or history.dtype != torch.int64 or not history.is_contiguous() or history.device != logits.device:
            raise ValueError(f"advance history must be a contiguous 1-d int64 tensor on {logits.device}, "
                             f"got {history.dtype} {tuple(history.shape)} on {history.device}")
    else:
        slot = history = out
    _check_triton_ready(logits, "greedy token")
    vocab = logits.shape[1]
    num_blocks = -(-vocab // block_v)
    if workspace is None:
        workspace = torch.empty(2 * num_blocks, dtype=torch.float32, device=logits.device)
    elif workspace.dtype != torch.float32 or workspace.numel() < 2 * num_blocks or not workspace.is_contiguous():
        raise ValueError(f"workspace must be contiguous float32 with >= {2 * num_blocks} elements, "
                         f"got {workspace.dtype} {tuple(workspace.shape)}")
    # Indices are stored as int32 in the workspace's second half (the same bytes, viewed as int32).
    values, indices = workspace[:num_blocks], workspace[num_blocks:2 * num_blocks].view(torch.int32)
    logits = logits if logits.is_contiguous() else logits.contiguous()
    _greedy_token_kernel[(num_blocks,)](
        logits, values, indices, counter, out, slot, history, vocab,
        NUM_BLOCKS=num_blocks, BLOCK_V=block_v, BLOCK_S=max(2, triton.next_power_of_2(num_blocks)),
        ADVANCE=advance is not None,
        num_warps=max(1, min(8, block_v // 256)), **pdl_launch_options(pdl_enabled(logits)))
    return out


def greedy_token_auto(logits, counter, *, impl: str = "auto"):
    """impl "auto": triton on CUDA, reference elsewhere; "triton" / "reference" force one."""
    if _use_triton(impl, logits):
        return greedy_token(logits, counter)
    return greedy_token_reference(logits)


# ---------------------------------------------------------------------------------------------------
# 6. Token embedding: one decode token through MolmoE's two tables


def embedding_reference(ids, table, extra_table):
    """torch: rows of `table` [V, d] for ids < V, of `extra_table` [V2, d] for ids V..V+V2-1 (MolmoE's
    `new_embedding` rows appended after the main table). Two gathers and a select, never a concatenated
    copy of the table (206 MB for MolmoE-1B, more than a whole decode step's attention)."""
    if extra_table.shape[0] == 0:
        return F.embedding(ids, table)
    size = table.shape[0]
    main = F.embedding(ids.clamp(max=size - 1), table)
    extra = F.embedding((ids - size).clamp(min=0), extra_table)
    return torch.where((ids < size)[..., None], main, extra)


def check_embed_args(ids, table, extra_table) -> None:
    """Raise a ValueError naming the argument, its shape or dtype and what is expected."""
    if ids.numel() != 1 or ids.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"ids must be one token id (a 1-element int32/int64 tensor), got {ids.dtype} {tuple(ids.shape)}")
    if table.dim() != 2 or not 1 <= table.shape[1] <= MAX_D or table.shape[0] < 1:
        raise ValueError(f"table must be [vocab >= 1, d <= {MAX_D}], got {tuple(table.shape)}")
    _check_float("table", table, allow_float64=False)
    if extra_table.dim() != 2 or extra_table.shape[1] != table.shape[1] or extra_table.dtype != table.dtype:
        raise ValueError(f"extra_table must be [rows, d={table.shape[1]}] of table's dtype {table.dtype}, "
                         f"got {extra_table.dtype} {tuple(extra_table.shape)}")
    _check_same_device(ids=ids, table=table, extra_table=extra_table)


if triton is not None:

    @triton.jit
    def _embed_token_kernel(ids_ptr, table_ptr, extra_ptr, out_ptr, size, extra_size, d,
                            BLOCK_D: tl.constexpr, USE_PDL: tl.constexpr):
        # One program per BLOCK_D columns of the row.
        _pdl_release(USE_PDL)
        offs = tl.program_id(0) * BLOCK_D + tl.arange(0, BLOCK_D)
        mask = offs < d
        _pdl_wait(USE_PDL)
        # Loaded into every lane, as the slot in `_qk_norm_rope_kv_kernel` (the interpreter mis-types a
        # scalar combined with the vector mask).
        token = tl.load(ids_ptr + offs * 0).to(tl.int64)
        main = token < size
        extra = token - size
        # An id past both tables reads nothing and gives zeros (torch's gather would fail a device assert).
        row_main = tl.load(table_ptr + token * d + offs, mask=mask & main & (token >= 0), other=0.0)
        row_extra = tl.load(extra_ptr + extra * d + offs, mask=mask & (extra >= 0) & (extra < extra_size), other=0.0)
        tl.store(out_ptr + offs, tl.where(main, row_main, row_extra), mask=mask)


def embed_token(ids, table, extra_table, *, out=None):
    """Triton: `embedding_reference` for one token id, one launch; returns [1, 1, d] in table's dtype.
    `out` (contiguous [1, 1, d]) avoids allocation. An id outside both tables gives a zero row."""
    check_embed_args(ids, table, extra_table)
    _check_triton_ready(table, "embedding")
    d = table.shape[1]
    out = torch.empty((1, 1, d), dtype=table.dtype, device=table.device) if out is None else out
    _check_out("out", out, (1, 1, d), table.dtype, table.device)
    block = min(1024, triton.next_power_of_2(d))
    # An empty extra table still needs a valid pointer: the main one, never read (extra_size 0).
    extra = extra_table if extra_table.shape[0] else table
    _embed_token_kernel[(triton.cdiv(d, block),)](
        ids, table, extra, out, table.shape[0], extra_table.shape[0], d,
        BLOCK_D=block, num_warps=_row_warps(block), **pdl_launch_options(pdl_enabled(table)))
    return out


def embed_token_auto(ids, table, extra_table, *, impl: str = "auto"):
    """impl "auto": triton on CUDA, reference elsewhere; "triton" / "reference" force one. Returns [1, 1, d]."""
    if _use_triton(impl, table):
        return embed_token(ids, table, extra_table)
    check_embed_args(ids, table, extra_table)
    return embedding_reference(ids.reshape(1, 1), table, extra_table)
