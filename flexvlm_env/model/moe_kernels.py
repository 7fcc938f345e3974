"""Mixture-of-experts kernels: a torch reference (also the CPU path) and two Triton paths for CUDA.

The decoder blocks hold 64 SwiGLU experts and a softmax router whose top-k probabilities are used
as they are (no renormalisation), k being a per-request knob. Decode (one token) is memory-bound:
`moe_decode_triton` reads only the k chosen experts' weights, in place and once each, and does no
host synchronisation or data-dependent allocation so that it can be captured in a CUDA graph.
Prefill sorts token-expert pairs by expert into blocks of `block_m` rows (`align_block_size`) and
runs one grouped-GEMM kernel twice, vLLM-style: gate/up with silu(gate) * up fused into the
epilogue, then down with the routing probability multiplied in; the k rows of a token are summed last.

Weight layout (per block, as the model stores it): `w_gate_up` [E, 2H, d] (rows :H gate_proj, rows H:
up_proj, each an nn.Linear weight [out, in]) and `w_down` [E, d, H].
"""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .fused_kernels import pdl_enabled, pdl_launch_options

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the reference path still works
    triton = None
else:
    from .fused_kernels import _pdl_release, _pdl_wait


def check_moe_args(x, topk_ids, topk_weights, w_gate_up, w_down) -> None:
    """Raise a ValueError naming the argument, its shape or dtype and what is expected."""
    if w_gate_up.dim() != 3 or w_gate_up.shape[1] % 2:
        raise ValueError(f"w_gate_up must be [num_experts, 2*hidden, d_model], got {tuple(w_gate_up.shape)}")
    num_experts, two_hidden, d_model = w_gate_up.shape
    hidden = two_hidden // 2
    if tuple(w_down.shape) != (num_experts, d_model, hidden):
        raise ValueError(f"w_down must be [num_experts, d_model, hidden] = {(num_experts, d_model, hidden)} "
                         f"to match w_gate_up {tuple(w_gate_up.shape)}, got {tuple(w_down.shape)}")
    if x.dim() not in (1, 2) or x.shape[-1] != d_model:
        raise ValueError(f"x must be [num_tokens, {d_model}] (or [{d_model}] for one token), got {tuple(x.shape)}")
    num_tokens = 1 if x.dim() == 1 else x.shape[0]
    if topk_ids.dim() != 2 or topk_ids.shape[0] != num_tokens or not 1 <= topk_ids.shape[1] <= num_experts:
        raise ValueError(f"topk_ids must be [num_tokens={num_tokens}, top_k] with 1 <= top_k <= {num_experts}, "
                         f"got {tuple(topk_ids.shape)}")
    if topk_ids.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"topk_ids must be int32 or int64, got {topk_ids.dtype}")
    if tuple(topk_weights.shape) != tuple(topk_ids.shape) or not topk_weights.is_floating_point():
        raise ValueError(f"topk_weights must be a float tensor shaped like topk_ids {tuple(topk_ids.shape)}, "
                         f"got {topk_weights.dtype} {tuple(topk_weights.shape)}")
    devices = {t.device for t in (x, topk_ids, topk_weights, w_gate_up, w_down)}
    if len(devices) != 1:
        raise ValueError(f"x, topk_ids, topk_weights, w_gate_up and w_down must share one device, got {devices}")


def _check_triton_args(x, topk_ids, topk_weights, w_gate_up, w_down) -> None:
    check_moe_args(x, topk_ids, topk_weights, w_gate_up, w_down)
    if triton is None:
        raise RuntimeError("the triton MoE kernels need the 'triton' package (pip install flexvlm[fast])")
    if not x.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(f"the triton MoE kernels need CUDA tensors (or TRITON_INTERPRET=1 set before triton "
                         f"is imported), got x on {x.device}")
    if not (x.dtype == w_gate_up.dtype == w_down.dtype):
        raise ValueError(f"x, w_gate_up and w_down must share a dtype for the triton kernels, "
                         f"got {x.dtype}, {w_gate_up.dtype}, {w_down.dtype}")
    # A silent .contiguous() here would copy every expert's weights on each call.
    for name, w in (("w_gate_up", w_gate_up), ("w_down", w_down)):
        if w.stride(-1) != 1:
            raise ValueError(f"{name} must be contiguous along its last dim, got strides {w.stride()}")


