"""OLMoE-style decoder: q/k-normed attention with RoPE, a 64-expert MoE per block, static KV cache.

Parameter names follow the official MolmoE checkpoint (`model.transformer.*`), except that each
block's experts are stored stacked (`mlp.w_gate_up` [E, 2H, d], `mlp.w_down` [E, d, H]) so the MoE
kernels can index them; `checkpoint.py` maps the per-expert names. Two knobs act here: `top_k`
(experts per token, per block) and the block plan (which blocks run; the rest are the identity and
never touch their KV cache).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .args import ModelArgs
from . import fused_kernels
from .fused_kernels import embedding_reference, fused_qk_norm_rope_prefill
from .moe_kernels import moe_forward


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # One fused kernel; it accumulates the statistics in float32 whatever x's dtype, as the
        # reference does (the fixture pins the float32 result).
        return F.rms_norm(x, (x.shape[-1],), self.weight.to(x.dtype), self.eps)


def fused_prefill_ok(qkv: torch.Tensor) -> bool:
    """Whether a prefill's attention takes `fused_qk_norm_rope_prefill`: on CUDA with Triton, for widths
    one program holds, unless autograd needs the result (the kernel has no backward); CPU, training and
    wider models keep the plain ops."""
    return (qkv.is_cuda and fused_kernels.triton is not None and qkv.shape[-1] // 3 <= fused_kernels.MAX_D
            and not (torch.is_grad_enabled() and qkv.requires_grad))


def rope_tables(positions: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin [..., head_dim] for integer positions, float32, rotate-half layout."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim))
    angles = positions.to(torch.float32)[..., None] * inv_freq
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [..., B, heads, T, hd]; cos/sin [B, T, hd] (float32, as MolmoE computes RoPE)."""
    xf = x.float()
    half = xf.shape[-1] // 2
    rotated = torch.cat([-xf[..., half:], xf[..., :half]], dim=-1)
    return (xf * cos[:, None] + rotated * sin[:, None]).to(x.dtype)


