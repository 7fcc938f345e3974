"""Runs the decode GEMV kernel in Triton's CPU interpreter against the torch reference and float64.

Started by tests/test_decode_gemv.py in a subprocess with TRITON_INTERPRET=1, which must be set before
triton is first imported. Outputs are poisoned with NaN first, so an element left unwritten shows.
Cases: plain W @ x; the RMSNorm of x alone in front (the first block); the residual add and RMSNorm
in front, with the new residual written; tiles that do not divide the shapes; reused buffers; the
partial sums of squares of the leading outputs (`square_sums`, the q/k norms' input). Then
the whole fused decode step (`decoder.decode_forward_fused`) of a small float32 decoder with every
kernel on its Triton path (projections, split-KV attention with the q/k norms, RoPE and KV write, router, MoE
decode) against `Transformer.forward` of the same token, block plans with skipped blocks and mixed
top_k included. Exits non-zero, naming the case, if anything is off.

The kernel applies 1/RMS to its sums instead of rounding the normalised vector to the storage dtype
first (see decode_gemv.py), so in bfloat16 an output may differ from the reference by about an ulp;
the interpreter's truncating float32 -> bfloat16 casts add one more (the tolerances of
_interpret.compare allow a few). The new residual is exact in float32.
"""
from __future__ import annotations

import sys

import torch
from _interpret import BF16, F32, compare, nonzero_randn, start

from flexvlm_env.model.args import ModelArgs
from flexvlm_env.model.decode_gemv import (
    GemvConfig,
    decode_gemv,
    decode_gemv_auto,
    decode_gemv_reference,
    square_parts,
)
from flexvlm_env.model.decoder import KVCache, Transformer, decode_forward_fused

EPS = 1e-5


def float64_reference(x, weight, residual, norm_weight):
    h = x.double() if residual is None else x.double() + residual.double()
    if norm_weight is not None:
        h = h / torch.sqrt((h * h).mean(-1, keepdim=True) + EPS) * norm_weight.double()
    return h @ weight.double().T


def gemv_case(report, n, k, dtype, config, mode):
    x = nonzero_randn(1, k).to(dtype)
    weight = (torch.randn(n, k) * k ** -0.5).to(dtype)
    residual = nonzero_randn(1, k).to(dtype) if mode == "add+norm" else None
    norm_weight = nonzero_randn(k).to(dtype) if mode != "plain" else None
    ref, ref_residual = decode_gemv_reference(x, weight, residual=residual, norm_weight=norm_weight, eps=EPS)
    # float64 from the rounded sum, as both paths norm the dtype-rounded residual + x.
    ref64 = float64_reference(ref_residual if residual is not None else x, weight, None, norm_weight)
    out = torch.full((1, n), float("nan"), dtype=dtype)
    residual_out = torch.full((1, k), float("nan"), dtype=dtype) if residual is not None else None
    problems = []
    for launch in range(2):  # the same buffers twice, as a replayed graph uses them
        got, got_residual = decode_gemv(x, weight, residual=residual, norm_weight=norm_weight, eps=EPS, out=out,
                                        residual_out=residual_out, config=config)
        if got is not out or got_residual is not residual_out:
            problems.append("outputs are not the given buffers")
        compare(f"out (launch {launch})", got, ref, ref64, dtype, problems)
        if residual is not None and not (torch.equal(got_residual, ref_residual) if dtype == F32
                                         else torch.allclose(got_residual.float(), ref_residual.float(), rtol=2 ** -7)):
            problems.append(f"residual_out max diff {(got_residual.float() - ref_residual.float()).abs().max():.2e}")
    report.check(f"decode_gemv N={n} K={k} {dtype} {mode} {config}", problems)


def square_sums_case(report, n, k, rows, dtype, config):
    """Program p of the first square_parts(rows, config) writes the sum of squares of its block_n outputs as
    rounded to the dtype; the others write nothing (the buffer is one element longer and stays NaN)."""
    x, weight = nonzero_randn(1, k).to(dtype), (torch.randn(n, k) * k ** -0.5).to(dtype)
    norm_weight = nonzero_randn(k).to(dtype)
    parts = square_parts(rows, config)
    buffer = torch.full((parts + 1,), float("nan"))
    got, _ = decode_gemv(x, weight, norm_weight=norm_weight, eps=EPS, config=config, square_sums=buffer[:parts])
    expected = got[0, :rows].float().reshape(parts, config.block_n).square().sum(-1)
    problems = []
    if not torch.allclose(buffer[:parts], expected, rtol=1e-5, atol=0):
        problems.append(f"square sums max rel diff {((buffer[:parts] - expected).abs() / expected).max():.2e}")
    if not torch.isnan(buffer[parts]):
        problems.append("wrote past the square sums it was given")
    report.check(f"decode_gemv square_sums N={n} K={k} rows={rows} {dtype} {config}", problems)


