"""How much router probability the first k experts carry: why a checkpoint's width knob costs what it costs.

MolmoE routes each token with a softmax over all experts and keeps the top_k weights without
renormalising them, so a block at top_k = k adds the k heaviest experts' outputs at their full-softmax
weights. Where the router puts most of a token's mass on one expert, top-1 computes nearly what
top-8 does and the width knob is almost free in quality; where the mass is spread, the dropped
experts carry a real share. `router_mass` records the gate of every block while a model prefills
real requests at one configuration and reports, per block and over all blocks, the mean (over
tokens) of the mass in the k heaviest experts, for each k asked for. Since the kept weights scale
the experts' outputs, it also reports how large each block's MoE update is against the residual
stream it is added to (and the attention update's, for scale).

Neither says which experts the answers need: a small update can still be indispensable.
`expert_substitution` measures that directly, as task quality with each block's MoE update rebuilt
from some of its routed experts only (the heaviest, the r-th heaviest, a random one, none).
"""
from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np
import torch

from ..config import Config
from .moe_kernels import moe_reference


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


SUBSTITUTION_HELP = ("'top<k>' (the k heaviest experts at their weights, k <= the config's top_k), 'rank<r>' (only the "
                     "r-th heaviest, at the heaviest's weight), 'random' (one expert drawn per token, at the heaviest's "
                     "weight) or 'zero' (no MoE update)")


def _parse_substitution(name: str, top_k: int, n_experts: int) -> tuple[str, int]:
    match = re.fullmatch(r"(top|rank)(\d+)|random|zero", name)
    if match is None:
        raise ValueError(f"substitution {name!r} is not known; allowed: {SUBSTITUTION_HELP}")
    kind, number = (match.group(1), int(match.group(2))) if match.group(1) else (name, 0)
    if kind == "top" and not 1 <= number <= top_k:
        raise ValueError(f"substitution {name!r}: k must be in 1..{top_k} (the config's top_k)")
    if kind == "rank" and not 1 <= number <= n_experts:
        raise ValueError(f"substitution {name!r}: r must be in 1..{n_experts} (the model's experts)")
    return kind, number


def expert_substitution(vlm, samples: Sequence, config: Config, substitutions: Sequence[str],
                        seed: int = 0, batch_size: int = 64) -> dict:
    """Task quality of `samples` at `config` when every active block's routed MoE update is replaced.

    The router mass says how the probability is spread; this says which experts the answers need.
    Each substitution recomputes, in every block and at every prefill and decode step, the MoE
    update from the block's own router and experts (`moe_reference`), keeping only some of them:
    `top<k>` keeps the k heaviest at their weights (`top<config.top_k>` is the model itself),
    `rank<r>` only the r-th heaviest at the heaviest's weight (`rank1` is `top1`), `random` one
    expert drawn per token at the heaviest's weight, `zero` none. If `rank2` or `random` answer as
    badly as `zero` while `top1` answers nearly as well as the model, the heaviest expert does the
    work and top_k barely matters; if `top1` falls toward `zero`, the other experts carry a share.

    `vlm` must be on its plain path: the CPU, or CUDA loaded with `use_cuda_graphs=False,
    moe_impl="reference"` (a fused decode step reads the expert weights without running the
    module). Returns `{"config", "requests", "families", "substitutions": {name: {"mean",
    "per_family", "scores"}}}`, scores per request in `samples` order.
    """
    from ..evaluation import QualityEvaluator  # evaluation imports the runtime, which imports this package

    args = vlm.args
    parsed = {name: _parse_substitution(name, config.top_k, args.n_experts) for name in substitutions}
    if not parsed:
        raise ValueError("substitutions is empty: name at least one of " + SUBSTITUTION_HELP)
    if not samples:
        raise ValueError("samples is empty: the substitution needs at least one request")
    if getattr(vlm, "fused_decode", False) or getattr(vlm, "use_cuda_graphs", False):
        raise ValueError("vlm is on its fast CUDA path, whose decode steps read the expert weights without running "
                         "the MoE module; load it with use_cuda_graphs=False, moe_impl='reference'")
    blocks = vlm.module.transformer.blocks
    active = {"kind": None, "number": 0, "calls": 0}
    generator = torch.Generator().manual_seed(seed)

    def substitute(module, inputs, output):
        if active["kind"] is None:
            return output
        active["calls"] += 1
        kind, number = active["kind"], active["number"]
        if kind == "zero":
            return torch.zeros_like(output)
        # The module's own forward has already run and its output is discarded: twice the MoE work,
        # but the model's forward stays untouched (a diagnostic, not a serving path).
        x = inputs[0]
        h = module.ff_norm(x).reshape(-1, x.shape[-1])
        weights, ids = module.route(h, number if kind in ("top", "rank") else 1)  # heaviest first
        if kind == "rank":
            ids, weights = ids[:, number - 1:number], weights[:, :1]
        elif kind == "random":
            drawn = torch.randint(0, args.n_experts, (h.shape[0], 1), generator=generator)
            ids = drawn.to(ids.device)
        update = moe_reference(h, ids, weights.to(h.dtype), module.w_gate_up, module.w_down)
        return update.view_as(output)

    evaluator = QualityEvaluator(vlm, samples, batch_size=batch_size)
    families = np.array([s.family for s in samples])
    names = list(dict.fromkeys(families.tolist()))  # in order of first appearance
    handles = [block.mlp.register_forward_hook(substitute) for block in blocks]
    results = {}
    try:
        for name, (kind, number) in parsed.items():
            active.update(kind=kind, number=number, calls=0)
            scores = np.asarray(evaluator.scores(config), dtype=float)
            if active["calls"] == 0:
                raise RuntimeError("no MoE module ran as a module: the model is on a fused path that reads the "
                                   "expert weights directly; load it with use_cuda_graphs=False, moe_impl='reference'")
            results[name] = {"mean": float(scores.mean()),
                             "per_family": {f: float(scores[families == f].mean()) for f in names},
                             "scores": scores.tolist()}
    finally:
        for handle in handles:
            handle.remove()
    return {"config": [config.crops, config.top_k, config.active_blocks], "requests": len(samples),
            "families": names, "substitutions": results}