# ---------------------------------------------------------------------------------------------------
# Reference / CPU path


def moe_reference(x, topk_ids, topk_weights, w_gate_up, w_down) -> torch.Tensor:
    """y[t] = sum_j p[t,j] * W_down[e] (silu(W_gate[e] x[t]) * W_up[e] x[t]), e = topk_ids[t,j].

    Accumulates in float32 (float64 if x is float64) and returns x's dtype and shape. One token
    gathers its k experts' weights for a batched matmul (no host sync); more tokens are grouped by
    expert, one matmul per active expert and projection. On CPU each is the faster of the two there.
    """
    check_moe_args(x, topk_ids, topk_weights, w_gate_up, w_down)
    x2d = x.reshape(-1, x.shape[-1])
    num_tokens, top_k = topk_ids.shape
    hidden = w_down.shape[2]
    acc_dtype = torch.promote_types(x.dtype, torch.float32)
    flat_weights = topk_weights.flatten().to(acc_dtype)
    if num_tokens == 1:
        ids = topk_ids[0].long()
        # Row-vector @ transposed weights: CPU matmul is several times slower the other way round.
        gate_up = w_gate_up.index_select(0, ids).to(acc_dtype) @ x2d[0].to(acc_dtype)
        h = F.silu(gate_up[:, :hidden]) * gate_up[:, hidden:] * flat_weights[:, None]
        out = torch.bmm(h[:, None, :], w_down.index_select(0, ids).to(acc_dtype).transpose(1, 2)).sum(dim=0)
        return out.to(x.dtype).reshape(x.shape)
    flat_ids = topk_ids.flatten()
    order = torch.argsort(flat_ids, stable=True)
    counts = torch.bincount(flat_ids, minlength=w_gate_up.shape[0]).tolist()
    out = torch.zeros(num_tokens, x.shape[-1], dtype=acc_dtype, device=x.device)
    start = 0
    for expert, count in enumerate(counts):
        if count == 0:
            continue
        pairs = order[start:start + count]
        start += count
        tokens = pairs // top_k
        gate_up = x2d.index_select(0, tokens).to(acc_dtype) @ w_gate_up[expert].to(acc_dtype).t()
        h = F.silu(gate_up[:, :hidden]) * gate_up[:, hidden:]
        y = (h @ w_down[expert].to(acc_dtype).t()) * flat_weights[pairs, None]
        out.index_add_(0, tokens, y)
    return out.to(x.dtype).reshape(x.shape)


# ---------------------------------------------------------------------------------------------------
# Decode: one token, gather-free


@dataclass(frozen=True)
class DecodeConfig:
    """Tile sizes of the two decode kernels (rows x contiguous columns of a weight tile)."""

    block_h: int = 8  # gate/up rows per program
    block_d: int = 256  # d_model columns per step of the gate/up kernel
    block_out: int = 8  # output rows (of d_model) per program of the down kernel
    block_hk: int = 1024  # hidden columns per step of the down kernel
    num_warps: int = 8
    down_warps: int | None = None  # warps of the down kernel; None: num_warps


