"""Micro-benchmark of the decode router: the one-launch Triton router per (block_k, num_warps) against
cuBLAS's gate GEMV followed by `softmax_topk`; writes JSON.

MolmoE-1B's router by default (d 2048, 64 experts, bf16), for each top_k in `--top-k`. Each point is a
CUDA graph of `--blocks` routers in a row, each with its own weights and input, like a decode step
through the blocks (one arrival counter shared by all, as in the runtime); the median replay over the
blocks gives the time per block. Every point first checks its ids against the torch reference.

    python scripts/bench_router.py --out results/bench_router_h200.json
    python scripts/bench_router.py --dry-run --out /tmp/router_dry.json   # CPU, the reference path
"""
from __future__ import annotations

import dataclasses
import json
import platform
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
import tyro

from flexvlm_env.benchmarking import device_info, median_ms_graph, median_ms_host
from flexvlm_env.model.fused_kernels import (
    ROUTER_BLOCK_K,
    ROUTER_WARPS,
    new_arrival_counter,
    router_topk,
    router_topk_reference,
    softmax_topk,
    softmax_topk_reference,
)


@dataclass
class Args:
    out: str = "results/bench_router.json"
    """where the JSON goes"""
    d_model: int = 2048
    num_experts: int = 64
    top_k: tuple[int, ...] = (8, 1)
    block_k: tuple[int, ...] = (32, 64, 128, 256)
    """d-columns per program of the one-launch router"""
    num_warps: tuple[int, ...] = (1, 2, 4, 8)
    blocks: int = 16
    """routers per graph replay, each with its own weights (a decode step's blocks)"""
    replays: int = 200
    seed: int = 0
    dry_run: bool = False
    """CPU, float32, the torch references: checks that the script runs end to end"""

    def validate(self) -> None:
        for name in ("d_model", "num_experts", "blocks", "replays"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')}={getattr(self, name)!r} must be >= 1")
        if any(not 1 <= k <= self.num_experts for k in self.top_k):
            raise ValueError(f"--top-k {self.top_k} must be in 1..num_experts={self.num_experts}")


def main() -> None:
    args = tyro.cli(Args, description=__doc__.split("\n\n")[0])
    args.validate()
    if args.dry_run:
        args = dataclasses.replace(args, d_model=64, num_experts=8, top_k=(2,), block_k=(32,), num_warps=(4,),
                                   blocks=2, replays=3)
    on_gpu = torch.cuda.is_available() and not args.dry_run
    if not on_gpu and not args.dry_run:
        raise SystemExit("no CUDA device: run on a GPU, or pass --dry-run to check the script on CPU")
    device, dtype = ("cuda", torch.bfloat16) if on_gpu else ("cpu", torch.float32)
    generator = torch.Generator(device=device).manual_seed(args.seed)
    d, experts = args.d_model, args.num_experts
    hs = [torch.randn(1, d, device=device, generator=generator).to(dtype) for _ in range(args.blocks)]
    weights = [(torch.randn(experts, d, device=device, generator=generator) * 3 * d ** -0.5).to(dtype)
               for _ in range(args.blocks)]
    counter = new_arrival_counter(device)
    time_ms = (lambda step: median_ms_graph(step, args.replays)) if on_gpu else (lambda step: median_ms_host(step, args.replays))
    rows = []
    for k in args.top_k:
        outs = [(torch.empty(1, k, device=device), torch.empty(1, k, dtype=torch.long, device=device)) for _ in hs]
        ref_ids = [router_topk_reference(h, w, k)[1] for h, w in zip(hs, weights)]

        def gemv_then_softmax_topk():
            for h, w, (out_w, out_ids) in zip(hs, weights, outs):
                if on_gpu:
                    softmax_topk(F.linear(h, w), k, out_w, out_ids)
                else:
                    out_w[:], out_ids[:] = softmax_topk_reference(F.linear(h, w), k)

        points = [("gemv+softmax_topk", None, None, gemv_then_softmax_topk)]
        for block_k in args.block_k:
            for warps in args.num_warps:
                def one_launch(block_k=block_k, warps=warps):
                    for h, w, (out_w, out_ids) in zip(hs, weights, outs):
                        if on_gpu:
                            router_topk(h, w, k, counter, out_weights=out_w, out_ids=out_ids, block_k=block_k, num_warps=warps)
                        else:
                            out_w[:], out_ids[:] = router_topk_reference(h, w, k)
                points.append(("router_topk", block_k, warps, one_launch))
        for method, block_k, warps, step in points:
            step()
            ids_agree = sum(torch.equal(out_ids, ref) for (_, out_ids), ref in zip(outs, ref_ids))
            us = time_ms(step) * 1e3 / len(hs)
            rows.append(dict(method=method, top_k=k, block_k=block_k, num_warps=warps, us_per_block=us,
                             ids_equal_reference=f"{ids_agree}/{len(hs)}", counter_after=int(counter.item()),
                             shipped=(block_k, warps) == (ROUTER_BLOCK_K, ROUTER_WARPS)))
            print(f"top_k={k} {method:18s} block_k={str(block_k):4s} warps={str(warps):2s} {us:6.2f} us/block  "
                  f"ids = reference: {ids_agree}/{len(hs)}", flush=True)
    meta = dict(args=dataclasses.asdict(args), dtype=str(dtype), python=platform.python_version(),
                device=device_info(torch.device(device)), time=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                shipped={"block_k": ROUTER_BLOCK_K, "num_warps": ROUTER_WARPS},
                timing="CUDA-graph replay of `blocks` routers, median per block")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(dict(meta=meta, rows=rows), indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
