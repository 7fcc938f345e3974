"""Generation as plain functions (gpt-fast style): embed, prefill, decode one token, CUDA graphs.

`prefill` runs the active blocks over the whole input and writes the static KV cache from slot 0;
`decode_one_token` runs one token against the cache. On CUDA every stage runs as a captured
`torch.cuda.CUDAGraph` (see `CudaGraphs`): knob values are plain Python ints, so each combination
is its own graph, built on first use (or by `VLM.warmup`) and kept; nothing is recompiled when the
knobs change between requests, and no Python or launch overhead lands in the measured latency.
"""
from __future__ import annotations

import time

import torch
from torch import nn

from .decoder import KVCache, decode_forward_fused
from .fused_kernels import embed_token_auto, greedy_token, greedy_token_auto
from .molmoe import MolmoE


def feature_positions(image_input_idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(sequence positions, feature rows) of the cells that receive a feature; computed on the host
    so that no device-to-host sync (boolean indexing) happens mid-request."""
    flat = image_input_idx.reshape(-1)
    rows = torch.nonzero(flat >= 0).flatten()
    return flat[rows], rows


def embed_inputs(model: MolmoE, input_ids: torch.Tensor, features: torch.Tensor | None, image_input_idx: torch.Tensor | None) -> torch.Tensor:
    """Token embeddings [1, L, d] with image features ADDED at their positions (MolmoE keeps the
    <im_patch> embedding in the sum)."""
    embeds = model.transformer.wte(input_ids)
    if features is not None:
        positions, rows = feature_positions(image_input_idx.cpu())
        device = embeds.device
        flat = features.reshape(-1, features.shape[-1]).index_select(0, rows.to(device, non_blocking=True))
        embeds[0].index_add_(0, positions.to(device, non_blocking=True), flat.to(embeds.dtype))
    return embeds


def prefill(model: MolmoE, embeds: torch.Tensor, plan, top_k, cache: KVCache | None) -> torch.Tensor:
    """Logits of the last position [1, V] after running the plan over embeds [1, L, d]."""
    length = embeds.shape[1]
    slots = torch.arange(length, device=embeds.device)
    hidden = model.transformer(embeds, slots[None], plan, top_k, cache=cache, cache_index=slots)
    return model.lm_head(hidden[:, -1])


def decode_one_token(
    model: MolmoE, token: torch.Tensor, slot: torch.Tensor, plan, top_k, cache: KVCache,
    slot_range: torch.Tensor | None = None, cache_len: int | None = None, fused: bool = False,
    return_logits: bool = False, history: torch.Tensor | None = None,
) -> torch.Tensor:
    """Greedy next token [1, 1] for `token` [1, 1] at cache slot `slot` [1] (= its position).

    With `slot_range` (CUDA graphs: static shapes) attention covers the whole buffer under a mask
    computed on the device; without it (eager) it covers the first `cache_len` = slot + 1 slots.
    `fused` (CUDA path) runs `decode_forward_fused`: same arithmetic, a quarter of the launches, and
    attention that reads only the filled slots whatever the buffer size; its embedding lookup is
    `fused_kernels.embed_token` (one launch), a plain-Linear LM head runs as `decode_gemv` with ln_f
    inside, and its argmax is `fused_kernels.greedy_token` (the same token: the first index of the
    largest logit). `history` (fused only; int64 [> slot + 1]) makes the step advance itself on the
    device (`CudaGraphs.decode`): the next token is written into `token` (the input buffer) and to
    history[slot + 1], and `slot` moves on by one, so a graph of the step replays again as it is.
    `return_logits` returns the logits [1, V] instead of the greedy token (tests, analysis).
    """
    if slot_range is None and cache_len is None:
        raise ValueError("decode_one_token needs slot_range (graph path) or cache_len (eager path)")
    if history is not None and not fused:
        raise ValueError("history needs fused=True (the greedy_token kernel writes the step's next inputs)")
    if fused:
        wte = model.transformer.wte
        embeds = embed_token_auto(token, wte.embedding, wte.new_embedding)
        plain_head = type(model.lm_head) is nn.Linear
        out = decode_forward_fused(model.transformer, embeds, cache, slot, plan, top_k,
                                   lm_head_weight=model.lm_head.weight if plain_head else None)
        logits = out if plain_head else model.lm_head(out[:, -1])
    else:
        embeds = model.transformer.wte(token)
        mask = (slot_range <= slot)[None, None, None, :] if slot_range is not None else None
        hidden = model.transformer(
            embeds, slot[None], plan, top_k, cache=cache, cache_index=slot, mask=mask, attend_cache=True, cache_len=cache_len
        )
        logits = model.lm_head(hidden[:, -1])
    if return_logits:
        return logits
    if fused:
        # The argmax read by the whole GPU, one launch (torch's reduces the row in one thread block).
        if history is not None:
            return greedy_token(logits, cache.arrival_counter, out=token, advance=(slot, history))
        return greedy_token_auto(logits, cache.arrival_counter)
    return logits.argmax(dim=-1, keepdim=True)


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


class CudaGraphs:
    """CUDA graphs of the three GPU stages, captured on first use and replayed afterwards.

    - vision encoder + projector, one graph per crop count (the only thing that changes its shapes);
    - prefill, one per (plan, top_k, input length rounded up to `prefill_bucket`): the padding goes
      after the real tokens, so causal attention keeps it out of every real position, its keys and
      values land in cache slots that decoding overwrites before reading, and the first token is
      read at the last real position;
    - decode, one per (plan, top_k).
    All graphs share one memory pool; each graph's outputs stay allocated, and intermediates are only
    live during a replay, so sharing is safe for the strictly sequential replays of one request.
    """

    def __init__(self, model: MolmoE, cache: KVCache, prefill_bucket: int = 64, fused_decode: bool = True):
        self.model, self.cache, self.prefill_bucket = model, cache, prefill_bucket
        self.fused_decode = fused_decode
        self.device = cache.keys[0].device
        self.dtype = cache.keys[0].dtype
        self.slot_range = torch.arange(cache.max_seq, device=self.device)
        self.pool = torch.cuda.graph_pool_handle()
        self.graphs: dict[tuple, tuple[torch.cuda.CUDAGraph, dict, torch.Tensor]] = {}
        self.capture_ms: dict[tuple, float] = {}
        # Per self-advancing decode graph: (slot, token) its inputs hold after the last replay.
        self._advanced: dict[tuple, tuple[int, torch.Tensor]] = {}

    def _run(self, key, make_inputs, fn, fill) -> torch.Tensor:
        """Replay the graph for `key`, capturing it first if needed; `fill(inputs)` writes this call's data."""
        if key not in self.graphs:
            start = time.perf_counter()
            inputs = make_inputs()
            fill(inputs)
            # Warm up on a side stream (Triton compiles, cuBLAS picks its kernels), as capture requires.
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                for _ in range(2):
                    fn(inputs)
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool):
                out = fn(inputs)
            torch.cuda.synchronize()
            self.graphs[key] = (graph, inputs, out)
            self.capture_ms[key] = (time.perf_counter() - start) * 1e3
        graph, inputs, out = self.graphs[key]
        fill(inputs)
        graph.replay()
        return out

    def vision(self, images: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        """Pooled features [crops, cells, W] from pixels and masks (valid until the next call with
        the same crop count)."""
        backbone = self.model.vision_backbone

        def make_inputs():
            # float32 like the preprocessed pixels; the cast to the model dtype happens in the graph.
            return {
                "images": torch.empty(images.shape, dtype=images.dtype, device=self.device),
                "masks": torch.empty(masks.shape, dtype=masks.dtype, device=self.device),
            }

        def fill(inputs):
            inputs["images"].copy_(images, non_blocking=True)
            inputs["masks"].copy_(masks, non_blocking=True)

        def fn(inputs):
            return backbone.encode(inputs["images"].to(self.dtype), inputs["masks"])

        return self._run(("vision", images.shape[0]), make_inputs, fn, fill)

    def projector(self, pooled: torch.Tensor) -> torch.Tensor:
        """Projected features; `pooled` must be the output buffer of `vision` (read in place)."""
        project = self.model.vision_backbone.project
        return self._run(("projector", pooled.shape[0]), lambda: {"pooled": pooled}, lambda i: project(i["pooled"]), lambda i: None)

    def prefill(self, embeds: torch.Tensor, plan, top_k) -> torch.Tensor:
        """First greedy token [1, 1] for embeds [1, L, d]; writes cache slots 0..L-1 (and padding after)."""
        length = embeds.shape[1]
        padded = min(_round_up(length, self.prefill_bucket), self.cache.max_seq)

        def make_inputs():
            return {
                "embeds": torch.zeros(1, padded, embeds.shape[2], dtype=self.dtype, device=self.device),
                "last": torch.zeros(1, dtype=torch.long, device=self.device),
                "slots": torch.arange(padded, device=self.device),
            }

        def fill(inputs):
            inputs["embeds"][:, :length].copy_(embeds)
            inputs["embeds"][:, length:].zero_()
            inputs["last"].fill_(length - 1)

        def fn(inputs):
            slots = inputs["slots"]
            hidden = self.model.transformer(inputs["embeds"], slots[None], plan, top_k, cache=self.cache, cache_index=slots)
            return self.model.lm_head(hidden.index_select(1, inputs["last"])[:, 0]).argmax(dim=-1, keepdim=True)

        return self._run(("prefill", tuple(plan), tuple(top_k), padded), make_inputs, fn, fill).clone()

    def decode(self, token: torch.Tensor, slot: int, plan, top_k) -> torch.Tensor:
        """Next greedy token [1, 1] after `token` at cache slot `slot`.

        With the fused step the graph advances itself (`decode_one_token`'s `history`): when `token`
        is what the previous call on this graph returned and `slot` follows its slot, the inputs
        already hold them and the replay is the only work queued, no copies. The returned token is
        then a view of the graph's history buffer, valid until a later request decodes over that
        slot with the same (plan, top_k): read it, or clone it, before then.
        """
        key = ("decode", tuple(plan), tuple(top_k))

        def make_inputs():
            inputs = {"token": torch.zeros(1, 1, dtype=torch.long, device=self.device),
                      "slot": torch.zeros(1, dtype=torch.long, device=self.device)}
            if self.fused_decode:
                # One more than max_seq: the last step writes history[slot + 1].
                inputs["history"] = torch.zeros(self.cache.max_seq + 1, dtype=torch.long, device=self.device)
            return inputs

        def fill(inputs):
            state = self._advanced.get(key)
            if state is not None and state[0] == slot and state[1] is token:
                return
            inputs["token"].copy_(token)
            inputs["slot"].fill_(slot)

        def fn(inputs):
            return decode_one_token(
                self.model, inputs["token"], inputs["slot"], plan, top_k, self.cache, self.slot_range, fused=self.fused_decode,
                history=inputs.get("history"),
            )

        out = self._run(key, make_inputs, fn, fill)
        if not self.fused_decode:
            # Clone: the output buffer is overwritten by the next replay.
            return out.clone()
        # What the graph's inputs hold now (a capture's warm-up runs advanced them too, but `_run`
        # fills again before the replay).
        graph_inputs = self.graphs[key][1]
        next_token = graph_inputs["history"][slot + 1:slot + 2].view(1, 1)
        self._advanced[key] = (slot + 1, next_token)
        return next_token
