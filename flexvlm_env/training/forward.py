"""Teacher-forced training loss at one knob setting, with a dense (all-experts) MoE.

`moe_dense` computes every expert and weights each by its routing probability where the expert is
in the token's top-k and by zero elsewhere: the same function as the sparse MoE (probabilities not
renormalised as in MolmoE, unless the model's `norm_topk_prob` says so), written as two large
matmuls. For narrow experts (micro: 64 x 16 hidden units) that is much faster to train than
gathering tokens per expert, and the router gets the gradient of the selected probabilities exactly
as in sparse training. Load-balancing (Switch / OLMoE) and router z-losses keep the 64 experts in
use; they are measured at the drawn top_k.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..model.decoder import renormalise_topk, rope_tables
from ..model.molmoe import MolmoE
from ..model.preprocess import IGNORE_INDEX


@torch.no_grad()
def init_for_training_(module: MolmoE, seed: int = 0) -> MolmoE:
    """Initialisation for training from scratch at narrow widths.

    Matrices are N(0, 1/fan_in), so activations keep unit scale through layers that have no norm
    after them (pooling, the SwiGLU projector); residual output projections are further scaled by
    1/sqrt(2 * depth) (GPT-2). The common N(0, 0.02) is tuned for d_model ~ 768-2048: at micro's
    widths it shrinks the vision features through the projector's product of two small terms
    (about 1e-5 against token embeddings of 0.02), the projector's gradient vanishes with them, and
    the model learns a text-only answer prior and stays there. Norm gains are 1, biases 0,
    embeddings N(0, 0.02) (every position is RMS-normalised before use)."""
    generator = torch.Generator(device="cpu").manual_seed(seed)
    depth = {"decoder": module.args.n_layers, "vit": module.args.vision.n_layers}
    for name, param in module.named_parameters():
        if param.dim() == 1 and ("norm" in name or "_ln" in name):
            param.fill_(1.0 if name.endswith("weight") else 0.0)
            continue
        if param.dim() == 1 and name.endswith("bias"):
            param.zero_()
            continue
        if name.endswith(("wte.embedding", "wte.new_embedding", "pad_embed", "class_embedding", "positional_embedding")):
            std = 0.02
        else:
            std = 1.0 / math.sqrt(param.shape[-1])
            if name.endswith(("attn_out.weight", "mlp.w_down")):
                std /= math.sqrt(2 * depth["decoder"])
            elif "image_vit" in name and name.endswith(("attention.wo.weight", "feed_forward.w2.weight")):
                std /= math.sqrt(2 * depth["vit"])
        values = torch.randn(param.shape, generator=generator, dtype=torch.float32) * std
        param.copy_(values.to(param.device, param.dtype))
    return module


def moe_dense(
    h: torch.Tensor, probs: torch.Tensor, top_k: int, w_gate_up: torch.Tensor, w_down: torch.Tensor, return_ids: bool = False,
    norm_topk_prob: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """h [N, d], router probabilities probs [N, E] (float32) -> MoE output [N, d] (see module doc);
    with `return_ids`, also the chosen experts [N, top_k] (for the balance loss: one top-k, not two).
    `norm_topk_prob` renormalises the kept probabilities as `MoE.route` does for such a model."""
    n, d = h.shape
    experts, two_hidden, _ = w_gate_up.shape
    hidden = two_hidden // 2
    weights, ids = torch.topk(probs, top_k, dim=-1)
    if norm_topk_prob:
        weights = renormalise_topk(weights)
    gates = torch.zeros_like(probs).scatter(-1, ids, weights).to(h.dtype)  # [N, E]
    gate_up = (h @ w_gate_up.reshape(experts * two_hidden, d).t()).view(n, experts, two_hidden)
    act = F.silu(gate_up[..., :hidden]) * gate_up[..., hidden:] * gates[..., None]
    out = act.reshape(n, experts * hidden) @ w_down.transpose(1, 2).reshape(experts * hidden, d)
    return (out, ids) if return_ids else out


def teacher_forced_loss(
    module: MolmoE,
    images: torch.Tensor,
    image_masks: torch.Tensor,
    input_ids: torch.Tensor,
    labels: torch.Tensor,
    feature_pos: torch.Tensor,
    feature_rows: torch.Tensor,
    plan: tuple[int, ...],
    top_k: int,
    pad_id: int,
    balance_coef: float = 0.01,
    z_coef: float = 0.001,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Mean next-token cross-entropy over answer tokens, plus the router losses.

    images [V, patches, patch_dim] and image_masks [V, patches] are every view of the batch;
    their pooled, projected features (rows in V-major order) are added to the token embeddings at
    `feature_pos` (flat positions in B*L) from rows `feature_rows`. Attention is causal over the
    right-padded batch (padding only follows real tokens, so it is never attended to). Returns
    (total loss, {"ce": per-token CE [B, L] (0 off-target), "balance", "z", "logits" [B, L, V] float32}).
    """
    vision = module.vision_backbone
    transformer = module.transformer
    batch, length = input_ids.shape
    features = vision.project(vision.encode(images, image_masks))
    embeds = transformer.wte(input_ids)
    d = embeds.shape[-1]
    flat = features.reshape(-1, d).index_select(0, feature_rows).to(embeds.dtype)
    x = embeds.reshape(batch * length, d).index_add(0, feature_pos, flat).view(batch, length, d)

    positions = torch.arange(length, device=x.device)[None]
    cos, sin = rope_tables(positions, transformer.args.head_dim, transformer.args.rope_theta)
    # Router statistics over real tokens only, as masked means (boolean indexing would make the
    # host wait for the device at every block).
    valid = (input_ids != pad_id).reshape(-1, 1).float()
    n_valid = valid.sum().clamp(min=1.0)
    balance = x.new_zeros((), dtype=torch.float32)
    z_loss = x.new_zeros((), dtype=torch.float32)
    n_experts = transformer.args.n_experts
    for i in plan:
        block = transformer.blocks[i]
        x = x + block.attn(x, cos, sin, None, None, None, False)
        h = block.mlp.ff_norm(x).reshape(batch * length, d)
        logits = block.mlp.gate(h).float()
        probs = torch.softmax(logits, dim=-1)
        out, ids = moe_dense(h, probs, top_k, block.mlp.w_gate_up, block.mlp.w_down, return_ids=True,
                             norm_topk_prob=block.mlp.norm_topk_prob)
        x = x + out.view(batch, length, d)
        # Switch-style balance: fraction of routed slots per expert times its mean probability.
        chosen = torch.zeros_like(probs).scatter(-1, ids, 1.0)
        fraction = (chosen * valid).sum(0) / (n_valid * top_k)
        mean_prob = (probs * valid).sum(0) / n_valid
        balance = balance + n_experts * (fraction * mean_prob).sum()
        z_loss = z_loss + (torch.logsumexp(logits, dim=-1).pow(2) * valid[:, 0]).sum() / n_valid
    hidden = transformer.ln_f(x)

    logits = module.lm_head(hidden).float()
    ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=IGNORE_INDEX, reduction="none").view(labels.shape)
    n_targets = (labels != IGNORE_INDEX).sum().clamp(min=1)
    n_blocks = len(plan)
    loss = ce.sum() / n_targets + balance_coef * balance / n_blocks + z_coef * z_loss / n_blocks
    return loss, {"ce": ce, "balance": balance.detach() / n_blocks, "z": z_loss.detach() / n_blocks, "logits": logits}


def answer_kl(logits: torch.Tensor, reference_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean over answer tokens (labels != IGNORE_INDEX) of KL(reference || model) between the
    next-token distributions: the anchor that keeps a fine-tuned model's answers on a frozen
    reference's (LoRA fine-tuning keeps the base's full-configuration behaviour with it)."""
    target = labels != IGNORE_INDEX
    log_p = torch.log_softmax(logits[target].float(), dim=-1)
    log_q = torch.log_softmax(reference_logits[target].float(), dim=-1)
    return F.kl_div(log_p, log_q, log_target=True, reduction="sum") / target.sum().clamp(min=1)