# Tiles per card and top_k (the smallest listed k >= the request's), each kernel's best of a sweep
# at E=64, d=2048, H=1024 (bf16), 16 weight sets in a CUDA graph. H100: few experts need small row
# blocks to spread the reads over all SMs, more experts prefer bigger blocks. H200
# (scripts/bench_decode_kernels.py, results/bench_decode_kernels_h200.json): two rows per gate/up
# program at every k; gate/up at top_k 1 took 4.63 us against 5.96 with the H100's tile, 18.2 against
# 19.9 at top_k 8.
_DECODE_CONFIGS = {
    "H100": {
        2: DecodeConfig(block_h=4, block_d=1024, block_out=4, block_hk=1024, num_warps=4),
        4: DecodeConfig(block_h=8, block_d=256, block_out=8, block_hk=1024, num_warps=8),
        None: DecodeConfig(block_h=32, block_d=256, block_out=8, block_hk=1024, num_warps=8),
    },
    "H200": {
        1: DecodeConfig(block_h=2, block_d=2048, block_out=8, block_hk=1024, num_warps=4, down_warps=8),
        4: DecodeConfig(block_h=2, block_d=1024, block_out=2, block_hk=1024, num_warps=2, down_warps=4),
        None: DecodeConfig(block_h=2, block_d=1024, block_out=8, block_hk=1024, num_warps=2, down_warps=8),
    },
}


def default_decode_config(top_k: int, card: str = "H100") -> DecodeConfig:
    """The tiles measured best for `card` ("H100" or "H200"; other cards get the H100's) at top_k."""
    table = _DECODE_CONFIGS.get(card, _DECODE_CONFIGS["H100"])
    return next(config for k, config in table.items() if k is None or top_k <= k)


@functools.lru_cache(maxsize=None)
def card_of(device: torch.device) -> str:
    """"H200" for an H200 (by its name), otherwise "H100": the cards with measured tile tables."""
    return "H200" if device.type == "cuda" and "H200" in torch.cuda.get_device_name(device) else "H100"


