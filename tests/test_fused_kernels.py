"""Tests of flexvlm_env/model/fused_kernels.py: the torch references against what decoder.py computes
and against direct float64 formulas, argument errors and dispatch, the Triton kernels in Triton's
interpreter (subprocess) and, with a GPU, compiled in bf16 and captured in a CUDA graph."""
from __future__ import annotations

import dataclasses
import json
import re
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from _fused_interpret_check import random_qk_case
from _interpret import nonzero_randn, run_interpret_check

from flexvlm_env.model.args import ModelArgs
from flexvlm_env.model.decoder import Attention, Block, Embedding, KVCache, MoE, rope_tables
from flexvlm_env.model.fused_kernels import (
    MAX_D,
    add_rms_norm_reference,
    embed_token,
    embed_token_auto,
    fused_add_rms_norm,
    fused_add_rms_norm_auto,
    fused_qk_norm_rope_kv,
    fused_qk_norm_rope_kv_auto,
    fused_qk_norm_rope_prefill,
    fused_qk_norm_rope_prefill_auto,
    greedy_token,
    greedy_token_auto,
    greedy_token_reference,
    new_arrival_counter,
    pdl_enabled,
    pdl_launch_options,
    qk_norm_rope_kv_reference,
    qk_norm_rope_prefill_reference,
    router_topk,
    router_topk_auto,
    router_topk_norm,
    router_topk_norm_auto,
    router_topk_reference,
    softmax_topk,
    softmax_topk_auto,
    softmax_topk_reference,
)

EPS = 1e-5
gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def small_args(d_model=64, n_heads=4, n_experts=16):
    return ModelArgs(name="test", d_model=d_model, n_layers=1, n_heads=n_heads, n_experts=n_experts,
                     expert_hidden=16, top_k=2)


def randomize_(module: torch.nn.Module, dtype) -> torch.nn.Module:
    """Random, never-zero parameters (norm weights included, which start as ones)."""
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(nonzero_randn(*p.shape, scale=p.shape[-1] ** -0.5 if p.dim() > 1 else 1.0))
    return module.to(dtype)


# ---------------------------------------------------------------------------------------------------
# References == decoder.py today


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("slot", [0, 5, 11])
def test_qk_reference_matches_decoder_attention(monkeypatch, dtype, slot):
    args = small_args()
    attn = randomize_(Attention(args), dtype)
    max_seq, hd = 12, args.head_dim
    x = nonzero_randn(1, 1, args.d_model).to(dtype)
    cos, sin = rope_tables(torch.tensor([[1234]]), hd, args.rope_theta)
    caches = [nonzero_randn(1, args.n_heads, max_seq, hd).to(dtype) for _ in range(2)]
    ref_caches = [c.clone() for c in caches]
    seen = {}
    sdpa = F.scaled_dot_product_attention

    def spy(q, k, v, **kw):
        seen["q"] = q.clone()
        return sdpa(q, k, v, **kw)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    with torch.no_grad():
        attn(x, cos, sin, caches, torch.tensor([slot]), None, attend_cache=True, cache_len=slot + 1)
        qkv = attn.att_proj(attn.attn_norm(x))
        q = qk_norm_rope_kv_reference(qkv, attn.q_norm.weight, attn.k_norm.weight, cos, sin, *ref_caches,
                                      torch.tensor([slot]), args.n_heads, args.norm_eps)
    # Same operations in the same order: bit-identical.
    assert torch.equal(q, seen["q"])
    assert torch.equal(ref_caches[0], caches[0]) and torch.equal(ref_caches[1], caches[1])


