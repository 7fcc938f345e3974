"""Runs the fused decode kernels in Triton's CPU interpreter against the torch references and float64.

Started by tests/test_fused_kernels.py in a subprocess with TRITON_INTERPRET=1, which must be set
before triton is first imported. Outputs and the written cache slot are poisoned with NaN first, so
an element left unwritten shows; every other cache element must come back bit-identical. Exits
non-zero, naming the case, if anything is off.

Interpreter limits (triton 3.9): a float32 -> bfloat16 cast truncates instead of rounding to
nearest, so bfloat16 results may differ from torch by one unit in the last place (exact ids and
rounding are checked by the GPU tests). No tl.dot is used, so bfloat16 inputs are otherwise exact.
"""
from __future__ import annotations

import sys

import torch
from _interpret import BF16, F16, F32, compare, nonzero_randn, start

from flexvlm_env.model.decoder import rope_tables
from flexvlm_env.model.fused_kernels import (
    add_rms_norm_reference,
    embed_token,
    embed_token_auto,
    embedding_reference,
    fused_add_rms_norm,
    fused_add_rms_norm_auto,
    fused_qk_norm_rope_kv,
    fused_qk_norm_rope_kv_auto,
    fused_qk_norm_rope_prefill,
    fused_qk_norm_rope_prefill_auto,
    greedy_token,
    greedy_token_reference,
    new_arrival_counter,
    qk_norm_rope_kv_reference,
    qk_norm_rope_prefill_reference,
    router_topk,
    router_topk_norm,
    router_topk_norm_auto,
    router_topk_norm_reference,
    router_topk_reference,
    softmax_topk,
    softmax_topk_reference,
)

EPS = 1e-5


# ---------------------------------------------------------------------------------------------------


def add_rms_norm_case(report, shape, dtype, in_place=False):
    d = shape[-1]
    x, residual = nonzero_randn(*shape).to(dtype), nonzero_randn(*shape, scale=3.0).to(dtype)
    weight = nonzero_randn(d).to(dtype)
    ref, ref_res = add_rms_norm_reference(x, residual, weight, EPS)
    res64 = x.double() + residual.double()  # float64 from the same inputs
    ref64 = torch.nn.functional.rms_norm(res64, (d,), weight.double(), EPS)
    out = torch.full(shape, float("nan"), dtype=dtype)
    res_in = residual.clone()
    res_out = res_in if in_place else torch.full(shape, float("nan"), dtype=dtype)
    normed, new_res = fused_add_rms_norm(x, res_in, weight, EPS, out=out, residual_out=res_out)
    problems = []
    if normed is not out or new_res is not res_out:
        problems.append("outputs are not the given buffers")
    compare("normed", normed, ref, ref64, dtype, problems)
    compare("new_residual", new_res, ref_res, res64, dtype, problems)
    report.check(f"add_rms_norm {tuple(shape)} {dtype}{' in place' if in_place else ''}", problems)


def random_qk_case(d, n_heads, max_seq, dtype, slot):
    """(qkv, q_norm_w, k_norm_w, cos, sin, key_cache, value_cache, slot) for one decode token."""
    head_dim = d // n_heads
    qkv = nonzero_randn(1, 3 * d, scale=2.0).to(dtype)
    q_w, k_w = nonzero_randn(d).to(dtype), nonzero_randn(d).to(dtype)
    cos, sin = rope_tables(torch.randint(0, 4096, (1, 1)), head_dim, 10000.0)  # [1, 1, hd] at one position
    key_cache = nonzero_randn(1, n_heads, max_seq, head_dim).to(dtype)
    value_cache = nonzero_randn(1, n_heads, max_seq, head_dim).to(dtype)
    return qkv, q_w, k_w, cos[0], sin[0], key_cache, value_cache, torch.tensor([slot])