if triton is not None:

    @triton.jit
    def _decode_gate_up_kernel(x_ptr, ids_ptr, weights_ptr, w_ptr, h_ptr, d_model, hidden,
                               stride_we, stride_wn, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
                               USE_PDL: tl.constexpr):
        # Program (slot, row block): h[slot, rows] = p * silu(W_gate[e] x) * (W_up[e] x), e = ids[slot].
        # Which weights to read is the previous kernel's (the router's) output: nothing to load early.
        # The down kernel is released only after the wait, so that it may read the ids before its own.
        _pdl_wait(USE_PDL)
        _pdl_release(USE_PDL)
        slot = tl.program_id(0)
        expert = tl.load(ids_ptr + slot).to(tl.int64)
        prob = tl.load(weights_ptr + slot).to(tl.float32)
        offs_h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
        mask_h = offs_h < hidden
        gate_ptrs = w_ptr + expert * stride_we + offs_h[:, None].to(tl.int64) * stride_wn
        up_ptrs = gate_ptrs + hidden * stride_wn
        # Elementwise accumulation, one reduction at the end: keeps the loop free of shuffles.
        acc_gate = tl.zeros([BLOCK_H, BLOCK_D], dtype=tl.float32)
        acc_up = tl.zeros([BLOCK_H, BLOCK_D], dtype=tl.float32)
        for d_start in range(0, d_model, BLOCK_D):
            offs_d = d_start + tl.arange(0, BLOCK_D)
            mask_d = offs_d < d_model
            x = tl.load(x_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)
            mask = mask_h[:, None] & mask_d[None, :]
            # Weights are streamed once per token: don't let them push x and h out of L2.
            w_gate = tl.load(gate_ptrs + offs_d[None, :], mask=mask, other=0.0, eviction_policy="evict_first")
            w_up = tl.load(up_ptrs + offs_d[None, :], mask=mask, other=0.0, eviction_policy="evict_first")
            acc_gate += w_gate.to(tl.float32) * x[None, :]
            acc_up += w_up.to(tl.float32) * x[None, :]
        gate = tl.sum(acc_gate, axis=1)
        up = tl.sum(acc_up, axis=1)
        h = gate * tl.sigmoid(gate) * up * prob
        tl.store(h_ptr + slot * hidden + offs_h, h, mask=mask_h)

    @triton.jit
    def _down_chunks(acc, h_ptr, row_ptrs, mask_out, slot, start, hidden, BLOCK_HK: tl.constexpr):
        """acc += the slot's weight rows times its h, over hidden columns [start, hidden)."""
        for h_start in range(start, hidden, BLOCK_HK):
            offs_h = h_start + tl.arange(0, BLOCK_HK)
            mask_h = offs_h < hidden
            h = tl.load(h_ptr + slot * hidden + offs_h, mask=mask_h, other=0.0)
            w = tl.load(row_ptrs + offs_h[None, :], mask=mask_out[:, None] & mask_h[None, :], other=0.0,
                        eviction_policy="evict_first")
            acc += w.to(tl.float32) * h[None, :]
        return acc

    @triton.jit
    def _decode_down_kernel(h_ptr, ids_ptr, w_ptr, out_ptr, d_model, hidden, stride_we, stride_wn,
                            TOP_K: tl.constexpr, BLOCK_OUT: tl.constexpr, BLOCK_HK: tl.constexpr,
                            USE_PDL: tl.constexpr):
        # Program (row block): y[rows] = sum_slot W_down[ids[slot]][rows] @ h[slot] (p is already in h).
        _pdl_release(USE_PDL)
        offs_out = tl.program_id(0) * BLOCK_OUT + tl.arange(0, BLOCK_OUT)
        mask_out = offs_out < d_model
        # The ids come from the router, two kernels back: the gate/up kernel releases this one only once
        # the router has finished (PDL), so the first slot's first weight tile is loaded before the wait,
        # while gate/up still runs. ".cg": read from L2, where the router's writes are.
        expert = tl.load(ids_ptr, cache_modifier=".cg").to(tl.int64)
        row_ptrs = w_ptr + expert * stride_we + offs_out[:, None].to(tl.int64) * stride_wn
        offs_h = tl.arange(0, BLOCK_HK)
        mask_h = offs_h < hidden
        w = tl.load(row_ptrs + offs_h[None, :], mask=mask_out[:, None] & mask_h[None, :], other=0.0,
                    eviction_policy="evict_first")
        _pdl_wait(USE_PDL)
        h = tl.load(h_ptr + offs_h, mask=mask_h, other=0.0)
        acc = w.to(tl.float32) * h[None, :]
        acc = _down_chunks(acc, h_ptr, row_ptrs, mask_out, 0, BLOCK_HK, hidden, BLOCK_HK)
        for slot in range(1, TOP_K):
            expert = tl.load(ids_ptr + slot).to(tl.int64)
            row_ptrs = w_ptr + expert * stride_we + offs_out[:, None].to(tl.int64) * stride_wn
            acc = _down_chunks(acc, h_ptr, row_ptrs, mask_out, slot, 0, hidden, BLOCK_HK)
        tl.store(out_ptr + offs_out, tl.sum(acc, axis=1).to(out_ptr.dtype.element_ty), mask=mask_out)


