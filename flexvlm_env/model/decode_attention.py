"""Split-KV ("flash-decoding") attention of one decode query over the static KV cache.

A graphed decode step attends one query per head over a static cache of max_seq slots under a mask
(slot index <= the current position). PyTorch's masked SDPA for q_len = 1 runs one thread block per
head and reads every slot, visible or not: a few SMs stream the whole cache. Here phase 1 splits
the cache into `num_splits` chunks per head, one program each, and every program reads only the
keys of its chunk that are visible, keeping an online softmax in float32 (running max m, sum l and
p·V accumulator), then writes its partial (acc, m, l) to a float32 workspace; a program whose chunk
starts after the slot writes a neutral partial (m = -inf, l = 0) and reads nothing. Phase 2 (one
program per head) rescales the partials by exp(m_i - max m) and writes the output in q's dtype.

The slot is read on the device (never on the host) and every shape is fixed by (heads, max_seq,
head_dim), so both launches can be captured in a CUDA graph and replayed with a new slot value
written into the same tensor. `decode_attention_reference` is the plain-torch masked softmax and
`decode_attention_auto` dispatches like the `*_auto` functions of fused_kernels.py.

`decode_attention_qk` takes the token's raw q/k/v projection instead of q: each split program forms
its head's q (the q norm over all heads, from partial sums of squares the q/k/v GEMV wrote, and RoPE),
and the program whose chunk holds the slot forms the slot's k and writes k and v into the caches, the
work of `fused_kernels.fused_qk_norm_rope_kv` without its launch (the decoder's graphed decode step).
"""
from __future__ import annotations

import math

import torch

from .fused_kernels import (
    _check_float,
    _check_out,
    _check_same_device,
    _check_triton_ready,
    _q_output,
    _use_triton,
    check_qk_norm_rope_kv_args,
    pdl_enabled,
    pdl_launch_options,
    qk_norm_rope_kv_reference,
)

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the reference path still works
    triton = None
else:
    from .fused_kernels import _normed, _pdl_release, _pdl_wait

MAX_HEAD_DIM = 256  # one program holds a whole head vector (q and the accumulator) in registers
# Keys per split: 16 heads x 2048 slots -> 512 programs of one 64-key tile. Measured on an H200
# (MolmoE-1B shapes, bf16, `scripts/bench_decode_attention.py`, results/bench_decode_attention_h200.json):
# 9.7 us per call at 64 keys against 12.7 at 128 with 1280 visible keys, 7.7 against 10.5 with 336.
# Shorter chunks win 0.2-0.7 us at 336 keys but lose 1.4-2.3 at 1280 (the combine reads more
# partials). Issuing V's load together with K's measured no gain.
DEFAULT_CHUNK = 64
# Warps per split program: at 64 keys and 1280 visible, 9.6 us with 4 against 10.7 with 2 and 10.8
# with 8 (H200; results/device/session9/call6_bench_decode_attention_h200.json.gz).
DEFAULT_WARPS = 4
TILE_ELEMENTS = 8192  # a [BLOCK_N, head_dim] K/V tile: 64 float32 values a thread with 4 warps


def check_decode_attention_args(q, key_cache, value_cache, slot) -> None:
    """Raise a ValueError naming the argument, its shape or dtype and what is expected."""
    if q.dim() != 4 or q.shape[0] != 1 or q.shape[2] != 1 or not 1 <= q.shape[3] <= MAX_HEAD_DIM:
        raise ValueError(f"q must be one decode query [1, heads, 1, head_dim <= {MAX_HEAD_DIM}], got {tuple(q.shape)}")
    _check_float("q", q)
    n_heads, head_dim = q.shape[1], q.shape[3]
    for name, cache in (("key_cache", key_cache), ("value_cache", value_cache)):
        if cache.dim() != 4 or cache.shape[0] != 1 or cache.shape[1] != n_heads or cache.shape[3] != head_dim:
            raise ValueError(f"{name} must be [1, heads={n_heads}, max_seq, head_dim={head_dim}], "
                             f"got {tuple(cache.shape)}")
        if cache.dtype != q.dtype:
            raise ValueError(f"{name} must share q's dtype {q.dtype}, got {cache.dtype}")
        if not cache.is_contiguous():
            # Read through its pointer: a silent .contiguous() would copy the whole cache every step.
            raise ValueError(f"{name} must be contiguous, got strides {cache.stride()}")
    if value_cache.shape != key_cache.shape:
        raise ValueError(f"value_cache must match key_cache {tuple(key_cache.shape)}, got {tuple(value_cache.shape)}")
    if slot.numel() != 1 or slot.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"slot must be a 1-element int32/int64 tensor (on the device), "
                         f"got {slot.dtype} {tuple(slot.shape)}")
    _check_same_device(q=q, key_cache=key_cache, value_cache=value_cache, slot=slot)