@dataclass
class KVCache:
    """Static per-block key/value buffers [B, heads, max_seq, head_dim]; skipped blocks stay unused.

    It also holds the decode step's other static state: the arrival counter of the one-launch router
    (`fused_kernels.router_topk`) and of the greedy argmax (`fused_kernels.greedy_token`), which each
    launch uses in turn and leaves at zero, and the RoPE tables of every slot ([max_seq, head_dim],
    `rope_tables` of positions 0..max_seq-1, elementwise the same values as computed per token), which
    the fused decode step reads at the slot instead of computing the token's row with ~10 launches.
    """

    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    arrival_counter: torch.Tensor
    rope_cos: torch.Tensor
    rope_sin: torch.Tensor

    @classmethod
    def allocate(cls, args: ModelArgs, batch: int, max_seq: int, device, dtype) -> "KVCache":
        from .fused_kernels import new_arrival_counter

        shape = (batch, args.n_heads, max_seq, args.head_dim)
        cos, sin = rope_tables(torch.arange(max_seq, device=device), args.head_dim, args.rope_theta)
        return cls(
            [torch.zeros(shape, device=device, dtype=dtype) for _ in range(args.n_layers)],
            [torch.zeros(shape, device=device, dtype=dtype) for _ in range(args.n_layers)],
            new_arrival_counter(device),
            cos,
            sin,
        )

    @property
    def max_seq(self) -> int:
        return self.keys[0].shape[2]


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.n_heads, self.head_dim = args.n_heads, args.head_dim
        self.attn_norm = RMSNorm(args.d_model, args.norm_eps)
        self.att_proj = nn.Linear(args.d_model, 3 * args.d_model, bias=False)
        self.q_norm = RMSNorm(args.d_model, args.norm_eps)
        self.k_norm = RMSNorm(args.d_model, args.norm_eps)
        self.attn_out = nn.Linear(args.d_model, args.d_model, bias=False)

    def forward(self, x, cos, sin, cache_kv, cache_index, mask, attend_cache: bool, cache_len: int | None = None):
        """x [B, T, d]. With a cache, new keys/values are written at slots `cache_index` [T].

        `attend_cache` (decode): attend over the static buffer under `mask` [B, 1, T, S], or, when
        `cache_len` is given (eager path, one query), over its first `cache_len` slots unmasked.
        Otherwise (prefill from slot 0): attend over x's own keys, causally or under `mask` [B, 1, T, T].
        """
        b, t, d = x.shape
        qkv = self.att_proj(self.attn_norm(x))
        if cache_kv is not None and not attend_cache and mask is None and b == 1 and fused_prefill_ok(qkv):
            # Prefill on CUDA: the norms, RoPE and the cache writes in one kernel, which also lays q/k/v out
            # contiguously for the attention (fused_kernels.fused_qk_norm_rope_prefill).
            q, k, v = fused_qk_norm_rope_prefill(qkv, self.q_norm.weight, self.k_norm.weight, cos, sin, *cache_kv,
                                                 cache_index, self.n_heads, self.q_norm.eps)
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            return self.attn_out(out.transpose(1, 2).reshape(b, t, d))
        q, k, v = qkv.split(d, dim=-1)
        # q/k norm spans all heads jointly (MolmoE quirk), before the head split.
        q, k = self.q_norm(q), self.k_norm(k)
        shape = (b, t, self.n_heads, self.head_dim)
        q, k, v = (z.view(shape).transpose(1, 2) for z in (q, k, v))
        # q and k rotated in one pass: half the kernel launches on the eager prefill path.
        q, k = apply_rope(torch.stack([q, k]), cos, sin).unbind(0)
        if cache_kv is not None:
            key_cache, value_cache = cache_kv
            key_cache.index_copy_(2, cache_index, k)
            value_cache.index_copy_(2, cache_index, v)
        if attend_cache and cache_len is not None:
            out = F.scaled_dot_product_attention(q, key_cache[:, :, :cache_len], value_cache[:, :, :cache_len], attn_mask=mask)
        elif attend_cache:
            out = F.scaled_dot_product_attention(q, key_cache, value_cache, attn_mask=mask)
        elif mask is not None:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        else:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.attn_out(out.transpose(1, 2).reshape(b, t, d))


def renormalise_topk(weights: torch.Tensor) -> torch.Tensor:
    """Kept router weights [..., top_k] scaled to sum to 1 per token (`ModelArgs.norm_topk_prob`)."""
    return weights / weights.sum(dim=-1, keepdim=True)