def moe_decode_triton(x, topk_ids, topk_weights, w_gate_up, w_down, *, out=None, workspace=None,
                      config: DecodeConfig | None = None) -> torch.Tensor:
    """One token ([d] or [1, d]); reads only the chosen experts' weights, each once, in place.

    No host sync and no allocation when `out` (shaped like x) and `workspace` (float32, >= top_k *
    hidden elements) are given, so a graph can capture it; ids and weights are read on the device, so
    writing new ids into the captured `topk_ids` changes the experts on replay. Ids must be in range:
    they are not checked (that would need a sync).
    """
    _check_triton_args(x, topk_ids, topk_weights, w_gate_up, w_down)
    if topk_ids.shape[0] != 1:
        raise ValueError(f"moe_decode_triton takes one token, got topk_ids {tuple(topk_ids.shape)}")
    num_experts, two_hidden, d_model = w_gate_up.shape
    hidden, top_k = two_hidden // 2, topk_ids.shape[1]
    config = config or default_decode_config(top_k, card_of(x.device))
    if out is None:
        out = torch.empty_like(x)
    elif out.shape != x.shape or out.dtype != x.dtype or not out.is_contiguous():
        raise ValueError(f"out must be contiguous {x.dtype} {tuple(x.shape)}, got {out.dtype} {tuple(out.shape)}")
    if workspace is None:
        workspace = torch.empty(top_k, hidden, dtype=torch.float32, device=x.device)
    elif workspace.dtype != torch.float32 or workspace.numel() < top_k * hidden or not workspace.is_contiguous():
        raise ValueError(f"workspace must be contiguous float32 with >= top_k*hidden = {top_k * hidden} "
                         f"elements, got {workspace.dtype} {tuple(workspace.shape)}")
    x, topk_ids, topk_weights = x.contiguous(), topk_ids.contiguous(), topk_weights.contiguous()
    launch_decode_gate_up(x, topk_ids, topk_weights, w_gate_up, workspace, config)
    launch_decode_down(workspace, topk_ids, w_down, out, config)
    return out


def launch_decode_gate_up(x, topk_ids, topk_weights, w_gate_up, workspace, config: DecodeConfig) -> None:
    """The first decode kernel alone (no checks): workspace[slot, :H] = p * silu(gate) * up of the
    token through expert topk_ids[0, slot]. `moe_decode_triton` and the tile benchmark call it."""
    top_k, (_, two_hidden, d_model) = topk_ids.shape[1], w_gate_up.shape
    hidden = two_hidden // 2
    _decode_gate_up_kernel[(top_k, triton.cdiv(hidden, config.block_h))](
        x, topk_ids, topk_weights, w_gate_up, workspace, d_model, hidden,
        w_gate_up.stride(0), w_gate_up.stride(1),
        BLOCK_H=config.block_h, BLOCK_D=config.block_d, num_warps=config.num_warps,
        **pdl_launch_options(pdl_enabled(x)))


def launch_decode_down(workspace, topk_ids, w_down, out, config: DecodeConfig) -> None:
    """The second decode kernel alone (no checks): out = sum over slots of W_down[ids[slot]] @ workspace[slot].

    With PDL it reads topk_ids[0, 0] before waiting for the kernel launched just before it: the ids must
    have been written before that kernel stopped waiting itself, as they are after
    `launch_decode_gate_up`, which releases its dependants only after its own wait."""
    top_k, (_, d_model, hidden) = topk_ids.shape[1], w_down.shape
    _decode_down_kernel[(triton.cdiv(d_model, config.block_out),)](
        workspace, topk_ids, w_down, out, d_model, hidden, w_down.stride(0), w_down.stride(1),
        TOP_K=top_k, BLOCK_OUT=config.block_out, BLOCK_HK=config.block_hk,
        num_warps=config.down_warps or config.num_warps, **pdl_launch_options(pdl_enabled(out)))


# ---------------------------------------------------------------------------------------------------
# Prefill: sorted by expert, grouped GEMMs


@dataclass(frozen=True)
class PrefillConfig:
    """Tiles of the grouped GEMM; block_m is also the padding unit of `align_block_size`."""

    block_m: int = 64
    block_n: int = 64
    block_k: int = 64
    num_warps: int = 4
    num_stages: int = 3


