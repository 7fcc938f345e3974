"""Runs the split-KV decode attention kernels in Triton's CPU interpreter against the torch reference
and float64.

Started by tests/test_decode_attention.py in a subprocess with TRITON_INTERPRET=1, which must be set
before triton is first imported. The output and the workspace are poisoned with NaN first, so an
element left unwritten (a neutral split included) shows, and cache slots after the attended one hold
NaN keys and inf values: a kernel that reads any of them gives a non-finite output. Exits non-zero,
naming the case, if anything is off.

Interpreter limits (triton 3.9): a float32 -> bfloat16 cast truncates instead of rounding to
nearest, so a bfloat16 output may differ from torch by one unit in the last place (the tolerances of
_interpret.compare, a few ulps, allow it; the GPU tests check the compiled kernel). No tl.dot is
used, so bfloat16 inputs are otherwise exact.
"""
from __future__ import annotations

import math
import sys

import torch
from _interpret import BF16, F16, F32, compare, nonzero_randn, start

from flexvlm_env.model.decode_attention import (
    decode_attention,
    decode_attention_auto,
    decode_attention_qk,
    decode_attention_qk_reference,
    decode_attention_reference,
    split_plan,
)
from flexvlm_env.model.decoder import rope_tables

# (max_seq, heads, head_dim): 200 is not a multiple of the chunk (128) nor of the key tile.
SHAPES = [(64, 2, 32), (64, 16, 128), (200, 2, 128), (200, 16, 32), (2048, 2, 32)]
LARGE = (2048, 16, 128)  # the decoder's shape: over 1 s a call in the interpreter, so two slots


def random_case(max_seq, n_heads, head_dim, dtype):
    """(q, key_cache, value_cache): q scaled up so the softmax is peaked and splits' maxima differ."""
    q = nonzero_randn(1, n_heads, 1, head_dim, scale=2.0).to(dtype)
    key_cache = nonzero_randn(1, n_heads, max_seq, head_dim).to(dtype)
    value_cache = nonzero_randn(1, n_heads, max_seq, head_dim).to(dtype)
    return q, key_cache, value_cache


def float64_attention(q, key_cache, value_cache, slot):
    """Direct formula over the visible prefix only (no mask), in float64 from the same inputs."""
    k, v = key_cache[:, :, :slot + 1].double(), value_cache[:, :, :slot + 1].double()
    probs = torch.softmax(q.double() @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1)
    return probs @ v


def poison_after_(key_cache, value_cache, slot):
    key_cache[:, :, slot + 1:] = float("nan")
    value_cache[:, :, slot + 1:] = float("inf")