def _prefill_inputs(args, t, dtype, device="cpu"):
    attn = randomize_(Attention(args), dtype).to(device)
    max_seq, hd = t + 5, args.head_dim
    x = nonzero_randn(1, t, args.d_model).to(dtype).to(device)
    cos, sin = rope_tables(torch.arange(t, device=device)[None], hd, args.rope_theta)
    caches = [nonzero_randn(1, args.n_heads, max_seq, hd).to(dtype).to(device) for _ in range(2)]
    return attn, x, cos, sin, caches, torch.arange(t, device=device)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_prefill_reference_matches_decoder_attention(monkeypatch, dtype):
    args = small_args()
    attn, x, cos, sin, caches, index = _prefill_inputs(args, 7, dtype)
    ref_caches = [c.clone() for c in caches]
    seen = {}
    sdpa = F.scaled_dot_product_attention

    def spy(q, k, v, **kw):
        seen.update(q=q.clone(), k=k.clone(), v=v.clone())
        return sdpa(q, k, v, **kw)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    with torch.no_grad():
        attn(x, cos, sin, caches, index, None, attend_cache=False)  # the CPU takes the plain ops
        qkv = attn.att_proj(attn.attn_norm(x))
        q, k, v = qk_norm_rope_prefill_reference(qkv, attn.q_norm.weight, attn.k_norm.weight, cos, sin, *ref_caches,
                                                 index, args.n_heads, args.norm_eps)
    assert torch.equal(q, seen["q"]) and torch.equal(k, seen["k"]) and torch.equal(v, seen["v"])
    assert torch.equal(ref_caches[0], caches[0]) and torch.equal(ref_caches[1], caches[1])
    assert fused_qk_norm_rope_prefill_auto(qkv, attn.q_norm.weight, attn.k_norm.weight, cos, sin, *ref_caches, index,
                                           args.n_heads, args.norm_eps)[0].equal(q)  # auto on CPU: the reference


@pytest.mark.parametrize("change,argument", [
    (lambda a: a.update(qkv=a["qkv"][0]), "qkv must be"),
    (lambda a: a.update(cos=a["cos"][0]), "cos must be"),
    (lambda a: a.update(sin=a["sin"].double()), "sin must be"),
    (lambda a: a.update(cache_index=a["cache_index"][:-1]), "cache_index must be"),
    (lambda a: a.update(cache_index=a["cache_index"].float()), "cache_index must be"),
    (lambda a: a.update(key_cache=a["key_cache"].transpose(2, 3)), "key_cache must be"),
    (lambda a: a.update(n_heads=5), "n_heads=5"),
    (lambda a: a.update(q_norm_w=a["q_norm_w"][:-1]), "q_norm_w must be"),
])
def test_prefill_bad_arguments_name_the_argument(change, argument):
    args = small_args()
    attn, x, cos, sin, caches, index = _prefill_inputs(args, 4, torch.float32)
    with torch.no_grad():
        a = dict(qkv=attn.att_proj(x), q_norm_w=attn.q_norm.weight, k_norm_w=attn.k_norm.weight, cos=cos, sin=sin,
                 key_cache=caches[0], value_cache=caches[1], cache_index=index, n_heads=args.n_heads, eps=1e-5)
    change(a)
    with pytest.raises(ValueError, match=re.escape(argument)):
        qk_norm_rope_prefill_reference(**a)
    with pytest.raises(ValueError, match=re.escape(argument)):
        fused_qk_norm_rope_prefill(**a)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_add_rms_norm_reference_matches_block_residual_and_ff_norm(dtype):
    block = randomize_(Block(small_args()), dtype)
    x, sublayer_out = nonzero_randn(1, 3, 64).to(dtype), nonzero_randn(1, 3, 64).to(dtype)
    with torch.no_grad():
        normed, new_residual = add_rms_norm_reference(sublayer_out, x, block.mlp.ff_norm.weight, block.mlp.ff_norm.eps)
        assert torch.equal(new_residual, x + sublayer_out)  # Block: x = x + self.attn(...)
        assert torch.equal(normed, block.mlp.ff_norm(x + sublayer_out))


# ---------------------------------------------------------------------------------------------------
# References against direct float64 formulas


def test_qk_reference_matches_direct_rope_formula():
    d, n_heads, max_seq, slot = 96, 4, 7, 2
    qkv, q_w, k_w, cos, sin, kc, vc, slot_t = random_qk_case(d, n_heads, max_seq, torch.float64, slot)
    q = qk_norm_rope_kv_reference(qkv, q_w, k_w, cos, sin, kc, vc, slot_t, n_heads, EPS)
    hd, half = d // n_heads, d // n_heads // 2
    for part, w, got in ((0, q_w, q[0, :, 0]), (1, k_w, kc[0, :, slot])):
        z = qkv[0, part * d:(part + 1) * d]
        z = z / torch.sqrt(z.pow(2).mean() + EPS) * w
        for head in range(n_heads):
            a = z[head * hd:(head + 1) * hd]
            for i in range(hd):
                partner = -a[i + half] if i < half else a[i - half]
                expected = a[i] * float(cos[0, i]) + partner * float(sin[0, i])
                assert abs(float(got[head, i]) - float(expected)) < 1e-12
    assert torch.equal(vc[0, :, slot].reshape(-1), qkv[0, 2 * d:])