# Tiles per card and pairs per expert (the smallest listed bound >= the request's). H100: picked from a
# sweep at E=64, d=2048, H=1024, k=8 (bf16). Up to T ~ 1500 the weights dominate the traffic: bigger
# row blocks re-read each expert less often, smaller ones pad less. H200: the H100's without the
# 16-row tile. Measured in the whole model's prefill (MolmoE-1B, 16 blocks, results/device/session12/
# call3_*), 16-row blocks lost at every 6-16 pairs per expert: top_k 2 at 512 tokens 6.14 ms against
# 5.40 with 64-row blocks, top_k 1 at 1024 tokens 7.28 against 6.51, top_k 1 at 384 4.57 against 4.35
# (no point of the grid's prompts has fewer pairs per expert). The H100 stage table shows the same
# steps (top_k 2: 6.69 ms at 512 tokens, 6.11 at 576) but keeps its tile until measured there. Above 96
# pairs per expert (top_k 8 from ~800 tokens) the H200 takes 128 x 128 x 64 tiles with 3 stages: in the
# whole prefill, same host, two rounds each (results/device/session13/call1_*), 12.53 ms against 12.64
# at 1216 tokens, 13.10 against 13.43 at 1344, 10.19 against 10.39 at 832 (4 stages: 12.88-12.91,
# 13.54-13.55, 10.43-10.46; 64-row blocks 12.82-12.87 at 1216; top_k 4, below the bound, unchanged).
_PREFILL_CONFIGS = {
    "H100": {
        16: PrefillConfig(block_m=16, block_n=64, block_k=64, num_warps=4, num_stages=3),
        96: PrefillConfig(block_m=64, block_n=128, block_k=64, num_warps=8, num_stages=4),
        None: PrefillConfig(block_m=128, block_n=64, block_k=64, num_warps=8, num_stages=3),
    },
    "H200": {
        96: PrefillConfig(block_m=64, block_n=128, block_k=64, num_warps=8, num_stages=4),
        None: PrefillConfig(block_m=128, block_n=128, block_k=64, num_warps=8, num_stages=3),
    },
}


def default_prefill_config(num_pairs: int, num_experts: int, element_bytes: int = 2, card: str = "H100") -> PrefillConfig:
    """The tiles measured best for `card` ("H100" or "H200"; other cards get the H100's) at this many
    (token, expert) pairs per expert."""
    pairs_per_expert = num_pairs / num_experts
    table = _PREFILL_CONFIGS.get(card, _PREFILL_CONFIGS["H100"])
    config = next(c for bound, c in table.items() if bound is None or pairs_per_expert <= bound)
    if element_bytes > 2:
        # float32 tiles take twice the shared memory per stage: the bf16 tiles at 4 stages need
        # 320 KB where an H100 SM has 227 KB. Halve the K tile and keep two stages.
        config = PrefillConfig(config.block_m, config.block_n, 32, config.num_warps, 2)
    return config


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def align_block_size(topk_ids: torch.Tensor, block_m: int, num_experts: int):
    """Sort token-expert pairs by expert and pad each expert's run to a multiple of block_m.

    Returns (sorted_pair_ids [max_padded] int32: pair index t*k+j, or num_pairs as padding;
    expert_ids [max_padded // block_m] int32: the expert of each block; num_pairs_padded [1] int32).
    Sizes are upper bounds known on the host, values stay on the device: no sync, graph-safe.
    """
    flat_ids = topk_ids.flatten().long()
    num_pairs = flat_ids.numel()
    # scatter_add rather than bincount: bincount on CUDA syncs to size its output.
    counts = torch.zeros(num_experts, dtype=torch.long, device=flat_ids.device)
    counts.scatter_add_(0, flat_ids, torch.ones_like(flat_ids))
    padded = (counts + block_m - 1) // block_m * block_m
    padded_end = padded.cumsum(0)
    # Sorted on the narrowest key that holds every expert id: a radix sort makes one pass per key byte
    # (int64 ids: 8 passes, 44 us for 9,728 pairs on an H200; uint8: one). The order is the same.
    keys = flat_ids.to(torch.uint8 if num_experts <= 256 else torch.int32)
    sorted_keys, order = torch.sort(keys, stable=True)
    sorted_experts = sorted_keys.long()
    rank_in_expert = torch.arange(num_pairs, device=flat_ids.device) - (counts.cumsum(0) - counts)[sorted_experts]
    dest = (padded_end - padded)[sorted_experts] + rank_in_expert
    max_padded = _cdiv(num_pairs + min(num_experts, num_pairs) * (block_m - 1), block_m) * block_m
    sorted_pair_ids = torch.full((max_padded,), num_pairs, dtype=torch.int32, device=flat_ids.device)
    sorted_pair_ids.scatter_(0, dest, order.to(torch.int32))
    block_starts = torch.arange(0, max_padded, block_m, device=flat_ids.device)
    # Blocks past the end get id num_experts; the kernel never reads them (it stops at num_pairs_padded).
    expert_ids = torch.searchsorted(padded_end, block_starts, right=True).to(torch.int32)
    return sorted_pair_ids, expert_ids, padded_end[-1:].to(torch.int32)


