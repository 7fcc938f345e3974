"""How much router probability the first k experts carry: why a checkpoint's width knob costs what it costs.

MolmoE routes each token with a softmax over all experts and keeps the top_k weights without
renormalising them, so a block at top_k = k adds the k heaviest experts' outputs at their full-softmax
weights. Where the router puts most of a token's mass on one expert, top-1 computes nearly what
top-8 does and the width knob is almost free in quality; where the mass is spread, the dropped
experts carry a real share. `router_mass` records the gate of every block while a model prefills
real requests at one configuration and reports, per block and over all blocks, the mean (over
tokens) of the mass in the k heaviest experts, for each k asked for. Since the kept weights scale
the experts' outputs, it also reports how large each block's MoE update is against the residual
stream it is added to (and the attention update's, for scale): a small router mass and a small
MoE update mean the experts carry little of what the model computes, and no width setting can
cost much.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from ..config import Config


def router_mass(vlm, samples: Sequence, config: Config | None = None, ks: Sequence[int] = (1, 2, 4, 8)) -> dict:
    """Per block and over all blocks: mean over prefill tokens of the router mass in the top-k experts.

    `vlm` is a `flexvlm_env.model.runtime.VLM` on its plain path (the gate runs as a module, so a
    forward hook sees its logits); `samples` are task samples (`.image`, `.prompt`). Each sample is
    prefilled at batch 1 (one generated token), so no padding enters the statistics. Returns
    `{"ks", "tokens", "per_block": {block: {"top_k_mass": [...], "tokens", "attn_update_ratio",
    "moe_update_ratio"}}, "mean_top_k_mass": [...], "median_attn_update_ratio", "median_moe_update_ratio"}`:
    an update ratio is the mean over tokens of ||update|| / ||residual stream entering the sublayer||
    (at the config's top_k); `mean_top_k_mass` weighs every block alike, the update ratios are
    medians over blocks.
    """
    ks = [int(k) for k in ks]
    n_experts = vlm.args.n_experts
    if not ks or any(not 1 <= k <= n_experts for k in ks) or list(ks) != sorted(set(ks)):
        raise ValueError(f"ks={ks}: must be increasing values in 1..{n_experts} (the model's experts)")
    if not samples:
        raise ValueError("samples is empty: the router mass needs at least one request")
    blocks = vlm.module.transformer.blocks
    sums = np.zeros((len(blocks), len(ks)))
    counts = np.zeros(len(blocks), dtype=np.int64)
    # Per block: summed per-token ||update|| / ||residual it is added to||, for attention and MoE,
    # each over the tokens its own hook saw (a fused decode step can skip some of the modules).
    update_sums = {"attn": np.zeros(len(blocks)), "moe": np.zeros(len(blocks))}
    update_counts = {"attn": np.zeros(len(blocks), dtype=np.int64), "moe": np.zeros(len(blocks), dtype=np.int64)}

    def hook(index):
        def record(_module, _inputs, logits):
            probs = torch.softmax(logits.detach().float().reshape(-1, logits.shape[-1]), dim=-1)
            cumulative = probs.topk(ks[-1], dim=-1).values.cumsum(dim=-1)  # topk sorts, heaviest first
            sums[index] += cumulative[:, [k - 1 for k in ks]].sum(dim=0).double().cpu().numpy()
            counts[index] += probs.shape[0]
        return record

    def update_hook(index, kind):
        def record(_module, inputs, update):
            residual = inputs[0].detach().float().reshape(-1, inputs[0].shape[-1])
            ratio = update.detach().float().reshape(residual.shape).norm(dim=-1) / residual.norm(dim=-1).clamp_min(1e-12)
            update_sums[kind][index] += float(ratio.sum())
            update_counts[kind][index] += ratio.numel()
        return record

    handles = [block.mlp.gate.register_forward_hook(hook(i)) for i, block in enumerate(blocks)]
    handles += [block.attn.register_forward_hook(update_hook(i, "attn")) for i, block in enumerate(blocks)]
    handles += [block.mlp.register_forward_hook(update_hook(i, "moe")) for i, block in enumerate(blocks)]
    try:
        with torch.inference_mode():
            for sample in samples:
                # One decode step runs the blocks once more on one token; prefill dominates the counts.
                vlm.generate(sample.image, sample.prompt, config, max_new_tokens=1, timing=False)
    finally:
        for handle in handles:
            handle.remove()
    ran = (counts > 0) & (update_counts["attn"] > 0) & (update_counts["moe"] > 0)
    if not ran.any():
        raise RuntimeError("no block ran its gate, attention and MoE as modules: the model is on a fused path "
                           "that reads their weights directly; run it on the CPU (as scripts/router_mass.py does)")
    per_block = {int(i): {"top_k_mass": (sums[i] / counts[i]).tolist(), "tokens": int(counts[i]),
                          "attn_update_ratio": float(update_sums["attn"][i] / update_counts["attn"][i]),
                          "moe_update_ratio": float(update_sums["moe"][i] / update_counts["moe"][i])}
                 for i in np.flatnonzero(ran)}
    mean = np.mean([v["top_k_mass"] for v in per_block.values()], axis=0)
    return {"ks": ks, "tokens": int(counts.max()), "per_block": per_block, "mean_top_k_mass": mean.tolist(),
            # Medians over blocks: block 0's residual is the bare embedding, so its updates are
            # several times its input (about 3x for attention in micro) and would dominate a mean.
            "median_attn_update_ratio": float(np.median([v["attn_update_ratio"] for v in per_block.values()])),
            "median_moe_update_ratio": float(np.median([v["moe_update_ratio"] for v in per_block.values()]))}
