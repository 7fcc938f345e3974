"""Generation as plain functions (gpt-fast style): embed, prefill, decode one token, CUDA graphs.

`prefill` runs the active blocks over the whole input and writes the static KV cache from slot 0;
`decode_one_token` runs one token against the cache. On CUDA the decode step is captured once per
(block plan, top_k) combination in a `torch.cuda.CUDAGraph` and replayed: knob values are plain
Python ints, so each combination is its own graph, built on first use and kept (nothing is
recompiled when the knobs change between requests).
"""
from __future__ import annotations

import torch

from .decoder import KVCache
from .molmoe import MolmoE


def embed_inputs(model: MolmoE, input_ids: torch.Tensor, features: torch.Tensor | None, image_input_idx: torch.Tensor | None) -> torch.Tensor:
    """Token embeddings [1, L, d] with image features ADDED at their positions (MolmoE keeps the
    <im_patch> embedding in the sum)."""
    embeds = model.transformer.wte(input_ids)
    if features is not None:
        flat_idx = image_input_idx.reshape(-1)
        valid = flat_idx >= 0
        embeds[0].index_add_(0, flat_idx[valid], features.reshape(-1, features.shape[-1])[valid].to(embeds.dtype))
    return embeds


def prefill(model: MolmoE, embeds: torch.Tensor, plan, top_k, cache: KVCache | None) -> torch.Tensor:
    """Logits of the last position [1, V] after running the plan over embeds [1, L, d]."""
    length = embeds.shape[1]
    slots = torch.arange(length, device=embeds.device)
    hidden = model.transformer(embeds, slots[None], plan, top_k, cache=cache, cache_index=slots)
    return model.lm_head(hidden[:, -1])


def decode_one_token(
    model: MolmoE, token: torch.Tensor, slot: torch.Tensor, plan, top_k, cache: KVCache,
    slot_range: torch.Tensor | None = None, cache_len: int | None = None,
) -> torch.Tensor:
    """Greedy next token [1, 1] for `token` [1, 1] at cache slot `slot` [1] (= its position).

    With `slot_range` (CUDA graphs: static shapes) attention covers the whole buffer under a mask
    computed on the device; without it (eager) it covers the first `cache_len` = slot + 1 slots.
    """
    embeds = model.transformer.wte(token)
    mask = (slot_range <= slot)[None, None, None, :] if slot_range is not None else None
    if mask is None and cache_len is None:
        raise ValueError("decode_one_token needs slot_range (graph path) or cache_len (eager path)")
    hidden = model.transformer(
        embeds, slot[None], plan, top_k, cache=cache, cache_index=slot, mask=mask, attend_cache=True, cache_len=cache_len
    )
    return model.lm_head(hidden[:, -1]).argmax(dim=-1, keepdim=True)


class DecodeGraphs:
    """One captured decode step per (plan, top_k), sharing static input/output buffers and the cache."""

    def __init__(self, model: MolmoE, cache: KVCache):
        device = cache.keys[0].device
        self.model, self.cache = model, cache
        self.token = torch.zeros(1, 1, dtype=torch.long, device=device)
        self.slot = torch.zeros(1, dtype=torch.long, device=device)
        self.slot_range = torch.arange(cache.max_seq, device=device)
        self.graphs: dict[tuple, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.pool = None
        self.capture_ms: dict[tuple, float] = {}

    def _capture(self, key):
        plan, top_k = key
        import time

        start = time.perf_counter()
        # Warm up on a side stream first (Triton compiles, cuBLAS picks kernels), as CUDA graphs require.
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                decode_one_token(self.model, self.token, self.slot, plan, top_k, self.cache, self.slot_range)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            out = decode_one_token(self.model, self.token, self.slot, plan, top_k, self.cache, self.slot_range)
        self.pool = graph.pool()
        torch.cuda.synchronize()
        self.capture_ms[key] = (time.perf_counter() - start) * 1e3
        self.graphs[key] = (graph, out)

    def step(self, token: torch.Tensor, slot: int, plan, top_k) -> torch.Tensor:
        key = (tuple(plan), tuple(top_k))
        if key not in self.graphs:
            # Capturing writes garbage into the cache slot in use; capture before this slot is filled.
            self.slot.fill_(slot)
            self.token.copy_(token)
            self._capture(key)
        self.token.copy_(token)
        self.slot.fill_(slot)
        graph, out = self.graphs[key]
        graph.replay()
        return out.clone()