if triton is not None:

    @triton.jit
    def _grouped_gemm_kernel(
        a_ptr, b_ptr, c_ptr, weights_ptr, sorted_pair_ids_ptr, expert_ids_ptr, num_pairs_padded_ptr,
        N, K, num_pairs, pairs_per_a_row,
        stride_am, stride_be, stride_bn, stride_cm,
        FUSE_SILU_MUL: tl.constexpr, MUL_ROUTED_WEIGHT: tl.constexpr, DOT_PRECISION: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    ):
        """C[pair, n] = A[pair // pairs_per_a_row] @ B[expert(pair)][n]^T for the pairs of one block.

        With FUSE_SILU_MUL, B holds 2N rows (gate then up) and C = silu(A B[:N]^T) * (A B[N:]^T).
        With MUL_ROUTED_WEIGHT, C is scaled by the pair's routing probability.
        """
        # n fastest: the programs running together share the block's A rows and its expert's weights.
        pid_n = tl.program_id(0)
        pid_m = tl.program_id(1)
        if pid_m * BLOCK_M >= tl.load(num_pairs_padded_ptr):
            return
        pair_ids = tl.load(sorted_pair_ids_ptr + pid_m * BLOCK_M + tl.arange(0, BLOCK_M))
        pair_mask = pair_ids < num_pairs
        a_rows = (pair_ids // pairs_per_a_row).to(tl.int64)
        expert = tl.load(expert_ids_ptr + pid_m).to(tl.int64)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_n = offs_n < N
        offs_k = tl.arange(0, BLOCK_K)
        a_ptrs = a_ptr + a_rows[:, None] * stride_am + offs_k[None, :]
        # B tiles are read transposed ([BLOCK_K, BLOCK_N]) from the [out, in] nn.Linear layout.
        b_ptrs = b_ptr + expert * stride_be + offs_n[None, :].to(tl.int64) * stride_bn + offs_k[:, None]
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        if FUSE_SILU_MUL:
            acc_up = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for k_start in range(0, K, BLOCK_K):
            mask_k = offs_k < K - k_start
            a = tl.load(a_ptrs, mask=pair_mask[:, None] & mask_k[None, :], other=0.0)
            b = tl.load(b_ptrs, mask=mask_k[:, None] & mask_n[None, :], other=0.0)
            acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
            if FUSE_SILU_MUL:
                b_up = tl.load(b_ptrs + N * stride_bn, mask=mask_k[:, None] & mask_n[None, :], other=0.0)
                acc_up = tl.dot(a, b_up, acc_up, input_precision=DOT_PRECISION)
            a_ptrs += BLOCK_K
            b_ptrs += BLOCK_K
        if FUSE_SILU_MUL:
            acc = acc * tl.sigmoid(acc) * acc_up
        if MUL_ROUTED_WEIGHT:
            acc = acc * tl.load(weights_ptr + pair_ids, mask=pair_mask, other=0.0).to(tl.float32)[:, None]
        c_ptrs = c_ptr + pair_ids[:, None].to(tl.int64) * stride_cm + offs_n[None, :]
        tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=pair_mask[:, None] & mask_n[None, :])