def test_add_rms_norm_reference_matches_direct_formula():
    x, r, w = nonzero_randn(3, 40).double(), nonzero_randn(3, 40).double(), nonzero_randn(40).double()
    normed, _ = add_rms_norm_reference(x, r, w, EPS)
    s = x + r
    assert torch.allclose(normed, s / torch.sqrt((s * s).mean(-1, keepdim=True) + EPS) * w, rtol=1e-12, atol=0)


# ---------------------------------------------------------------------------------------------------
# Arguments and dispatch


def qk_args(**change):
    names = ["qkv", "q_norm_w", "k_norm_w", "cos", "sin", "key_cache", "value_cache", "slot"]
    args = dict(zip(names, random_qk_case(64, 4, 8, torch.float32, 3)), n_heads=4, eps=EPS)
    return {**args, **{k: v(args) for k, v in change.items()}}


@pytest.mark.parametrize("change,argument", [
    ({"qkv": lambda a: a["qkv"][:, :-1]}, "qkv"),
    ({"qkv": lambda a: a["qkv"].expand(2, -1)}, "qkv"),
    ({"n_heads": lambda a: 5}, "n_heads"),
    ({"q_norm_w": lambda a: a["q_norm_w"][:-1]}, "q_norm_w"),
    ({"k_norm_w": lambda a: a["k_norm_w"].int()}, "k_norm_w"),
    ({"cos": lambda a: a["cos"][:, :-1]}, "cos"),
    ({"cos": lambda a: torch.zeros(5, a["cos"].shape[-1])}, "cos"),  # a table, but not [max_seq, head_dim]
    ({"sin": lambda a: torch.zeros(a["key_cache"].shape[2], a["cos"].shape[-1])}, "cos and sin"),
    ({"sin": lambda a: a["sin"].half()}, "sin"),
    ({"key_cache": lambda a: a["key_cache"][:, :2]}, "key_cache"),
    ({"key_cache": lambda a: a["key_cache"].transpose(2, 3).contiguous().transpose(2, 3)}, "key_cache"),
    ({"value_cache": lambda a: a["value_cache"][:, :, :-1]}, "value_cache"),
    ({"slot": lambda a: torch.tensor([1, 2])}, "slot"),
    ({"slot": lambda a: torch.tensor([1.0])}, "slot"),
])
def test_qk_bad_arguments_name_the_argument(change, argument):
    with pytest.raises(ValueError, match=argument):
        fused_qk_norm_rope_kv_auto(**qk_args(**change))


@pytest.mark.parametrize("args,argument", [
    ((torch.ones(2, 8), torch.ones(2, 7), torch.ones(8)), "residual"),
    ((torch.ones(2, 8), torch.ones(2, 8).half(), torch.ones(8)), "residual"),
    ((torch.ones(2, 8), torch.ones(2, 8), torch.ones(7)), "weight"),
    ((torch.ones(2, 8).int(), torch.ones(2, 8).int(), torch.ones(8)), "x"),
    ((torch.ones(2, 9000), torch.ones(2, 9000), torch.ones(9000)), "x"),
])
def test_add_rms_norm_bad_arguments_name_the_argument(args, argument):
    with pytest.raises(ValueError, match=argument):
        fused_add_rms_norm_auto(*args, EPS)


def test_preallocated_outputs_are_checked():
    x = torch.ones(2, 8)
    with pytest.raises(ValueError, match="residual_out"):
        fused_add_rms_norm_auto(x, x, torch.ones(8), EPS, impl="triton", residual_out=torch.empty(2, 8).half())
    with pytest.raises(ValueError, match="out_ids"):
        softmax_topk(x, 2, None, torch.empty(2, 2, dtype=torch.int32))
    with pytest.raises(ValueError, match="out"):
        fused_qk_norm_rope_kv_auto(**qk_args(), impl="triton", out=torch.empty(1, 4, 1, 15))