class MoE(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        e, h, d = args.n_experts, args.expert_hidden, args.d_model
        self.ff_norm = RMSNorm(d, args.norm_eps)
        self.gate = nn.Linear(d, e, bias=False)
        self.w_gate_up = nn.Parameter(torch.empty(e, 2 * h, d))
        self.w_down = nn.Parameter(torch.empty(e, d, h))
        self.norm_topk_prob = args.norm_topk_prob

    def route(self, h: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Softmax over all experts in float32, keep the top_k; MolmoE does NOT renormalise them
        (`ModelArgs.norm_topk_prob` False), the router ablation does."""
        probs = torch.softmax(self.gate(h).float(), dim=-1)
        weights, ids = torch.topk(probs, top_k, dim=-1)
        return (renormalise_topk(weights) if self.norm_topk_prob else weights), ids

    def forward(self, x: torch.Tensor, top_k: int, moe_impl: str = "auto") -> torch.Tensor:
        b, t, d = x.shape
        h = self.ff_norm(x).reshape(b * t, d)
        weights, ids = self.route(h, top_k)
        return moe_forward(h, ids, weights, self.w_gate_up, self.w_down, impl=moe_impl).view(b, t, d)


class Block(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.attn = Attention(args)
        self.mlp = MoE(args)

    def forward(self, x, cos, sin, cache_kv, cache_index, mask, attend_cache, top_k: int, moe_impl: str = "auto", cache_len=None):
        x = x + self.attn(x, cos, sin, cache_kv, cache_index, mask, attend_cache, cache_len)
        return x + self.mlp(x, top_k, moe_impl)


class Embedding(nn.Module):
    """MolmoE's embedding: the table plus `new_embedding` rows appended after it."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.embedding = nn.Parameter(torch.zeros(args.embedding_size, args.d_model))
        self.new_embedding = nn.Parameter(torch.zeros(args.additional_vocab_size, args.d_model))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return embedding_reference(ids, self.embedding, self.new_embedding)


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.wte = Embedding(args)
        self.blocks = nn.ModuleList(Block(args) for _ in range(args.n_layers))
        self.ln_f = RMSNorm(args.d_model, args.norm_eps)
        self.moe_impl = "auto"  # "reference" forces the plain torch MoE path (see moe_kernels)

    def forward(
        self,
        x: torch.Tensor,
        positions: torch.Tensor,
        plan: tuple[int, ...],
        top_k: tuple[int, ...],
        cache: KVCache | None = None,
        cache_index: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
        attend_cache: bool = False,
        cache_len: int | None = None,
        moe_impl: str | None = None,
    ) -> torch.Tensor:
        """Run the blocks in `plan` (sorted indices) over embeddings x [B, T, d]; return ln_f(x).

        positions [B, T] are RoPE positions (they differ from cache slots under left padding).
        """
        cos, sin = rope_tables(positions, self.args.head_dim, self.args.rope_theta)
        moe_impl = moe_impl or self.moe_impl
        for i in plan:
            kv = (cache.keys[i], cache.values[i]) if cache is not None else None
            x = self.blocks[i](x, cos, sin, kv, cache_index, mask, attend_cache, top_k[i], moe_impl, cache_len)
        return self.ln_f(x)


def decode_forward_fused(
    transformer: Transformer,
    x: torch.Tensor,
    cache: KVCache,
    slot: torch.Tensor,
    plan: tuple[int, ...],
    top_k: tuple[int, ...],
    impl: str = "auto",
    lm_head_weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """One decode token [1, 1, d] at cache slot `slot` (= its position) through the plan with fused
    elementwise kernels; returns ln_f(x) [1, 1, d], or, given `lm_head_weight` [V, d], the logits
    [1, V] (ln_f's add + norm inside the head's `decode_gemv`, one launch fewer than norm + Linear).

    The same arithmetic as `Transformer.forward` for T = 1 (tested against it), restructured so
    that each residual add is fused with the RMSNorm that follows it (the next block's attention
    norm inside its q/k/v projection, the MoE norm inside the router, finally ln_f), the q/k norms,
    RoPE and KV write happen inside the attention's split programs, and the router (add+norm, gate
    projection, softmax, top-k) is one kernel: 7 launches per block instead of about 30.
    """
    from .decode_attention import decode_attention_auto, decode_attention_qk_auto
    from .decode_gemv import decode_gemv_auto, default_gemv_config
    from .fused_kernels import fused_add_rms_norm_auto, fused_qk_norm_rope_kv_auto, router_topk_norm_auto, softmax_topk_auto

    args = transformer.args
    d, eps = args.d_model, args.norm_eps
    # The q/k/v GEMV writes partial sums of squares of q and k, one per block of its rows: the attention's
    # split programs add them up for the q/k norms (decode_attention_qk), so the norms, RoPE and the KV
    # write need no launch of their own: 0.505 against 0.527 ms per token at top_k 1, 0.851 against 0.873
    # at top_k 8 on an H200 (results/device/session14/, call 4). (The q/k/v GEMV's last-arriving program doing that
    # work, session 11, or every split program summing the norms over all d values, session 10, was slower.)
    qkv_rows = default_gemv_config(3 * d, d, True).block_n
    qk_in_attention = d % qkv_rows == 0
    # `y` is the last sublayer's output, not yet added to `residual` (None before the first block: the
    # embedding is y and the first norm reads it alone).
    y, residual = x.reshape(1, d), None
    for i in plan:
        block = transformer.blocks[i]
        attn, mlp = block.attn, block.mlp
        # Projections of plain Linears run as `decode_gemv` (faster than cuBLAS's one-row GEMM on an
        # H200: BENCHMARKS.md), the residual add and attention norm inside the q/k/v one; a LoRA-wrapped
        # projection runs as a module, so that its adapter's delta is applied.
        square_sums = None
        if type(attn.att_proj) is nn.Linear:
            if qk_in_attention:
                square_sums = torch.empty(2, d // qkv_rows, dtype=torch.float32, device=y.device)
            qkv, new_residual = decode_gemv_auto(y, attn.att_proj.weight, residual=residual,
                                                 norm_weight=attn.attn_norm.weight, eps=eps, impl=impl,
                                                 square_sums=square_sums)
            residual = y if residual is None else new_residual
        else:
            if residual is None:
                h, residual = F.rms_norm(y, (d,), attn.attn_norm.weight.to(y.dtype), eps), y
            else:
                h, residual = fused_add_rms_norm_auto(y, residual, attn.attn_norm.weight, eps, impl=impl)
            qkv = attn.att_proj(h)
        # Split-KV "flash-decoding": many programs, each reading only visible keys (slots <= slot),
        # instead of masked SDPA's one program per head over the whole static buffer. The slot and the
        # older cache rows are this step's inputs, written before it began: `slot_static` lets the kernel
        # load those rows while the kernel before it is still running (PDL). (Combining the splits in each
        # head's last-arriving program instead of a second launch was slower.)
        if square_sums is not None:
            out = decode_attention_qk_auto(qkv, square_sums, attn.q_norm.weight, attn.k_norm.weight, cache.rope_cos,
                                           cache.rope_sin, cache.keys[i], cache.values[i], slot, attn.n_heads, eps,
                                           impl=impl, slot_static=True).reshape(1, d)
        else:
            # A LoRA-wrapped projection (or a width the GEMV's row blocks do not divide): one launch.
            q = fused_qk_norm_rope_kv_auto(
                qkv, attn.q_norm.weight, attn.k_norm.weight, cache.rope_cos, cache.rope_sin,
                cache.keys[i], cache.values[i], slot, attn.n_heads, eps, impl=impl,
            )
            out = decode_attention_auto(q, cache.keys[i], cache.values[i], slot, impl=impl, slot_static=True).reshape(1, d)
        if type(attn.attn_out) is nn.Linear:
            attn_out, _ = decode_gemv_auto(out, attn.attn_out.weight, impl=impl)
        else:
            attn_out = attn.attn_out(out)
        # The residual add, MoE norm and MoE.route in one launch: the gate projection split over the
        # d-columns (cuBLAS took ~5 us for this 256 KB GEMV), logits rounded to the activation dtype,
        # softmax and top-k. A gate wrapped by an unmerged LoRA adapter is not a plain Linear: it runs
        # as a module after the norm, then softmax and top-k, so the adapter's delta is applied.
        if type(mlp.gate) is nn.Linear:
            weights, ids, h, residual = router_topk_norm_auto(attn_out, residual, mlp.ff_norm.weight, eps, mlp.gate.weight,
                                                              top_k[i], cache.arrival_counter, impl=impl)
        else:
            h, residual = fused_add_rms_norm_auto(attn_out, residual, mlp.ff_norm.weight, eps, impl=impl)
            weights, ids = softmax_topk_auto(mlp.gate(h), top_k[i], impl=impl)
        if mlp.norm_topk_prob:
            weights = renormalise_topk(weights)
        y = moe_forward(h, ids, weights, mlp.w_gate_up, mlp.w_down, impl=transformer.moe_impl)
    if lm_head_weight is not None:
        return decode_gemv_auto(y, lm_head_weight, residual=residual, norm_weight=transformer.ln_f.weight, eps=eps,
                                impl=impl)[0]
    h, _ = fused_add_rms_norm_auto(y, residual, transformer.ln_f.weight, eps, impl=impl)
    return h.reshape(1, 1, d)