def slots_of(max_seq, head_dim, num_splits=None):
    _, chunk, _ = split_plan(max_seq, head_dim, num_splits)
    return sorted({0, chunk - 1, min(chunk, max_seq - 1), max_seq // 2 + 1, max_seq - 1})


def attention_case(report, max_seq, n_heads, head_dim, slot, dtype, num_splits=None, slot_dtype=torch.int64,
                   impl=None):
    q, key_cache, value_cache = random_case(max_seq, n_heads, head_dim, dtype)
    slot_t = torch.tensor([slot], dtype=slot_dtype)
    ref = decode_attention_reference(q, key_cache, value_cache, slot_t)
    ref64 = float64_attention(q, key_cache, value_cache, slot)
    poison_after_(key_cache, value_cache, slot)
    splits, _, _ = split_plan(max_seq, head_dim, num_splits)
    out = torch.full(q.shape, float("nan"), dtype=dtype)
    workspace = torch.full((n_heads, splits, head_dim + 2), float("nan"))
    if impl is None:
        got = decode_attention(q, key_cache, value_cache, slot_t, num_splits=num_splits, workspace=workspace, out=out)
    else:
        got = decode_attention_auto(q, key_cache, value_cache, slot_t, impl=impl, num_splits=num_splits,
                                    workspace=workspace, out=out)
    problems = []
    if got is not out:
        problems.append("out is not the given buffer")
    compare("out", got, ref, ref64, dtype, problems)
    report.check(f"decode_attention S={max_seq} heads={n_heads} hd={head_dim} slot={slot} {dtype}"
                 f"{f' splits={num_splits}' if num_splits else ''}"
                 f"{f' slot {slot_dtype}' if slot_dtype != torch.int64 else ''}"
                 f"{' impl=' + impl if impl else ''}", problems)


def qk_case(report, max_seq, n_heads, head_dim, slot, dtype, block_rows=4, table=True):
    """decode_attention_qk (q/k norms, RoPE and the cache writes inside the split programs) against its
    reference: the output, and the caches written at the slot (k normed and rotated, v raw) and nowhere else.
    square_sums are what decode_gemv writes: per block of `block_rows` rounded outputs, the sum of squares."""
    d = n_heads * head_dim
    qkv = nonzero_randn(1, 3 * d).to(dtype)
    q_w, k_w = (1 + 0.2 * torch.randn(d)).to(dtype), (1 + 0.2 * torch.randn(d)).to(dtype)
    square_sums = qkv[0, : 2 * d].float().reshape(2, d // block_rows, block_rows).square().sum(-1)
    cos, sin = rope_tables(torch.arange(max_seq), head_dim, 10_000.0)
    if not table:
        cos, sin = cos[slot % max_seq][None], sin[slot % max_seq][None]
    _, key_cache, value_cache = random_case(max_seq, n_heads, head_dim, dtype)
    key_ref, value_ref = key_cache.clone(), value_cache.clone()
    slot_t = torch.tensor([slot])
    ref = decode_attention_qk_reference(qkv, square_sums, q_w, k_w, cos, sin, key_ref, value_ref, slot_t, n_heads, 1e-5)
    # Slots after the attended one are never read: poisoned in the kernel's caches (not written by it either).
    poison_after_(key_cache, value_cache, slot)
    key_ref[:, :, slot + 1:], value_ref[:, :, slot + 1:] = key_cache[:, :, slot + 1:], value_cache[:, :, slot + 1:]
    out = torch.full((1, n_heads, 1, head_dim), float("nan"), dtype=dtype)
    got = decode_attention_qk(qkv, square_sums, q_w, k_w, cos, sin, key_cache, value_cache, slot_t, n_heads, 1e-5,
                              out=out)
    problems = [] if got is out else ["out is not the given buffer"]
    compare("out", got, ref, None, dtype, problems)
    compare("key at the slot", key_cache[:, :, slot], key_ref[:, :, slot], None, dtype, problems)
    if not torch.equal(value_cache[:, :, slot], value_ref[:, :, slot]):
        problems.append("value at the slot is not the raw v")
    for name, got_cache, ref_cache in (("key", key_cache, key_ref), ("value", value_cache, value_ref)):
        others = torch.ones(max_seq, dtype=torch.bool)
        others[slot] = False
        if not torch.equal(got_cache[:, :, others].nan_to_num(), ref_cache[:, :, others].nan_to_num()):
            problems.append(f"{name} cache changed outside the slot")
    report.check(f"decode_attention_qk S={max_seq} heads={n_heads} hd={head_dim} slot={slot} {dtype}"
                 f"{'' if table else ' one rope row'}", problems)


def slot_past_the_end_case(report):
    # Not range-checked on the host (that would sync): a slot >= max_seq attends the whole cache, as
    # the reference's mask arange(max_seq) <= slot does.
    q, key_cache, value_cache = random_case(200, 2, 32, F32)
    problems = []
    for slot in (200, 10_000):
        got = decode_attention(q, key_cache, value_cache, torch.tensor([slot]))
        compare(f"out slot={slot}", got, decode_attention_reference(q, key_cache, value_cache, torch.tensor([slot])),
                float64_attention(q, key_cache, value_cache, 199), F32, problems)
    report.check("decode_attention slot >= max_seq attends every slot", problems)


def reused_buffers_case(report, dtype):
    # As in a replayed CUDA graph: the same slot tensor, workspace and output, new slot values written
    # in between; caches hold finite stale values after the slot, as the decoder's do.
    max_seq, n_heads, head_dim = 200, 4, 64
    q, key_cache, value_cache = random_case(max_seq, n_heads, head_dim, dtype)
    slot_t = torch.zeros(1, dtype=torch.long)
    splits, _, _ = split_plan(max_seq, head_dim)
    out = torch.empty(q.shape, dtype=dtype)
    workspace = torch.empty(n_heads, splits, head_dim + 2)
    problems = []
    for slot in (150, 3, 199, 0, 127):
        slot_t.fill_(slot)
        out.fill_(float("nan"))
        decode_attention(q, key_cache, value_cache, slot_t, workspace=workspace, out=out)
        compare(f"out slot={slot}", out, decode_attention_reference(q, key_cache, value_cache, slot_t),
                float64_attention(q, key_cache, value_cache, slot), dtype, problems)
    report.check(f"decode_attention reused slot/workspace/out {dtype}", problems)


def main() -> int:
    report, _ = start(__doc__)
    for dtype in (F32, F16, BF16):
        for max_seq, n_heads, head_dim in SHAPES:
            slots = slots_of(max_seq, head_dim)
            for slot in slots if dtype != F16 else slots[-2:]:  # float16: the same code as bfloat16
                attention_case(report, max_seq, n_heads, head_dim, slot, dtype)
    attention_case(report, *LARGE, 1300, BF16)
    attention_case(report, *LARGE, 127, F32)  # the last key of the first chunk: 15 neutral splits
    # Other splittings: one split looping over several tiles, chunks not a multiple of the tile (67,
    # 293), single-key chunks, and splits that start past the end of the cache (64 in 24 chunks of 3).
    for max_seq, head_dim, num_splits in ((200, 128, 1), (200, 128, 3), (2048, 32, 7), (64, 32, 64), (64, 32, 24)):
        for slot in slots_of(max_seq, head_dim, num_splits):
            attention_case(report, max_seq, 2, head_dim, slot, BF16 if num_splits == 3 else F32, num_splits)
    attention_case(report, 200, 2, 32, 150, F32, slot_dtype=torch.int32)
    attention_case(report, 200, 2, 32, 150, BF16, impl="triton")
    for max_seq, n_heads, head_dim in ((64, 2, 32), (200, 4, 64)):
        for slot in slots_of(max_seq, head_dim):
            qk_case(report, max_seq, n_heads, head_dim, slot, F32)
    qk_case(report, 200, 2, 32, 137, BF16)
    qk_case(report, 64, 2, 32, 40, BF16, block_rows=16, table=False)
    slot_past_the_end_case(report)
    for dtype in (F32, BF16):
        reused_buffers_case(report, dtype)
    return report.finish()


if __name__ == "__main__":
    sys.exit(main())