def test_auto_on_cpu_is_the_reference_and_impl_is_checked():
    x, r, w = nonzero_randn(2, 64), nonzero_randn(2, 64), nonzero_randn(64)
    out, res_out = torch.empty(2, 64), torch.empty(2, 64)
    normed, new_residual = fused_add_rms_norm_auto(x, r, w, EPS, out=out, residual_out=res_out)
    ref = add_rms_norm_reference(x, r, w, EPS)
    assert normed is out and new_residual is res_out
    assert torch.equal(normed, ref[0]) and torch.equal(new_residual, ref[1])
    args = qk_args()
    ref_caches = [args["key_cache"].clone(), args["value_cache"].clone()]
    q = fused_qk_norm_rope_kv_auto(**args)
    ref_q = qk_norm_rope_kv_reference(**{**args, "key_cache": ref_caches[0], "value_cache": ref_caches[1]})
    assert torch.equal(q, ref_q) and torch.equal(args["key_cache"], ref_caches[0])
    with pytest.raises(ValueError, match="impl"):
        fused_add_rms_norm_auto(x, r, w, EPS, impl="fast")
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.importorskip("triton")
        with pytest.raises(ValueError, match="CUDA"):
            fused_add_rms_norm(x, r, w, EPS)
        with pytest.raises(ValueError, match="CUDA"):
            fused_qk_norm_rope_kv(**args)
        with pytest.raises(ValueError, match="CUDA"):
            softmax_topk(x, 2)
        with pytest.raises(ValueError, match="CUDA"):
            router_topk(x[:1], torch.ones(4, 64), 2, new_arrival_counter("cpu"))


# ---------------------------------------------------------------------------------------------------
# Triton interpreter


def test_triton_kernels_in_interpreter():
    run_interpret_check("_fused_interpret_check.py")


# ---------------------------------------------------------------------------------------------------
# GPU: compiled kernels, bf16, CUDA graphs


def to_cuda(tensors):
    return [t.cuda() for t in tensors]


def assert_bf16_close(out, ref):
    """Equal up to one bf16 rounding step: float32 sums in another order may land on the other side of a
    rounding boundary, at the output (rtol) or at a RoPE input whose error a small output keeps (atol,
    scaled by the largest value). A NaN (an element left unwritten) fails."""
    torch.testing.assert_close(out.float(), ref.float(), rtol=2**-7, atol=2**-7 * ref.float().abs().max().item())


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("shape", [(1, 2048), (1, 1, 2048), (5, 4096), (3, 96)])
def test_add_rms_norm_bf16_gpu(shape):
    x, r = nonzero_randn(*shape).bfloat16().cuda(), nonzero_randn(*shape, scale=3.0).bfloat16().cuda()
    w = nonzero_randn(shape[-1]).bfloat16().cuda()
    normed, new_residual = fused_add_rms_norm(x, r, w, EPS)
    ref, ref_residual = add_rms_norm_reference(x, r, w, EPS)
    assert torch.equal(new_residual, ref_residual)
    assert_bf16_close(normed, ref)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("d,n_heads", [(2048, 16), (96, 4), (64, 16)])
def test_qk_norm_rope_kv_bf16_gpu(d, n_heads):
    max_seq = 300
    for slot in (0, 150, max_seq - 1):
        args = to_cuda(random_qk_case(d, n_heads, max_seq, torch.bfloat16, slot))
        ref_caches = [args[5].clone(), args[6].clone()]
        q = fused_qk_norm_rope_kv(*args, n_heads, EPS)
        ref_q = qk_norm_rope_kv_reference(*args[:5], *ref_caches, args[7], n_heads, EPS)
        assert_bf16_close(q, ref_q)
        assert_bf16_close(args[5], ref_caches[0])
        assert torch.equal(args[6], ref_caches[1])
        others = torch.arange(max_seq, device="cuda") != slot
        assert torch.equal(args[5][:, :, others], ref_caches[0][:, :, others])