def qk_norm_rope_prefill_case(report, d, n_heads, t, max_seq, dtype, start=0, impl=None):
    """T tokens written at cache slots start..start+T-1 (slots past the cache write nothing)."""
    head_dim = d // n_heads
    qkv = nonzero_randn(1, t, 3 * d, scale=2.0).to(dtype)
    q_w, k_w = nonzero_randn(d).to(dtype), nonzero_randn(d).to(dtype)
    cos, sin = rope_tables(torch.randint(0, 4096, (1, t)), head_dim, 10000.0)  # [1, T, hd]
    index = torch.arange(start, start + t)
    key_cache = nonzero_randn(1, n_heads, max_seq, head_dim).to(dtype)
    value_cache = nonzero_randn(1, n_heads, max_seq, head_dim).to(dtype)
    written = index[index < max_seq]
    # The reference writes its own caches at in-range slots (its q, k, v do not depend on them).
    ref_index = torch.arange(t)
    ref_cache = nonzero_randn(1, n_heads, max(max_seq, t), head_dim)
    ref_q, ref_kt, ref_vt = qk_norm_rope_prefill_reference(qkv, q_w, k_w, cos, sin, ref_cache.to(dtype), ref_cache.to(dtype),
                                                           ref_index, n_heads, EPS)
    q64, k64, _ = qk_norm_rope_prefill_reference(qkv.double(), q_w.double(), k_w.double(), cos, sin, ref_cache.double(),
                                                 ref_cache.double(), ref_index, n_heads, EPS)
    key_cache[:, :, written] = float("nan")  # poison the slots that must be written
    value_cache[:, :, written] = float("nan")
    before_k, before_v = key_cache.clone(), value_cache.clone()
    run = fused_qk_norm_rope_prefill if impl is None else (
        lambda *a: fused_qk_norm_rope_prefill_auto(*a, impl=impl))
    q, k, v = run(qkv, q_w, k_w, cos, sin, key_cache, value_cache, index, n_heads, EPS)
    problems = []
    for name, out in (("q", q), ("k", k), ("v", v)):
        if tuple(out.shape) != (1, n_heads, t, head_dim) or not out.is_contiguous():
            problems.append(f"{name}: {tuple(out.shape)} contiguous={out.is_contiguous()}")
    compare("q", q, ref_q, q64, dtype, problems)
    compare("k", k, ref_kt, k64, dtype, problems)
    if not torch.equal(v, ref_vt):
        problems.append("v is not the raw v")
    # The cache holds exactly what came back for the tokens whose slot is in range (k and v are checked above).
    in_range = index < max_seq
    if not torch.equal(key_cache[:, :, written], k[:, :, in_range]):
        problems.append("the cache's k differs from the returned k")
    if not torch.equal(value_cache[:, :, written], v[:, :, in_range]):
        problems.append("the cache's v differs from the returned v")
    others = torch.ones(max_seq, dtype=torch.bool)
    others[written] = False
    if not (torch.equal(key_cache[:, :, others], before_k[:, :, others])
            and torch.equal(value_cache[:, :, others], before_v[:, :, others])):
        problems.append("cache elements outside the written slots changed")
    report.check(f"qk_norm_rope_prefill d={d} heads={n_heads} T={t} slots {start}.. of {max_seq} {dtype}"
                 f"{' impl=' + impl if impl else ''}", problems)