def fused_decode_case(report, plan, top_k):
    """One decode token through `decode_forward_fused(impl="triton")` with the Triton MoE, against the
    plain `Transformer.forward` over the same cache (float32: equal to a few ulps)."""
    args = ModelArgs(name="tiny", d_model=64, n_layers=4, n_heads=4, n_experts=8, expert_hidden=32, top_k=4,
                     embedding_size=50, additional_vocab_size=0)
    model = Transformer(args).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1 + 0.2 * torch.randn_like(p) if "norm" in name else 0.3 * torch.randn_like(p))
    max_seq, slot = 40, 29
    caches = [KVCache.allocate(args, 1, max_seq, "cpu", torch.float32) for _ in range(2)]
    for i in range(args.n_layers):
        k, v = torch.randn(1, args.n_heads, max_seq, args.head_dim), torch.randn(1, args.n_heads, max_seq, args.head_dim)
        for cache in caches:
            cache.keys[i].copy_(k)
            cache.values[i].copy_(v)
    x = nonzero_randn(1, 1, args.d_model)
    slot_t = torch.tensor([slot])
    problems = []
    with torch.inference_mode():
        mask = (torch.arange(max_seq) <= slot)[None, None, None, :]
        ref = model(x, slot_t[None], plan, top_k, cache=caches[0], cache_index=slot_t, mask=mask, attend_cache=True)
        model.moe_impl = "triton"
        got = decode_forward_fused(model, x, caches[1], slot_t, plan, top_k, impl="triton")
        # With an LM head: ln_f inside its GEMV, the logits against the head over the plain hidden
        # state (the caches were written by the run above; writing the same rows again changes nothing).
        head = 0.3 * torch.randn(args.embedding_size, args.d_model)
        logits = decode_forward_fused(model, x, caches[1], slot_t, plan, top_k, impl="triton", lm_head_weight=head)
    compare("hidden", got, ref, None, F32, problems)
    compare("logits", logits, torch.nn.functional.linear(ref[:, -1], head), None, F32, problems)
    for i in plan:
        # Values are the projection's raw output: equal up to the GEMV's summation order.
        compare(f"keys[{i}]", caches[1].keys[i], caches[0].keys[i], None, F32, problems)
        compare(f"values[{i}]", caches[1].values[i], caches[0].values[i], None, F32, problems)
    for i in set(range(args.n_layers)) - set(plan):
        if not torch.equal(caches[1].keys[i], caches[0].keys[i]) or not torch.equal(caches[1].values[i], caches[0].values[i]):
            problems.append(f"skipped block {i}'s cache was written")
    if int(caches[1].arrival_counter.item()) != 0:
        problems.append("the router left the arrival counter non-zero")
    report.check(f"decode_forward_fused impl=triton plan={plan} top_k={top_k}", problems)


def main() -> int:
    report, _ = start(__doc__)
    for dtype in (F32, BF16):
        for mode in ("plain", "norm", "add+norm"):
            gemv_case(report, 96, 200, dtype, GemvConfig(8, 64, 4), mode)  # tiles that do not divide N or K
            # MolmoE's K and the H200 tile; N is cut to 64 outputs (32 programs), since the interpreter
            # runs every program in Python and N only repeats what each program does.
            gemv_case(report, 64, 2048, dtype, GemvConfig(2, 512, 2), mode)
            gemv_case(report, 5, 33, dtype, GemvConfig(4, 16, 1), mode)
    x, weight = nonzero_randn(1, 64), torch.randn(48, 64)
    got, _ = decode_gemv_auto(x, weight, impl="triton")
    problems = []
    compare("out", got, decode_gemv_reference(x, weight)[0], None, F32, problems)
    report.check("decode_gemv_auto impl=triton, default config", problems)
    square_sums_case(report, 96, 64, 64, F32, GemvConfig(8, 32, 2))
    square_sums_case(report, 384, 256, 256, BF16, GemvConfig(16, 128, 4))
    fused_decode_case(report, (0, 1, 2, 3), (4, 4, 4, 4))
    fused_decode_case(report, (1, 3), (1, 4, 8, 2))  # blocks 0 and 2 skipped, mixed top_k
    return report.finish()


if __name__ == "__main__":
    sys.exit(main())