def distinct_logits(num_experts, top_k):
    """bf16 router logits [1, num_experts] (std ~3, like a trained router's) whose top k + 1 values are
    apart by > 1e-3, so that the ids are unambiguous."""
    for _ in range(200):
        logits = nonzero_randn(1, num_experts, scale=3.0).bfloat16()
        top = logits.float().topk(min(top_k + 1, num_experts), dim=-1).values
        if (top[:, :-1] - top[:, 1:]).min() > 1e-3:
            return logits
    raise RuntimeError("could not draw router logits without near-ties")


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("d,n_heads,t", [(2048, 16, 1216), (2048, 16, 1), (96, 4, 37)])
def test_attention_prefill_fused_equals_plain_bf16(monkeypatch, d, n_heads, t):
    import flexvlm_env.model.decoder as decoder

    fused_prefill_ok = decoder.fused_prefill_ok
    args = small_args(d_model=d, n_heads=n_heads)
    attn, x, cos, sin, caches, index = _prefill_inputs(args, t, torch.bfloat16, "cuda")
    assert fused_prefill_ok(torch.empty(1, t, 3 * d, device="cuda", dtype=torch.bfloat16))
    plain_caches = [c.clone() for c in caches]
    with torch.no_grad():
        fused = attn(x, cos, sin, caches, index, None, attend_cache=False)
        monkeypatch.setattr(decoder, "fused_prefill_ok", lambda qkv: False)
        plain = attn(x, cos, sin, plain_caches, index, None, attend_cache=False)
    # The RMS sums in another order: an element may move by an ulp before RoPE and the attention.
    torch.testing.assert_close(fused, plain, atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(caches[0], plain_caches[0], atol=2e-2, rtol=2e-2)
    assert torch.equal(caches[1], plain_caches[1])  # v is copied as it is
    with torch.enable_grad():  # autograd keeps the plain ops (the kernel has no backward)
        assert not fused_prefill_ok(x.clone().requires_grad_(True))
    # so do widths one program cannot hold
    assert not fused_prefill_ok(torch.empty(1, 2, 3 * (MAX_D + 64), device="cuda", dtype=torch.bfloat16))


@pytest.mark.gpu
@gpu
def test_decode_kernels_replay_in_cuda_graph_with_new_inputs():
    d, n_heads, max_seq, num_experts, top_k = 2048, 16, 64, 64, 8
    qk = to_cuda(random_qk_case(d, n_heads, max_seq, torch.bfloat16, 0))
    qkv, q_w, k_w, cos, sin, key_cache, value_cache, slot = qk
    x, r = nonzero_randn(1, 1, d).bfloat16().cuda(), nonzero_randn(1, 1, d).bfloat16().cuda()
    norm_w = nonzero_randn(d).bfloat16().cuda()
    logits = distinct_logits(num_experts, top_k).cuda()
    q_out = torch.empty(1, n_heads, 1, d // n_heads, dtype=torch.bfloat16, device="cuda")
    normed, new_residual = torch.empty_like(x), torch.empty_like(x)
    out_w = torch.empty(1, top_k, device="cuda")
    out_ids = torch.empty(1, top_k, dtype=torch.long, device="cuda")

    def step():
        fused_qk_norm_rope_kv(qkv, q_w, k_w, cos, sin, key_cache, value_cache, slot, n_heads, EPS, out=q_out)
        fused_add_rms_norm(x, r, norm_w, EPS, out=normed, residual_out=new_residual)
        softmax_topk(logits, top_k, out_w, out_ids)

    step()  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    for new_slot in (5, max_seq - 1, 0):
        new_qk = to_cuda(random_qk_case(d, n_heads, max_seq, torch.bfloat16, new_slot))
        for buf, new in zip((qkv, cos, sin, slot), (new_qk[0], new_qk[3], new_qk[4], new_qk[7])):
            buf.copy_(new)
        x.copy_(nonzero_randn(1, 1, d))
        r.copy_(nonzero_randn(1, 1, d))
        logits.copy_(distinct_logits(num_experts, top_k))  # in place: the graph reads this buffer
        ref_caches = [key_cache.clone(), value_cache.clone()]
        ref_q = qk_norm_rope_kv_reference(qkv, q_w, k_w, cos, sin, *ref_caches, slot, n_heads, EPS)
        key_cache[:, :, new_slot] = float("nan")
        value_cache[:, :, new_slot] = float("nan")
        for buf in (q_out, normed, new_residual, out_w):
            buf.fill_(float("nan"))
        out_ids.fill_(-1)
        graph.replay()
        assert_bf16_close(q_out, ref_q)
        assert_bf16_close(key_cache, ref_caches[0])
        assert torch.equal(value_cache, ref_caches[1])
        ref_normed, ref_residual = add_rms_norm_reference(x, r, norm_w, EPS)
        assert_bf16_close(normed, ref_normed)
        assert torch.equal(new_residual, ref_residual)
        ref_w, ref_ids = softmax_topk_reference(logits, top_k)
        assert torch.equal(out_ids, ref_ids)  # no near-ties among the top k + 1 (distinct_logits)
        # float32 softmax: exp and the sum over experts may round differently from torch's by an ulp or so.
        assert torch.allclose(out_w, ref_w, rtol=1e-5, atol=1e-7)


@pytest.mark.gpu
@gpu
def test_router_topk_in_cuda_graph_bf16():
    """MolmoE's router shape (d 2048, 64 experts) in bf16, captured in a graph with all 16 blocks' launches
    sharing one counter: every replay with new inputs gives the reference's ids (no near-ties), weights
    within a logit's bf16 rounding, the same outputs when replayed again, and leaves the counter at 0."""
    d, num_experts, blocks = 2048, 64, 16
    torch.manual_seed(0)
    hs = [torch.empty(1, d, dtype=torch.bfloat16, device="cuda") for _ in range(blocks)]
    weights = [(torch.randn(num_experts, d, device="cuda") * 3 * d ** -0.5).bfloat16() for _ in range(blocks)]
    counter = new_arrival_counter("cuda")
    outs = [(torch.empty(1, 8, device="cuda"), torch.empty(1, 8, dtype=torch.long, device="cuda")) for _ in range(blocks)]

    def step():
        for h, w, (out_w, out_ids) in zip(hs, weights, outs):
            router_topk(h, w, 8, counter, out_weights=out_w, out_ids=out_ids)

    for h in hs:
        h.copy_(nonzero_randn(1, d))
    step()  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    def separated_input(w):
        """h whose top 9 logits are apart by more than two bf16 roundings of the largest logit: another
        summation order can then not reorder the ids."""
        for _ in range(500):
            h = nonzero_randn(1, d).bfloat16().cuda()
            logits = F.linear(h, w).float()
            top = logits.topk(9, dim=-1).values
            if (top[:, :-1] - top[:, 1:]).min() > 2 * 2 ** -8 * logits.abs().max():
                return h
        raise RuntimeError("could not draw router inputs without near-ties")

    for _ in range(5):
        for h, w in zip(hs, weights):
            h.copy_(separated_input(w))
        graph.replay()
        first = [(w.clone(), i.clone()) for w, i in outs]
        graph.replay()
        torch.cuda.synchronize()
        assert int(counter.item()) == 0
        for h, w, (out_w, out_ids), (w0, i0) in zip(hs, weights, outs, first):
            assert torch.equal(out_w, w0) and torch.equal(out_ids, i0)  # deterministic: no float atomics
            logits = F.linear(h, w).float()
            ref_w, ref_ids = router_topk_reference(h, w, 8)
            torch.testing.assert_close(out_w, ref_w, rtol=2.5 * 2 ** -8 * logits.abs().max().item(), atol=1e-6)
            assert torch.equal(out_ids, ref_ids)


@pytest.mark.gpu
@gpu
def test_greedy_token_in_cuda_graph_bf16():
    """MolmoE-1B's vocabulary (50,304 bf16 logits), 16 launches sharing one counter in a graph: each
    replay with new logits (ties planted across programs in one of them) gives torch's argmax and
    leaves the counter at 0."""
    vocab, launches = 50304, 16
    torch.manual_seed(0)
    logits = [torch.empty(1, vocab, dtype=torch.bfloat16, device="cuda") for _ in range(launches)]
    outs = [torch.empty(1, 1, dtype=torch.long, device="cuda") for _ in range(launches)]
    counter = new_arrival_counter("cuda")

    def step():
        for x, out in zip(logits, outs):
            greedy_token(x, counter, out=out)

    for x in logits:
        x.normal_()
    step()  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    for replay in range(4):
        for n, x in enumerate(logits):
            x.normal_()
            if n == replay:
                x[0, [3, 40_000, vocab - 1]] = 100.0  # the first of three tied maxima must win
        graph.replay()
        torch.cuda.synchronize()
        assert int(counter.item()) == 0
        for x, out in zip(logits, outs):
            assert torch.equal(out, x.argmax(dim=-1, keepdim=True))
        assert outs[replay].item() == 3


def test_router_references_are_moe_route():
    """The decode path's routers are MoE.route, bit for bit: the gate projection then softmax_topk (any
    number of tokens), and the one-launch router's reference and CPU dispatch (one token)."""
    torch.manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16):
        moe = MoE(ModelArgs(d_model=64, n_heads=4, n_experts=16, expert_hidden=8, top_k=4)).to(dtype)
        torch.nn.init.normal_(moe.gate.weight, std=0.5)
        h = torch.randn(3, 64).to(dtype)
        for k in (1, 4, 16):
            ref_w, ref_ids = moe.route(h, k)
            w, ids = softmax_topk_auto(moe.gate(h), k)
            assert torch.equal(ids, ref_ids) and torch.equal(w, ref_w)
            # one token against MoE.route of that token (a 1-row GEMM may round unlike a 3-row one)
            ref_w, ref_ids = moe.route(h[:1], k)
            for w, ids in (router_topk_reference(h[:1], moe.gate.weight, k),
                           router_topk_auto(h[:1], moe.gate.weight, k, new_arrival_counter("cpu"))):
                assert torch.equal(ids, ref_ids) and torch.equal(w, ref_w)


@pytest.mark.parametrize("change, message", [
    ({"h": torch.randn(2, 64)}, "h must be one token"),
    ({"gate_weight": torch.randn(16, 32)}, "gate_weight must be"),
    ({"gate_weight": torch.randn(16, 64).half()}, "gate_weight must be contiguous"),
    ({"gate_weight": torch.randn(64, 16).t()}, "gate_weight must be contiguous"),
    ({"top_k": 17}, "top_k=17"),
    ({"counter": torch.zeros(1, dtype=torch.int64)}, "counter must be"),
    ({"block_k": 48}, "block_k=48"),
    ({"num_warps": 3}, "num_warps=3"),
])
def test_router_topk_rejects_bad_arguments(change, message):
    args = {"h": torch.randn(1, 64), "gate_weight": torch.randn(16, 64), "top_k": 2, "counter": new_arrival_counter("cpu")}
    with pytest.raises(ValueError, match=message):
        router_topk(**{**args, **change})


@pytest.mark.parametrize("change,message", [
    ({"logits": torch.randn(2, 64)}, "logits must be one token"),
    ({"logits": torch.randn(64)}, "logits must be one token"),
    ({"logits": torch.zeros(1, 64, dtype=torch.int64)}, "logits must be one of"),
    ({"logits": torch.randn(1, 64, dtype=torch.float64)}, "logits must be one of"),
    ({"counter": torch.zeros(2, dtype=torch.int32)}, "counter must be"),
    ({"block_v": 100}, "block_v=100"),
    ({"block_v": 8}, "block_v=8"),
    ({"advance": (torch.zeros(1, dtype=torch.int32), torch.zeros(8, dtype=torch.int64))}, "advance slot"),
    ({"advance": (torch.zeros(2, dtype=torch.int64), torch.zeros(8, dtype=torch.int64))}, "advance slot"),
    ({"advance": (torch.zeros(1, dtype=torch.int64), torch.zeros(8, dtype=torch.int32))}, "advance history"),
    ({"advance": (torch.zeros(1, dtype=torch.int64), torch.zeros(2, 8, dtype=torch.int64))}, "advance history"),
])
def test_greedy_token_rejects_bad_arguments(change, message):
    args = {"logits": torch.randn(1, 64), "counter": new_arrival_counter("cpu"), "block_v": 16}
    with pytest.raises(ValueError, match=message):
        greedy_token(**{**args, **change})


def test_greedy_token_reference_is_torch_argmax_and_auto_dispatches():
    logits = torch.randn(1, 300)
    logits[0, [7, 200]] = 9.0  # a tie: the first index wins
    assert greedy_token_reference(logits).tolist() == [[7]]
    assert torch.equal(greedy_token_auto(logits, new_arrival_counter("cpu")), greedy_token_reference(logits))
    with pytest.raises(ValueError, match="impl"):
        greedy_token_auto(logits, new_arrival_counter("cpu"), impl="cuda")


def test_bench_router_script_dry_run(tmp_path):
    """scripts/bench_router.py end to end on the CPU references: both methods, ids as the reference's."""
    root = Path(__file__).resolve().parents[1]
    out_path = tmp_path / "router.json"
    subprocess.run([sys.executable, str(root / "scripts" / "bench_router.py"), "--dry-run", "--out", str(out_path)],
                   cwd=root, check=True, capture_output=True, timeout=300)
    rows = json.loads(out_path.read_text())["rows"]
    assert [r["method"] for r in rows] == ["gemv+softmax_topk", "router_topk"]
    assert all(r["ids_equal_reference"] == "2/2" and r["counter_after"] == 0 and r["us_per_block"] > 0 for r in rows)


def test_softmax_topk_rejects_bad_arguments():
    with pytest.raises(ValueError, match="logits must be"):
        softmax_topk(torch.randn(2, 200), 2)
    with pytest.raises(ValueError, match="top_k=9"):
        softmax_topk(torch.randn(2, 8), 9)


# ---------------------------------------------------------------------------------------------------
# Embedding, RoPE tables, PDL


def test_embed_token_reference_is_the_embedding_module():
    args = small_args()
    args = dataclasses.replace(args, embedding_size=40, additional_vocab_size=6)
    wte = Embedding(args)
    with torch.no_grad():
        wte.embedding.normal_()
        wte.new_embedding.normal_()
    for token in (0, 39, 40, 45):
        ids = torch.tensor([[token]])
        row = embed_token_auto(ids, wte.embedding, wte.new_embedding)
        assert row.shape == (1, 1, args.d_model)
        expected = wte.embedding[token] if token < 40 else wte.new_embedding[token - 40]
        assert torch.equal(row[0, 0], expected) and torch.equal(row, wte(ids))


@pytest.mark.parametrize("args,argument", [
    ((torch.tensor([[1, 2]]), torch.ones(4, 8), torch.ones(0, 8)), "ids"),
    ((torch.tensor([[1.0]]), torch.ones(4, 8), torch.ones(0, 8)), "ids"),
    ((torch.tensor([[1]]), torch.ones(4), torch.ones(0, 8)), "table"),
    ((torch.tensor([[1]]), torch.ones(4, 8), torch.ones(2, 7)), "extra_table"),
    ((torch.tensor([[1]]), torch.ones(4, 8), torch.ones(2, 8).half()), "extra_table"),
])
def test_embed_bad_arguments_name_the_argument(args, argument):
    with pytest.raises(ValueError, match=argument):
        embed_token_auto(*args)
    if os.environ.get("TRITON_INTERPRET") != "1" and argument != "ids":
        pytest.importorskip("triton")
        with pytest.raises(ValueError, match="CUDA|" + argument):
            embed_token(*args)


def test_cache_rope_tables_hold_each_positions_row():
    """The fused decode step reads the slot's row of the cache's tables: the values `rope_tables` gives
    that position alone (same float32 operations, elementwise)."""
    args = small_args()
    cache = KVCache.allocate(args, 1, 300, "cpu", torch.float32)
    assert cache.rope_cos.shape == cache.rope_sin.shape == (300, args.head_dim)
    for position in (0, 1, 17, 299):
        cos, sin = rope_tables(torch.tensor([[position]]), args.head_dim, args.rope_theta)
        assert torch.equal(cache.rope_cos[position], cos[0, 0]) and torch.equal(cache.rope_sin[position], sin[0, 0])


def test_qk_reference_reads_tables_at_the_slot():
    args = qk_args()
    max_seq, hd = args["key_cache"].shape[2], args["cos"].shape[-1]
    slot = int(args["slot"])
    tables = [torch.randn(max_seq, hd) for _ in range(2)]
    tables[0][slot], tables[1][slot] = args["cos"].reshape(-1), args["sin"].reshape(-1)
    caches = [args["key_cache"].clone(), args["value_cache"].clone()]
    q_row = qk_norm_rope_kv_reference(**args)
    q_table = qk_norm_rope_kv_reference(**{**args, "cos": tables[0], "sin": tables[1], "key_cache": caches[0],
                                           "value_cache": caches[1]})
    assert torch.equal(q_row, q_table)
    assert torch.equal(caches[0], args["key_cache"]) and torch.equal(caches[1], args["value_cache"])


def test_pdl_is_off_on_cpu_and_by_environment(monkeypatch):
    assert not pdl_enabled(torch.zeros(1))
    assert pdl_launch_options(False) == {"USE_PDL": False}
    assert pdl_launch_options(True) == {"USE_PDL": True, "launch_pdl": True}
    if torch.cuda.is_available():
        on_hopper = torch.cuda.get_device_capability()[0] >= 9
        assert pdl_enabled(torch.zeros(1, device="cuda")) == on_hopper
        monkeypatch.setenv("FLEXVLM_PDL", "0")
        assert not pdl_enabled(torch.zeros(1, device="cuda"))


def test_router_norm_reference_is_norm_then_router_and_outputs_must_not_alias():
    x, residual, w = nonzero_randn(1, 64), nonzero_randn(1, 64), nonzero_randn(64)
    gate = nonzero_randn(16, 64)
    weights, ids, normed, new_residual = router_topk_norm_auto(x, residual, w, EPS, gate, 4, new_arrival_counter("cpu"))
    ref_normed, ref_residual = add_rms_norm_reference(x, residual, w, EPS)
    ref_weights, ref_ids = router_topk_reference(ref_normed, gate, 4)
    assert torch.equal(normed, ref_normed) and torch.equal(new_residual, ref_residual)
    assert torch.equal(ids, ref_ids) and torch.equal(weights, ref_weights)
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.importorskip("triton")
        for out in ({"normed_out": x}, {"residual_out": residual}):
            with pytest.raises(ValueError, match="other buffers"):
                router_topk_norm(x, residual, w, EPS, gate, 4, new_arrival_counter("cpu"), **out)
        with pytest.raises(ValueError, match="gate_weight"):
            router_topk_norm(x, residual, w, EPS, gate[:, :-1], 4, new_arrival_counter("cpu"))
