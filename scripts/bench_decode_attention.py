"""Micro-benchmark of the split-KV decode attention: time per call against the split count; writes JSON.

One decode query per head over a static bf16 cache of the model's shape (heads, head_dim, the
runtime's max_seq), `--visible` keys visible (the slot + 1), for each split count in `--chunks`
(keys per split, as `decode_attention.DEFAULT_CHUNK` sets it). Each point is a CUDA graph of
`--num-caches` calls in a row, each over its own cache, like a decode step through the blocks, so L2
serves no repeat reads; the median replay over the calls is the time per call. Achieved GB/s counts
the visible keys' and values' bytes. Every point is first checked against the float32 reference.

    python scripts/bench_decode_attention.py --out results/bench_decode_attention_h200.json
    python scripts/bench_decode_attention.py --dry-run --out /tmp/attn_dry.json   # CPU, reference path
"""
from __future__ import annotations

import dataclasses
import json
import platform
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import tyro

from flexvlm_env.benchmarking import device_info, median_ms_graph, median_ms_host
from flexvlm_env.model.args import PRESETS
from flexvlm_env.model.decode_attention import (
    DEFAULT_CHUNK,
    DEFAULT_WARPS,
    decode_attention,
    decode_attention_reference,
    split_plan,
)
from flexvlm_env.model.runtime import DEFAULT_MAX_SEQ_LEN


@dataclass
class Args:
    out: str = "results/bench_decode_attention.json"
    """where the JSON goes"""
    presets: tuple[str, ...] = ("molmoe-1b", "micro")
    """model shapes (heads, head_dim, the runtime's max_seq)"""
    visible: tuple[int, ...] = (336, 1280)
    """visible keys (slot + 1) per point; capped at max_seq"""
    chunks: tuple[int, ...] = (128, 64, 43, 32)
    """keys per split (num_splits = ceil(max_seq / chunk))"""
    num_warps: tuple[int, ...] = (DEFAULT_WARPS,)
    """warps per split program"""
    num_caches: int = 16
    """separate caches rotated through per replay (a decode step's blocks)"""
    replays: int = 50
    """timed graph replays per point (median reported)"""
    seed: int = 0
    dry_run: bool = False
    """CPU, float32, the reference path: checks that the script runs end to end"""

    def validate(self) -> None:
        for name in ("num_caches", "replays"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')}={getattr(self, name)!r} must be >= 1")
        unknown = [p for p in self.presets if p not in PRESETS]
        if unknown:
            raise ValueError(f"--presets {unknown} unknown; allowed: {sorted(PRESETS)}")
        if any(v < 1 for v in self.visible) or any(c < 1 for c in self.chunks):
            raise ValueError(f"--visible {self.visible} and --chunks {self.chunks} must be >= 1")
        if any(w not in (1, 2, 4, 8, 16) for w in self.num_warps):
            raise ValueError(f"--num-warps {self.num_warps}: each must be one of 1, 2, 4, 8, 16")


def bench_preset(args: Args, preset: str, device: str, dtype: torch.dtype, on_gpu: bool) -> list[dict]:
    model = PRESETS[preset]
    heads, head_dim = model.n_heads, model.head_dim
    max_seq = min(model.max_seq_len, DEFAULT_MAX_SEQ_LEN)
    generator = torch.Generator(device=device).manual_seed(args.seed)

    def randn(*shape):
        return torch.randn(*shape, device=device, dtype=dtype, generator=generator)

    caches = [(randn(1, heads, max_seq, head_dim), randn(1, heads, max_seq, head_dim)) for _ in range(args.num_caches)]
    q = randn(1, heads, 1, head_dim)
    rows = []
    for visible in sorted({min(v, max_seq) for v in args.visible}):
        slot = torch.tensor([visible - 1], device=device)
        reference = decode_attention_reference(q, *caches[0], slot).float()
        for chunk in args.chunks:
            for warps in args.num_warps:
                num_splits, chunk_keys, block_n = split_plan(max_seq, head_dim, -(-max_seq // chunk))
                workspace = torch.empty(heads, num_splits, head_dim + 2, device=device, dtype=torch.float32)
                out = torch.empty_like(q)

                def call(key_cache, value_cache):
                    if on_gpu:
                        decode_attention(q, key_cache, value_cache, slot, num_splits=num_splits, workspace=workspace,
                                         out=out, num_warps=warps)
                    else:
                        out.copy_(decode_attention_reference(q, key_cache, value_cache, slot))

                call(*caches[0])
                error = float((out.float() - reference).abs().max())

                def step():
                    for key_cache, value_cache in caches:
                        call(key_cache, value_cache)

                ms = median_ms_graph(step, args.replays) if on_gpu else median_ms_host(step, args.replays)
                us = ms * 1e3 / len(caches)
                nbytes = 2 * heads * visible * head_dim * dtype.itemsize
                rows.append(dict(preset=preset, heads=heads, head_dim=head_dim, max_seq=max_seq, visible_keys=visible,
                                 chunk=chunk_keys, num_splits=num_splits, block_n=block_n, num_warps=warps,
                                 default=chunk == DEFAULT_CHUNK and warps == DEFAULT_WARPS,
                                 us_per_call=us, achieved_GBps=nbytes / us / 1e3, max_abs_err_vs_reference=error))
                print(f"{preset:9s} keys={visible:5d} chunk={chunk_keys:4d} splits={num_splits:3d} warps={warps} "
                      f"{us:7.2f} us/call {rows[-1]['achieved_GBps']:6.0f} GB/s  max err {error:.1e}", flush=True)
    return rows


def main() -> None:
    args = tyro.cli(Args, description=__doc__.split("\n\n")[0])
    args.validate()
    if args.dry_run:
        args = dataclasses.replace(args, presets=("micro",), visible=(40,), chunks=(64, 16), num_caches=2, replays=3)
    on_gpu = torch.cuda.is_available() and not args.dry_run
    if not on_gpu and not args.dry_run:
        raise SystemExit("no CUDA device: run on a GPU, or pass --dry-run to check the script on CPU")
    device, dtype = ("cuda", torch.bfloat16) if on_gpu else ("cpu", torch.float32)
    meta = dict(args=dataclasses.asdict(args), dtype=str(dtype), default_chunk=DEFAULT_CHUNK, default_warps=DEFAULT_WARPS,
                python=platform.python_version(),
                device=device_info(torch.device(device)), time=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                timing="CUDA-graph replay of num_caches calls over num_caches caches, median per call")
    if on_gpu:
        import triton

        meta["triton"] = triton.__version__
    rows = [row for preset in args.presets for row in bench_preset(args, preset, device, dtype, on_gpu)]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(dict(meta=meta, rows=rows), indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