def qk_norm_rope_kv_case(report, d, n_heads, max_seq, slot, dtype, impl=None, table=False):
    """`table`: cos/sin passed as [max_seq, head_dim] tables holding the token's row at the slot and noise
    elsewhere (the kernel must read the slot's row)."""
    qkv, q_w, k_w, cos, sin, key_cache, value_cache, slot_t = random_qk_case(d, n_heads, max_seq, dtype, slot)
    rope = (cos, sin)
    if table:
        rope = tuple(torch.randn(max_seq, d // n_heads) for _ in range(2))
        for t, row in zip(rope, (cos, sin)):
            t[min(max(slot, 0), max_seq - 1)] = row[0]
    in_range = 0 <= slot < max_seq
    ref_slot = slot_t if in_range else torch.tensor([0])  # q does not depend on the slot
    ref_k, ref_v = key_cache.clone(), value_cache.clone()
    ref_q = qk_norm_rope_kv_reference(qkv, q_w, k_w, cos, sin, ref_k, ref_v, ref_slot, n_heads, EPS)
    k64, v64 = key_cache.double(), value_cache.double()
    q64 = qk_norm_rope_kv_reference(qkv.double(), q_w.double(), k_w.double(), cos, sin, k64, v64, ref_slot,
                                    n_heads, EPS)
    if in_range:  # poison the slot that must be written
        key_cache[:, :, slot] = float("nan")
        value_cache[:, :, slot] = float("nan")
    before_k, before_v = key_cache.clone(), value_cache.clone()
    out = torch.full((1, n_heads, 1, d // n_heads), float("nan"), dtype=dtype)
    if impl is None:
        q = fused_qk_norm_rope_kv(qkv, q_w, k_w, *rope, key_cache, value_cache, slot_t, n_heads, EPS, out=out)
    else:
        q = fused_qk_norm_rope_kv_auto(qkv, q_w, k_w, *rope, key_cache, value_cache, slot_t, n_heads, EPS,
                                       out=out, impl=impl)
    problems = []
    if q is not out:
        problems.append("q is not the given buffer")
    if table and in_range:  # the reference reads the table at the slot too
        table_q = qk_norm_rope_kv_reference(qkv, q_w, k_w, *rope, ref_k.clone(), ref_v.clone(), ref_slot, n_heads, EPS)
        if not torch.equal(table_q, ref_q):
            problems.append("the reference does not read the tables' row at the slot")
    compare("q", q, ref_q, q64, dtype, problems)
    others = torch.ones(max_seq, dtype=torch.bool)
    if in_range:
        others[slot] = False
        compare("k", key_cache[:, :, slot], ref_k[:, :, slot], k64[:, :, slot], dtype, problems)
        if not torch.equal(value_cache[:, :, slot], ref_v[:, :, slot]):
            problems.append("v written at the slot is not the raw v")
    if not (torch.equal(key_cache[:, :, others], before_k[:, :, others])
            and torch.equal(value_cache[:, :, others], before_v[:, :, others])):
        problems.append("cache elements outside the slot changed")
    report.check(f"qk_norm_rope_kv d={d} heads={n_heads} slot={slot}/{max_seq} {dtype}"
                 f"{' impl=' + impl if impl else ''}{' rope tables' if table else ''}", problems)


def embed_case(report, size, extra_size, d, token, dtype):
    """`embed_token` against `embedding_reference` (exact: a copy), zeros for an id past both tables."""
    table, extra = torch.randn(size, d).to(dtype), torch.randn(extra_size, d).to(dtype)
    ids = torch.tensor([[token]])
    out = torch.full((1, 1, d), float("nan"), dtype=dtype)
    got = embed_token(ids, table, extra, out=out)
    problems = [] if got is out else ["out is not the given buffer"]
    ref = embedding_reference(ids, table, extra) if token < size + extra_size else torch.zeros(1, 1, d, dtype=dtype)
    if not torch.equal(got, ref):
        problems.append("row differs from embedding_reference")
    if not torch.equal(embed_token_auto(ids, table, extra, impl="triton"), got):
        problems.append("embed_token_auto(impl='triton') differs")
    report.check(f"embed_token vocab={size}+{extra_size} d={d} id={token} {dtype}", problems)


def softmax_topk_case(report, num_tokens, num_experts, top_k, dtype):
    """Logits as the gate projection gives them (rounded to the activation dtype); ids exact, weights
    within the dtype's tolerance of the torch reference."""
    for _ in range(20):
        logits = (torch.randn(num_tokens, num_experts) * 3).to(dtype)
        ref_w, ref_ids = softmax_topk_reference(logits, top_k)
        gaps = ref_w[:, :-1] - ref_w[:, 1:] if top_k > 1 else torch.ones(1)
        if bool((gaps > 1e-4).all()):
            break
    out_w = torch.full((num_tokens, top_k), float("nan"))
    out_ids = torch.full((num_tokens, top_k), -1, dtype=torch.int64)
    weights, ids = softmax_topk(logits, top_k, out_w, out_ids)
    problems = []
    # Equal bf16 logits tie; the order among equals may differ from torch.topk's, so compare the
    # logits the chosen ids point at, and that no id repeats.
    if not torch.equal(logits.gather(1, ids), logits.gather(1, ref_ids)) or any(len(set(r)) != top_k for r in ids.tolist()):
        problems.append(f"ids {ids.tolist()} != {ref_ids.tolist()}")
    if not torch.allclose(weights, ref_w, atol=1e-6, rtol=1e-5):
        problems.append(f"weights max err {float((weights - ref_w).abs().max()):.3g}")
    report.check(f"softmax_topk T={num_tokens} E={num_experts} k={top_k} {dtype}", problems)


def ranking_is_clear(sorted_logits, top_k: int, margin: float = 0.05) -> bool:
    """Whether every logit the top k's ranking depends on (the top k, and the next one if any) is
    `margin` apart from its neighbour: a few bf16 ulps of these logits, so the order cannot flip on
    rounding. With top_k = all experts the whole order counts (a draw with a near-tie made such a
    case fail once in 2026-11-29's CI)."""
    n = min(top_k, len(sorted_logits) - 1)
    return n == 0 or float((sorted_logits[:n] - sorted_logits[1:n + 1]).min()) > margin


def router_topk_case(report, d, num_experts, top_k, dtype):
    """The one-launch router against `router_topk_reference` (`MoE.route`): twice through one counter
    (each launch must leave it at zero), ids exact where the reference's top k + 1 logits are apart,
    weights within the dtype's tolerance. The logits are summed in another order than torch's and, in
    bfloat16, rounded by the interpreter's truncating cast: an ulp of the logit at most."""
    for _ in range(50):
        h = nonzero_randn(1, d).to(dtype)
        weight = (torch.randn(num_experts, d) * 3 * d ** -0.5).to(dtype)
        logits = torch.nn.functional.linear(h.double(), weight.double())[0].sort(descending=True).values
        if ranking_is_clear(logits, top_k):
            break
    ref_w, ref_ids = router_topk_reference(h, weight, top_k)
    counter = new_arrival_counter("cpu")
    problems = []
    for launch in range(2):
        out_w = torch.full((1, top_k), float("nan"))
        out_ids = torch.full((1, top_k), -1, dtype=torch.int64)
        weights, ids = router_topk(h, weight, top_k, counter, out_weights=out_w, out_ids=out_ids)
        if weights is not out_w or ids is not out_ids:
            problems.append("outputs are not the given buffers")
        if int(counter.item()) != 0:
            problems.append(f"launch {launch} left the counter at {int(counter.item())}")
        if not torch.equal(ids, ref_ids):
            problems.append(f"launch {launch}: ids {ids.tolist()} != {ref_ids.tolist()}")
        # One bfloat16 ulp of a logit (<= 2^-7 of the largest) moves a weight by up to ~2 ulps relative
        # (its own logit and the softmax's normaliser).
        tol = 1e-5 if dtype == F32 else 2.5 * 2 ** -7 * float(logits.abs().max())
        if not torch.allclose(weights, ref_w, rtol=tol, atol=1e-6):
            problems.append(f"launch {launch}: weights max err {float((weights - ref_w).abs().max()):.3g}")
    report.check(f"router_topk d={d} E={num_experts} k={top_k} {dtype}", problems)


def router_topk_norm_case(report, d, num_experts, top_k, dtype):
    """The router with the residual add + MoE norm inside, against `router_topk_norm_reference`: the
    normed vector and new residual as `add_rms_norm_reference` gives them (within the dtype's
    tolerance: another summation order of the RMS, and the interpreter's bf16 cast); ids and weights as
    `router_topk_reference` gives them for that normed vector (ids where its ranking is clear, weights
    within the router's tolerance), and ids as the reference's where its logits are far apart; the
    counter left at zero."""
    for _ in range(50):
        x, residual = nonzero_randn(1, d).to(dtype), nonzero_randn(1, d, scale=3.0).to(dtype)
        norm_weight = nonzero_randn(d).to(dtype)
        weight = (torch.randn(num_experts, d) * 3 * d ** -0.5).to(dtype)
        normed64 = torch.nn.functional.rms_norm(x.double() + residual.double(), (d,), norm_weight.double(), EPS)
        logits = torch.nn.functional.linear(normed64, weight.double())[0].sort(descending=True).values
        if ranking_is_clear(logits, top_k):
            break
    _, ref_ids, ref_normed, ref_res = router_topk_norm_reference(x, residual, norm_weight, EPS, weight, top_k)
    counter = new_arrival_counter("cpu")
    normed_out, res_out = torch.full((1, d), float("nan"), dtype=dtype), torch.full((1, d), float("nan"), dtype=dtype)
    weights, ids, normed, new_res = router_topk_norm(x, residual, norm_weight, EPS, weight, top_k, counter,
                                                     normed_out=normed_out, residual_out=res_out)
    problems = []
    if normed is not normed_out or new_res is not res_out:
        problems.append("outputs are not the given buffers")
    if int(counter.item()) != 0:
        problems.append(f"the counter was left at {int(counter.item())}")
    compare("new_residual", new_res, ref_res, x.double() + residual.double(), dtype, problems)
    compare("normed", normed, ref_normed, normed64.to(torch.float64), dtype, problems)
    # The router part against `router_topk_reference` of the kernel's own normed vector: in bfloat16 that
    # vector may differ from the reference's by an ulp per element (checked just above), which moves a
    # logit by up to sum_i |w_i| ulp(normed_i), ~0.1 at d = 64 (a draw where that made a weight 11% off
    # failed 2026-11-29's CI, seed 18083344971980947658). What is left is the router's own rounding.
    own_logits = torch.nn.functional.linear(normed.double(), weight.double())[0].sort(descending=True).values
    own_w, own_ids = router_topk_reference(normed, weight, top_k)
    if ranking_is_clear(own_logits, top_k) and not torch.equal(ids, own_ids):
        problems.append(f"ids {ids.tolist()} != {own_ids.tolist()}")
    if ranking_is_clear(logits, top_k, margin=0.25) and not torch.equal(ids, ref_ids):
        problems.append(f"ids {ids.tolist()} != the reference's {ref_ids.tolist()}")
    tol = 1e-5 if dtype == F32 else 2.5 * 2 ** -7 * float(own_logits.abs().max())
    if not torch.allclose(weights, own_w, rtol=tol, atol=1e-6):
        problems.append(f"weights max err {float((weights - own_w).abs().max()):.3g}")
    auto = router_topk_norm_auto(x, residual, norm_weight, EPS, weight, top_k, counter, impl="triton")
    if not (torch.equal(auto[1], ids) and torch.equal(auto[2], normed)):
        problems.append("router_topk_norm_auto(impl='triton') differs")
    report.check(f"router_topk_norm d={d} E={num_experts} k={top_k} {dtype}", problems)


def greedy_token_case(report, vocab, dtype, block_v, where=None):
    """The one-launch argmax against torch's: twice through one counter (left at zero each time).
    `where` plants the maximum: "tie" puts it at two indices in different programs (the first must
    win), "last" at the final logit (the partial block's masked tail), "first" at index 0."""
    logits = nonzero_randn(1, vocab).to(dtype)
    top = float(logits.abs().max()) + 1.0
    if where == "tie":
        logits[0, [vocab // 2 + 1, vocab - 2]] = top
    elif where == "last":
        logits[0, -1] = top
    elif where == "first":
        logits[0, 0] = top
    ref = greedy_token_reference(logits)
    counter = new_arrival_counter("cpu")
    problems = []
    for launch in range(2):
        out = torch.full((1, 1), -1, dtype=torch.int64)
        got = greedy_token(logits, counter, out=out, block_v=block_v)
        if got is not out:
            problems.append("out is not the given buffer")
        if not torch.equal(got, ref):
            problems.append(f"launch {launch}: token {got.tolist()} != {ref.tolist()}")
        if int(counter.item()) != 0:
            problems.append(f"launch {launch} left the counter at {int(counter.item())}")
    report.check(f"greedy_token V={vocab} block_v={block_v} {dtype} {where or 'random'}", problems)


def greedy_advance_case(report):
    """`advance`: each launch writes its token to out, to history[slot + 1], and moves slot on by one,
    as a self-advancing decode graph needs; the rest of history is untouched."""
    counter, slot = new_arrival_counter("cpu"), torch.tensor([5])
    history = torch.full((12,), -1, dtype=torch.int64)
    out = torch.full((1, 1), -1, dtype=torch.int64)
    expected, problems = history.clone(), []
    for launch in range(3):
        logits = nonzero_randn(1, 300)
        ref = greedy_token_reference(logits)
        expected[6 + launch] = ref.item()
        got = greedy_token(logits, counter, out=out, block_v=64, advance=(slot, history))
        if got is not out or not torch.equal(out, ref):
            problems.append(f"launch {launch}: out {out.tolist()} != {ref.tolist()}")
        if int(slot.item()) != 6 + launch:
            problems.append(f"launch {launch}: slot {int(slot.item())} != {6 + launch}")
        if int(counter.item()) != 0:
            problems.append(f"launch {launch} left the counter at {int(counter.item())}")
    if not torch.equal(history, expected):
        problems.append(f"history {history.tolist()} != {expected.tolist()}")
    report.check("greedy_token advance=(slot, history)", problems)


def main() -> int:
    report, _ = start(__doc__)
    for dtype in (F32, F16, BF16):
        for shape in ((1, 64), (3, 96), (8, 2048), (1, 1, 2048)):
            add_rms_norm_case(report, shape, dtype)
    add_rms_norm_case(report, (2, 96), BF16, in_place=True)
    args = (nonzero_randn(2, 64), nonzero_randn(2, 64), nonzero_randn(64), EPS)
    normed, new_res = fused_add_rms_norm_auto(*args, impl="triton")
    ref, ref_res = add_rms_norm_reference(*args)
    problems = []
    compare("normed", normed, ref, None, F32, problems)
    compare("new_residual", new_res, ref_res, None, F32, problems)
    report.check("add_rms_norm_auto impl=triton", problems)

    max_seq = 9
    for dtype in (F32, F16, BF16):
        for d in (64, 96, 2048):
            for n_heads in (4, 16):
                for slot in (0, max_seq // 2, max_seq - 1):
                    qk_norm_rope_kv_case(report, d, n_heads, max_seq, slot, dtype)
    qk_norm_rope_kv_case(report, 64, 4, max_seq, max_seq, F32)  # out of range: must write nothing
    qk_norm_rope_kv_case(report, 96, 4, max_seq, 3, BF16, impl="triton")
    for slot in (0, 5, max_seq - 1, max_seq):
        qk_norm_rope_kv_case(report, 96, 4, max_seq, slot, BF16, table=True)
    for dtype in (F32, F16, BF16):
        for d, n_heads, t in ((64, 4, 1), (96, 4, 7), (2048, 16, 5)):
            qk_norm_rope_prefill_case(report, d, n_heads, t, 9, dtype)
    qk_norm_rope_prefill_case(report, 96, 4, 6, 9, BF16, start=2)
    qk_norm_rope_prefill_case(report, 64, 4, 5, 9, F32, start=7)  # the last 3 tokens fall past the cache
    qk_norm_rope_prefill_case(report, 64, 4, 3, 9, BF16, impl="triton")
    for size, extra_size, d, token in ((50, 0, 64, 7), (50, 0, 2048, 49), (50, 8, 96, 3), (50, 8, 96, 50),
                                       (50, 8, 96, 57), (50, 8, 96, 58)):
        for dtype in (F32, BF16):
            embed_case(report, size, extra_size, d, token, dtype)

    for dtype in (F32, BF16):
        for num_experts, top_k in ((8, 1), (8, 8), (64, 1), (64, 8), (64, 64), (100, 3)):
            softmax_topk_case(report, 3, num_experts, top_k, dtype)
    for dtype in (F32, BF16):
        for d, num_experts, top_k in ((2048, 64, 8), (2048, 64, 1), (200, 16, 4), (96, 100, 3), (64, 8, 8)):
            router_topk_case(report, d, num_experts, top_k, dtype)
            router_topk_norm_case(report, d, num_experts, top_k, dtype)
    for dtype in (F32, BF16):
        for vocab, block_v in ((50304, 2048), (1000, 256), (300, 16), (16, 16), (1, 16)):
            greedy_token_case(report, vocab, dtype, block_v)
        for where in ("tie", "last", "first"):
            greedy_token_case(report, 1000, dtype, 64, where)
    greedy_advance_case(report)
    return report.finish()


if __name__ == "__main__":
    sys.exit(main())
