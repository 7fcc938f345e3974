"""Session 13 experiment: VARIANT base (session 12's engine: torch's three-kernel quick_gelu, int64 sort
keys, the 128x64 H200 prefill tile, the plain prefill q/k norm + RoPE + cache writes), new (the working
tree) or nofp (the working tree without the fused prefill q/k norm + RoPE), in the whole model's stage timings.
Usage: python ab.py VARIANT <flexvlm-profile args...>."""
import sys

import torch

import flexvlm_env.model.decoder as decoder
import flexvlm_env.model.moe_kernels as mk
import flexvlm_env.model.vision as vision
from flexvlm_env.profiles.cli import main


def align_block_size_int64(topk_ids, block_m, num_experts):
    flat_ids = topk_ids.flatten().long()
    num_pairs = flat_ids.numel()
    counts = torch.zeros(num_experts, dtype=torch.long, device=flat_ids.device)
    counts.scatter_add_(0, flat_ids, torch.ones_like(flat_ids))
    padded = (counts + block_m - 1) // block_m * block_m
    padded_end = padded.cumsum(0)
    sorted_experts, order = torch.sort(flat_ids, stable=True)
    rank_in_expert = torch.arange(num_pairs, device=flat_ids.device) - (counts.cumsum(0) - counts)[sorted_experts]
    dest = (padded_end - padded)[sorted_experts] + rank_in_expert
    max_padded = mk._cdiv(num_pairs + min(num_experts, num_pairs) * (block_m - 1), block_m) * block_m
    sorted_pair_ids = torch.full((max_padded,), num_pairs, dtype=torch.int32, device=flat_ids.device)
    sorted_pair_ids.scatter_(0, dest, order.to(torch.int32))
    block_starts = torch.arange(0, max_padded, block_m, device=flat_ids.device)
    expert_ids = torch.searchsorted(padded_end, block_starts, right=True).to(torch.int32)
    return sorted_pair_ids, expert_ids, padded_end[-1:].to(torch.int32)


variant = sys.argv[1].rstrip("0123456789")
if variant == "base":
    vision.quick_gelu_auto = lambda h, impl="auto": h * torch.sigmoid(1.702 * h)
    mk.align_block_size = align_block_size_int64
    mk._PREFILL_CONFIGS["H200"][None] = mk.PrefillConfig(128, 64, 64, 8, 3)
    decoder.fused_prefill_ok = lambda qkv: False
elif variant == "nofp":
    decoder.fused_prefill_ok = lambda qkv: False
elif variant != "new":
    raise SystemExit(f"unknown variant {sys.argv[1]}")
main(sys.argv[2:])