def decode_attention_reference(q, key_cache, value_cache, slot):
    """softmax(q·K^T / sqrt(head_dim)) · V over cache positions 0..slot, in float32 (float64 for float64
    inputs), returned in q's dtype: SDPA with attn_mask = arange(max_seq) <= slot. The mask is built on
    the device, so this path does not sync either."""
    check_decode_attention_args(q, key_cache, value_cache, slot)
    acc_dtype = torch.promote_types(q.dtype, torch.float32)
    visible = torch.arange(key_cache.shape[2], device=q.device) <= slot.reshape(())
    scores = (q.to(acc_dtype) @ key_cache.to(acc_dtype).transpose(-1, -2)) / math.sqrt(q.shape[-1])
    probs = torch.softmax(scores.masked_fill(~visible, float("-inf")), dim=-1)
    return (probs @ value_cache.to(acc_dtype)).to(q.dtype)


def _next_power_of_2(n: int) -> int:
    return 1 << (n - 1).bit_length()


def default_num_splits(max_seq: int) -> int:
    return -(-max_seq // DEFAULT_CHUNK)


def split_plan(max_seq: int, head_dim: int, num_splits: int | None = None) -> tuple[int, int, int]:
    """(num_splits, chunk, block_n): split s covers keys [s * chunk, (s + 1) * chunk), in block_n tiles."""
    num_splits = default_num_splits(max_seq) if num_splits is None else num_splits
    if not isinstance(num_splits, int) or not 1 <= num_splits <= max_seq:
        raise ValueError(f"num_splits must be an int in 1..max_seq={max_seq}, got {num_splits!r}")
    chunk = -(-max_seq // num_splits)
    block_n = max(16, min(_next_power_of_2(chunk), TILE_ELEMENTS // _next_power_of_2(head_dim)))
    return num_splits, chunk, block_n


if triton is not None:

    @triton.jit
    def _attend_tile(q, k, v, mask_n, m, l, acc):
        """Online-softmax update of (m, l, acc) by one [BLOCK_N, BLOCK_D] tile of keys and values."""
        # One query: elementwise products and a row sum (no tl.dot: a GEMV, and the interpreter's
        # bf16 dot is wrong).
        s = tl.where(mask_n, tl.sum(k.to(tl.float32) * q[None, :], axis=1), float("-inf"))
        m_new = tl.maximum(m, tl.max(s, axis=0))
        alpha = tl.exp2(m - m_new)
        p = tl.exp2(s - m_new)
        acc = acc * alpha + tl.sum(p[:, None] * v.to(tl.float32), axis=0)
        l = l * alpha + tl.sum(p, axis=0)
        return m_new, l, acc

    @triton.jit
    def _rope_head(x_ptr, w_ptr, head_offs, offs_d, mask_d, rstd, cos, sin, HEAD_DIM: tl.constexpr):
        """One head's rotate-half RoPE of rms_norm(x) * w (normed and rotated values rounded to x's dtype,
        as `fused_kernels._norm_rope`), x and w indexed over the whole d vector from `head_offs`."""
        partner = head_offs + (offs_d + HEAD_DIM // 2) % HEAD_DIM
        a = _normed(x_ptr, w_ptr, head_offs + offs_d, mask_d, rstd)
        b = _normed(x_ptr, w_ptr, partner, mask_d, rstd)
        rotated = tl.where(offs_d < HEAD_DIM // 2, -b, b)
        return (a * cos + rotated * sin).to(x_ptr.dtype.element_ty)

    @triton.jit
    def _decode_attention_split_kernel(q_ptr, k_ptr, v_ptr, slot_ptr, ws_ptr, max_seq, chunk, qk_scale,
                                       sq_ptr, qw_ptr, kw_ptr, cos_ptr, sin_ptr, d, eps,
                                       HEAD_DIM: tl.constexpr, NUM_SPLITS: tl.constexpr, BLOCK_N: tl.constexpr,
                                       BLOCK_D: tl.constexpr, USE_PDL: tl.constexpr, SLOT_STATIC: tl.constexpr,
                                       QK: tl.constexpr, SQ_PARTS: tl.constexpr, BLOCK_SQ: tl.constexpr,
                                       ROPE_TABLE: tl.constexpr):
        # Program (head, split): the visible keys of the split's chunk, [lo, hi) = chunk ∩ [0, slot].
        # With QK, q_ptr is the token's raw q/k/v projection [3 * d], and each program forms its head's q
        # (q norm + RoPE) itself; the program whose chunk holds the slot also forms the slot's k (k norm +
        # RoPE) and writes it and v into the caches: `decode_attention_qk`.
        _pdl_release(USE_PDL)
        head = tl.program_id(0)
        split = tl.program_id(1)
        offs_d = tl.arange(0, BLOCK_D)
        mask_d = offs_d < HEAD_DIM
        head_offs = head.to(tl.int64) * max_seq * HEAD_DIM
        if not SLOT_STATIC:
            _pdl_wait(USE_PDL)
        # Read on the device so that a graph replays with a new value; a slot past the end sees every key.
        slot = tl.load(slot_ptr).to(tl.int32)
        lo = split * chunk
        hi = tl.minimum(lo + chunk, tl.minimum(slot + 1, max_seq))
        # The first tile's keys and values. With SLOT_STATIC every row but the slot's was written before
        # this step began: they are loaded before waiting for the kernel that writes the slot's row (and
        # q), so their loads overlap that kernel's tail (PDL); the slot's row is patched in after. (Splits
        # past the slot ending here, before the wait, with the combine leaving their rows out, was slower:
        # 0.537 against 0.527 ms per token at top_k 1 on an H200, results/device/session14.)
        offs_n = lo + tl.arange(0, BLOCK_N)
        mask_n = offs_n < hi
        offs = head_offs + offs_n[:, None].to(tl.int64) * HEAD_DIM + offs_d[None, :]
        is_slot = offs_n == slot
        # Masked loads: slots after the slot are never read, whatever they hold (stale, NaN).
        old_rows = (mask_n & (offs_n != slot))[:, None] & mask_d[None, :]
        k = tl.load(k_ptr + offs, mask=old_rows, other=0.0)
        v = tl.load(v_ptr + offs, mask=old_rows, other=0.0)
        if SLOT_STATIC:
            _pdl_wait(USE_PDL)
        m = -float("inf")
        l = 0.0
        acc = tl.zeros([BLOCK_D], dtype=tl.float32)
        # A split whose chunk starts after the slot writes the neutral partial (m = -inf, l = 0). Otherwise
        # every tile holds at least one visible key, so m is finite after it and no -inf - -inf occurs.
        if lo < hi:
            slot_rows = (mask_n & is_slot)[:, None] & mask_d[None, :]
            if QK:
                # The norms' statistics from the q/k/v GEMV's partial sums of squares (SQ_PARTS each for q
                # and k), the slot's RoPE row from the tables.
                offs_sq = tl.arange(0, BLOCK_SQ)
                mask_sq = offs_sq < SQ_PARTS
                sq_q = tl.sum(tl.load(sq_ptr + offs_sq, mask=mask_sq, other=0.0), axis=0)
                sq_k = tl.sum(tl.load(sq_ptr + SQ_PARTS + offs_sq, mask=mask_sq, other=0.0), axis=0)
                row = 0
                if ROPE_TABLE:
                    row = tl.minimum(tl.maximum(slot, 0), max_seq - 1).to(tl.int64) * HEAD_DIM
                cos = tl.load(cos_ptr + row + offs_d, mask=mask_d, other=0.0)
                sin = tl.load(sin_ptr + row + offs_d, mask=mask_d, other=0.0)
                q = _rope_head(q_ptr, qw_ptr, head * HEAD_DIM, offs_d, mask_d, tl.rsqrt(sq_q / d + eps), cos, sin,
                               HEAD_DIM)
                if (lo <= slot) & (slot < hi):
                    k_new = _rope_head(q_ptr + d, kw_ptr, head * HEAD_DIM, offs_d, mask_d, tl.rsqrt(sq_k / d + eps),
                                       cos, sin, HEAD_DIM)
                    v_new = tl.load(q_ptr + 2 * d + head * HEAD_DIM + offs_d, mask=mask_d, other=0.0)
                    slot_offs = head_offs + slot.to(tl.int64) * HEAD_DIM + offs_d
                    tl.store(k_ptr + slot_offs, k_new.to(k_ptr.dtype.element_ty), mask=mask_d)
                    tl.store(v_ptr + slot_offs, v_new.to(v_ptr.dtype.element_ty), mask=mask_d)
                    k = tl.where(slot_rows, k_new.to(k.dtype)[None, :], k)
                    v = tl.where(slot_rows, v_new.to(v.dtype)[None, :], v)
            else:
                k = tl.where(slot_rows, tl.load(k_ptr + offs, mask=slot_rows, other=0.0), k)
                v = tl.where(slot_rows, tl.load(v_ptr + offs, mask=slot_rows, other=0.0), v)
                q = tl.load(q_ptr + head * HEAD_DIM + offs_d, mask=mask_d, other=0.0)
            # Scale and log2(e) folded into q once: the softmax runs on exp2 (m and l are in base 2 too).
            q = q.to(tl.float32) * qk_scale
            m, l, acc = _attend_tile(q, k, v, mask_n, m, l, acc)
            for start in range(lo + BLOCK_N, hi, BLOCK_N):
                offs_n = start + tl.arange(0, BLOCK_N)
                mask_n = offs_n < hi
                offs = head_offs + offs_n[:, None].to(tl.int64) * HEAD_DIM + offs_d[None, :]
                tile_mask = mask_n[:, None] & mask_d[None, :]
                k = tl.load(k_ptr + offs, mask=tile_mask, other=0.0)
                v = tl.load(v_ptr + offs, mask=tile_mask, other=0.0)
                m, l, acc = _attend_tile(q, k, v, mask_n, m, l, acc)
        ws = ws_ptr + (head * NUM_SPLITS + split) * (HEAD_DIM + 2)
        tl.store(ws + offs_d, acc, mask=mask_d)
        tl.store(ws + HEAD_DIM, m)
        tl.store(ws + HEAD_DIM + 1, l)

    @triton.jit
    def _decode_attention_combine_kernel(ws_ptr, out_ptr, HEAD_DIM: tl.constexpr, NUM_SPLITS: tl.constexpr,
                                         BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr, USE_PDL: tl.constexpr):
        # Program head: sum of the partials, each rescaled from its own max to the global one.
        _pdl_release(USE_PDL)
        _pdl_wait(USE_PDL)
        head = tl.program_id(0)
        offs_s = tl.arange(0, BLOCK_S)
        mask_s = offs_s < NUM_SPLITS
        offs_d = tl.arange(0, BLOCK_D)
        mask_d = offs_d < HEAD_DIM
        rows = ws_ptr + (head * NUM_SPLITS + offs_s) * (HEAD_DIM + 2)
        m = tl.load(rows + HEAD_DIM, mask=mask_s, other=float("-inf"))
        l = tl.load(rows + HEAD_DIM + 1, mask=mask_s, other=0.0)
        # Split 0 always holds key 0, so the max is finite; neutral splits get weight exp2(-inf) = 0.
        w = tl.exp2(m - tl.max(m, axis=0))
        acc = tl.load(rows[:, None] + offs_d[None, :], mask=mask_s[:, None] & mask_d[None, :], other=0.0)
        out = tl.sum(acc * w[:, None], axis=0) / tl.sum(l * w, axis=0)
        tl.store(out_ptr + head * HEAD_DIM + offs_d, out.to(out_ptr.dtype.element_ty), mask=mask_d)


def _output(q, out):
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device) if out is None else out
    _check_out("out", out, q.shape, q.dtype, q.device)
    return out


def _launch(q, key_cache, value_cache, slot, out, num_splits, workspace, num_warps, slot_static, qk=None):
    """Both kernels; `qk` = (square_sums, q_norm_w, k_norm_w, cos, sin, eps) makes q the raw projection."""
    _, n_heads, max_seq, head_dim = key_cache.shape
    num_splits, chunk, block_n = split_plan(max_seq, head_dim, num_splits)
    ws_shape = (n_heads, num_splits, head_dim + 2)
    workspace = torch.empty(ws_shape, dtype=torch.float32, device=q.device) if workspace is None else workspace
    _check_out("workspace", workspace, ws_shape, torch.float32, q.device)
    num_warps = DEFAULT_WARPS if num_warps is None else num_warps
    if num_warps not in (1, 2, 4, 8, 16):
        raise ValueError(f"num_warps={num_warps!r} must be one of 1, 2, 4, 8, 16")
    _check_triton_ready(q, "decode attention")
    block_d = _next_power_of_2(head_dim)
    pdl = pdl_launch_options(pdl_enabled(q))
    if qk is None:
        square_sums, q_norm_w, k_norm_w, cos, sin, eps = q, q, q, q, q, 0.0
        parts, rope_table = 1, False
    else:
        square_sums, q_norm_w, k_norm_w, cos, sin, eps = qk
        parts, rope_table = square_sums.numel() // 2, cos.numel() != head_dim
    _decode_attention_split_kernel[(n_heads, num_splits)](
        q.contiguous(), key_cache, value_cache, slot, workspace, max_seq, chunk, math.log2(math.e) / math.sqrt(head_dim),
        square_sums, q_norm_w, k_norm_w, cos, sin, n_heads * head_dim, eps,
        HEAD_DIM=head_dim, NUM_SPLITS=num_splits, BLOCK_N=block_n, BLOCK_D=block_d, num_warps=num_warps,
        SLOT_STATIC=bool(slot_static), QK=qk is not None, SQ_PARTS=parts, BLOCK_SQ=_next_power_of_2(parts),
        ROPE_TABLE=rope_table, **pdl)
    _decode_attention_combine_kernel[(n_heads,)](
        workspace, out, HEAD_DIM=head_dim, NUM_SPLITS=num_splits, BLOCK_S=_next_power_of_2(num_splits),
        BLOCK_D=block_d, num_warps=4, **pdl)
    return out


def decode_attention(q, key_cache, value_cache, slot, *, num_splits=None, workspace=None, out=None,
                     num_warps: int | None = None, slot_static: bool = False):
    """Triton: as `decode_attention_reference`, in two launches (splits, then their combination).

    `slot` is read on the device; a slot >= max_seq attends the whole cache. `num_splits` defaults to
    one split per `DEFAULT_CHUNK` cache slots, `num_warps` (per split program) to `DEFAULT_WARPS`.
    `workspace` (contiguous float32 [heads, num_splits, head_dim + 2]) and `out` (contiguous, shaped
    and typed like q) avoid allocation. `slot_static=True` promises that `slot` and the cache rows
    before it were written before the kernel launched just before this call started (they are the
    decode step's inputs; only q and the slot's row come from that kernel): with PDL the kernel then
    loads them while that kernel is still running.
    """
    check_decode_attention_args(q, key_cache, value_cache, slot)
    return _launch(q, key_cache, value_cache, slot, _output(q, out), num_splits, workspace, num_warps, slot_static)


def _check_square_sums(square_sums, qkv) -> None:
    if (square_sums.dtype != torch.float32 or not square_sums.is_contiguous() or square_sums.numel() < 2
            or square_sums.numel() % 2 or square_sums.device != qkv.device):
        raise ValueError(f"square_sums must be contiguous float32 [2, P] on {qkv.device} (P partial sums of "
                         f"squares each for q and k, as decode_gemv writes them), got {square_sums.dtype} "
                         f"{tuple(square_sums.shape)} on {square_sums.device}")


def decode_attention_qk_reference(qkv, square_sums, q_norm_w, k_norm_w, cos, sin, key_cache, value_cache, slot,
                                  n_heads: int, eps: float):
    """torch: `fused_kernels.qk_norm_rope_kv_reference` (q, and the slot's k and v written into the
    caches) then `decode_attention_reference`. It recomputes the norms' statistics from qkv; square_sums
    is only checked."""
    _check_square_sums(square_sums, qkv)
    q = qk_norm_rope_kv_reference(qkv, q_norm_w, k_norm_w, cos, sin, key_cache, value_cache, slot, n_heads, eps)
    return decode_attention_reference(q, key_cache, value_cache, slot)


def decode_attention_qk(qkv, square_sums, q_norm_w, k_norm_w, cos, sin, key_cache, value_cache, slot, n_heads: int,
                        eps: float, *, num_splits=None, workspace=None, out=None, num_warps: int | None = None,
                        slot_static: bool = False):
    """Triton: as `decode_attention_qk_reference`, in the two launches of `decode_attention`: the q/k
    norms, RoPE and the cache writes of `fused_kernels.fused_qk_norm_rope_kv` happen inside the split
    programs, one kernel boundary fewer per decode block.

    qkv is the token's q/k/v projection [1, 3 * d]; square_sums [2, P] holds partial sums of squares of
    its q (row 0) and k (row 1) parts, P of each, as `decode_gemv(square_sums=...)` writes them: every
    program adds them up (P floats each) instead of reducing d values, and forms its head's q; the program
    whose chunk holds the slot also forms the slot's k and writes k and v at the slot. cos/sin are tables
    [max_seq, head_dim] read at the slot (or one row). The norms' sums run in another order than the
    reference's, so an element may differ from it by an ulp. Other arguments as in `decode_attention`.
    """
    check_qk_norm_rope_kv_args(qkv, q_norm_w, k_norm_w, cos, sin, key_cache, value_cache, slot, n_heads)
    _check_square_sums(square_sums, qkv)
    out = _q_output(qkv, n_heads, out)
    qk = (square_sums, q_norm_w.contiguous(), k_norm_w.contiguous(), cos.contiguous(), sin.contiguous(), eps)
    return _launch(qkv.reshape(-1), key_cache, value_cache, slot, out, num_splits, workspace, num_warps, slot_static, qk)


def decode_attention_qk_auto(qkv, square_sums, q_norm_w, k_norm_w, cos, sin, key_cache, value_cache, slot,
                             n_heads: int, eps: float, *, impl: str = "auto", slot_static: bool = False):
    """impl "auto": triton on CUDA, reference elsewhere; "triton" / "reference" force one."""
    if _use_triton(impl, qkv):
        return decode_attention_qk(qkv, square_sums, q_norm_w, k_norm_w, cos, sin, key_cache, value_cache, slot,
                                   n_heads, eps, slot_static=slot_static)
    return decode_attention_qk_reference(qkv, square_sums, q_norm_w, k_norm_w, cos, sin, key_cache, value_cache, slot,
                                         n_heads, eps)


def decode_attention_auto(q, key_cache, value_cache, slot, *, impl: str = "auto", num_splits=None, workspace=None,
                          out=None, slot_static: bool = False):
    """impl "auto": triton on CUDA, reference elsewhere; "triton" / "reference" force one."""
    if _use_triton(impl, q):
        return decode_attention(q, key_cache, value_cache, slot, num_splits=num_splits, workspace=workspace, out=out,
                                slot_static=slot_static)
    ref = decode_attention_reference(q, key_cache, value_cache, slot)
    return ref if out is None else _output(q, out).copy_(ref)