def _grouped_gemm(a, b, c, topk_weights, sorted_pair_ids, expert_ids, num_pairs_padded, pairs_per_a_row,
                  *, fuse_silu_mul: bool, mul_routed_weight: bool, config: PrefillConfig) -> None:
    n_out, k_in = c.shape[1], a.shape[1]
    grid = (triton.cdiv(n_out, config.block_n), expert_ids.numel())
    _grouped_gemm_kernel[grid](
        a, b, c, topk_weights, sorted_pair_ids, expert_ids, num_pairs_padded,
        n_out, k_in, c.shape[0], pairs_per_a_row,
        a.stride(0), b.stride(0), b.stride(1), c.stride(0),
        FUSE_SILU_MUL=fuse_silu_mul, MUL_ROUTED_WEIGHT=mul_routed_weight,
        # float32 models (the quality path) get true float32 products, not TF32's 10-bit mantissa.
        DOT_PRECISION="ieee" if a.dtype == torch.float32 else "tf32",
        BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_K=config.block_k,
        num_warps=config.num_warps, num_stages=config.num_stages)


def moe_prefill_triton(x, topk_ids, topk_weights, w_gate_up, w_down, *,
                       config: PrefillConfig | None = None) -> torch.Tensor:
    """Many tokens [T, d]: grouped GEMMs over pairs sorted by expert; intermediates in x's dtype."""
    _check_triton_args(x, topk_ids, topk_weights, w_gate_up, w_down)
    num_experts, two_hidden, d_model = w_gate_up.shape
    hidden = two_hidden // 2
    num_tokens, top_k = topk_ids.shape
    num_pairs = num_tokens * top_k
    config = config or default_prefill_config(num_pairs, num_experts, x.element_size(), card_of(x.device))
    x2d = x.reshape(num_tokens, d_model).contiguous()
    flat_weights = topk_weights.flatten().contiguous()
    sorted_pair_ids, expert_ids, num_pairs_padded = align_block_size(topk_ids, config.block_m, num_experts)
    h = torch.empty(num_pairs, hidden, dtype=x.dtype, device=x.device)
    _grouped_gemm(x2d, w_gate_up, h, flat_weights, sorted_pair_ids, expert_ids, num_pairs_padded, top_k,
                  fuse_silu_mul=True, mul_routed_weight=False, config=config)
    y_pairs = torch.empty(num_pairs, d_model, dtype=x.dtype, device=x.device)
    _grouped_gemm(h, w_down, y_pairs, flat_weights, sorted_pair_ids, expert_ids, num_pairs_padded, 1,
                  fuse_silu_mul=False, mul_routed_weight=True, config=config)
    # Pairs are stored at t*k+j, so a token's k rows are adjacent; torch sums bf16 in float32.
    return y_pairs.view(num_tokens, top_k, d_model).sum(dim=1).reshape(x.shape)


# ---------------------------------------------------------------------------------------------------


def moe_forward(x, topk_ids, topk_weights, w_gate_up, w_down, *, impl: str = "auto") -> torch.Tensor:
    """impl "auto": triton decode for one token on CUDA, triton prefill for more, reference elsewhere;
    "triton" forces the triton path for the token count; "reference" the torch one."""
    if impl not in ("auto", "triton", "reference"):
        raise ValueError(f"impl must be 'auto', 'triton' or 'reference', got {impl!r}")
    use_triton = impl == "triton" or (impl == "auto" and x.is_cuda and triton is not None)
    if not use_triton:
        return moe_reference(x, topk_ids, topk_weights, w_gate_up, w_down)
    if topk_ids.shape[0] == 1:
        return moe_decode_triton(x, topk_ids, topk_weights, w_gate_up, w_down)
    return moe_prefill_triton(x, topk_ids, topk_weights, w_gate_up, w_down)
