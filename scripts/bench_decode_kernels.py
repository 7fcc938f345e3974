"""Tile sweeps of the decode step's GEMV-shaped kernels against cuBLAS / torch; writes JSON.

MolmoE-1B's shapes by default (d 2048, 64 experts of hidden 1024, vocabulary 50,304, bf16):
- `decode_gemv`: the q/k/v projection (3d x d) and the LM head (vocab x d) with the residual add +
  RMSNorm fused (the attention norm, ln_f), against `fused_add_rms_norm` followed by cuBLAS; the
  output projection (d x d) plain, against cuBLAS. The LM head (206 MB a copy) is timed over
  `--head-copies` copies and over tiles of >= 4 rows (fewer rows re-read the vector from L2 more
  often than the weights are read);
- the MoE decode kernels (`moe_kernels.launch_decode_gate_up`, `launch_decode_down`), each alone,
  per top_k in `--top-k`, per tile;
- `greedy_token` per `block_v`, against torch's argmax.
Each point is a CUDA graph of `--blocks` calls in a row, each over its own weights (logits), like a
decode step through the blocks, so L2 serves no repeat reads of weights; the median replay over the
calls is the time per call. Each point is first checked against the torch reference; rows marked
`default` are the tiles the runtime uses on this card.

    python scripts/bench_decode_kernels.py --out results/bench_decode_kernels_h200.json
    python scripts/bench_decode_kernels.py --dry-run --out /tmp/kernels_dry.json   # CPU, references
"""
from __future__ import annotations

import dataclasses
import itertools
import json
import platform
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
import tyro

from flexvlm_env.benchmarking import device_info, median_ms_graph, median_ms_host
from flexvlm_env.model import moe_kernels
from flexvlm_env.model.decode_gemv import GemvConfig, decode_gemv, decode_gemv_reference, default_gemv_config
from flexvlm_env.model.fused_kernels import (
    GREEDY_BLOCK_V,
    fused_add_rms_norm,
    greedy_token,
    greedy_token_reference,
    new_arrival_counter,
)

EPS = 1e-5


@dataclass
class Args:
    out: str = "results/bench_decode_kernels.json"
    """where the JSON goes"""
    d_model: int = 2048
    num_experts: int = 64
    hidden: int = 1024
    """expert hidden width"""
    vocab: int = 50304
    top_k: tuple[int, ...] = (1, 2, 4, 8)
    """k values of the MoE tile sweep"""
    block_n: tuple[int, ...] = (1, 2, 4, 8, 16)
    """GEMV rows per program"""
    block_k: tuple[int, ...] = (256, 512, 1024, 2048)
    """GEMV columns per loop step"""
    num_warps: tuple[int, ...] = (1, 2, 4, 8)
    blocks: int = 16
    """calls per graph replay, each over its own weights (a decode step's blocks)"""
    head_copies: int = 4
    """LM-head weight copies per graph replay (the head is one call per token; several copies only
    keep L2 from serving a repeat)"""
    replays: int = 50
    seed: int = 0
    sections: tuple[str, ...] = ("greedy", "gemv", "moe")
    """which sweeps run, in this order"""
    gemv_shapes: tuple[str, ...] = ("qkv", "out", "head")
    """which projections the gemv section sweeps (each tile is a Triton compile: about a second)"""
    dry_run: bool = False
    """CPU, float32, tiny sizes, the torch references: checks that the script runs end to end"""

    def validate(self) -> None:
        for name in ("d_model", "num_experts", "hidden", "vocab", "blocks", "head_copies", "replays"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')}={getattr(self, name)!r} must be >= 1")
        if not self.gemv_shapes or set(self.gemv_shapes) - {"qkv", "out", "head"}:
            raise ValueError(f"--gemv-shapes {self.gemv_shapes} must be a non-empty subset of qkv, out, head")
        if not self.sections or set(self.sections) - {"greedy", "gemv", "moe"}:
            raise ValueError(f"--sections {self.sections} must be a non-empty subset of greedy, gemv, moe")
        if any(not 1 <= k <= self.num_experts for k in self.top_k):
            raise ValueError(f"--top-k {self.top_k} must be in 1..num_experts={self.num_experts}")
        for name in ("block_n", "block_k"):
            if any(v < 1 or v & (v - 1) for v in getattr(self, name)):
                raise ValueError(f"--{name.replace('_', '-')} {getattr(self, name)} must be powers of two")


def gemv_rows(args: Args, device, dtype, on_gpu: bool, time_ms, randn) -> list[dict]:
    d, rows = args.d_model, []
    shapes = {"qkv": (3 * d, True, args.blocks), "out": (d, False, args.blocks), "head": (args.vocab, True, args.head_copies)}
    for n, fused, copies in (shapes[name] for name in args.gemv_shapes):
        weights = [randn(n, d) * d ** -0.5 for _ in range(copies)]
        x, residual, norm_w = randn(1, d), randn(1, d), 1 + 0.3 * randn(d)
        out, h, new_residual = (torch.empty(1, m, device=device, dtype=dtype) for m in (n, d, d))
        kwargs = dict(residual=residual, norm_weight=norm_w, eps=EPS) if fused else {}
        ref = decode_gemv_reference(x, weights[-1], **kwargs)[0].float()  # `out` holds the last call's

        def cublas():
            for w in weights:
                if not on_gpu:
                    decode_gemv_reference(x, w, **kwargs)
                    continue
                # What the decoder ran before decode_gemv: the norm's launch, then nn.Linear.
                normed = fused_add_rms_norm(x, residual, norm_w, EPS, out=h, residual_out=new_residual)[0] if fused else x
                F.linear(normed, w)

        label = "add_rms_norm+cublas" if fused else "cublas"
        baseline = dict(kernel="gemv", n=n, k=d, norm_fused=fused, method=label, us=time_ms(cublas) * 1e3 / len(weights))
        rows.append(baseline)
        default = default_gemv_config(n, d, fused)
        tiles = [GemvConfig(*t) for t in itertools.product(args.block_n, args.block_k, args.num_warps)
                 if t[0] * t[1] <= 32768 and t[0] * t[1] >= 64 * t[2] and (n != args.vocab or t[0] >= 4)]
        for config in tiles if on_gpu else tiles[:1]:
            extra = dict(residual_out=new_residual) if fused else {}

            def decode_gemv_calls(config=config, extra=extra):
                for w in weights:
                    if on_gpu:
                        decode_gemv(x, w, out=out, config=config, **kwargs, **extra)
                    else:
                        out.copy_(decode_gemv_reference(x, w, **kwargs)[0])

            decode_gemv_calls()
            error = float((out.float() - ref).abs().max() / ref.abs().max())
            us = time_ms(decode_gemv_calls) * 1e3 / len(weights)
            rows.append(dict(kernel="gemv", n=n, k=d, norm_fused=fused, method="decode_gemv", **dataclasses.asdict(config),
                             default=config == default, us=us, achieved_GBps=n * d * dtype.itemsize / us / 1e3,
                             max_rel_err_vs_reference=error))
        mine = [r for r in rows if r.get("n") == n and r["method"] == "decode_gemv"]
        best = min(mine, key=lambda r: r["us"])
        shipped = next((r for r in mine if r["default"]), None)
        print(f"gemv {n}x{d} norm_fused={fused}: {label} {baseline['us']:.2f} us, best tile "
              f"{best['block_n']}/{best['block_k']}/{best['num_warps']} {best['us']:.2f} us"
              + (f", default tile {shipped['us']:.2f} us" if shipped else ""), flush=True)
    return rows


def moe_rows(args: Args, device, dtype, on_gpu: bool, time_ms, randn) -> list[dict]:
    """Each MoE decode kernel alone per tile (GPU); the reference once per top_k on the dry run."""
    e, h, d, rows = args.num_experts, args.hidden, args.d_model, []
    sets = [(randn(e, 2 * h, d) * d ** -0.5, randn(e, d, h) * h ** -0.5) for _ in range(args.blocks)]
    x = randn(1, d)
    card = moe_kernels.card_of(torch.device(device))
    for k in args.top_k:
        ids = torch.randperm(e, device=device)[:k][None]
        probs = torch.rand(1, k, device=device)
        if not on_gpu:
            us = time_ms(lambda: [moe_kernels.moe_reference(x, ids, probs, wgu, wd) for wgu, wd in sets]) * 1e3 / len(sets)
            rows.append(dict(kernel="moe_reference", top_k=k, us=us))
            continue
        default = moe_kernels.default_decode_config(k, card)
        workspace = torch.empty(k * h, device=device, dtype=torch.float32)
        y = torch.empty(1, d, device=device, dtype=dtype)
        for block_h, block_d, warps in itertools.product((2, 4, 8, 16, 32), (256, 512, 1024, 2048), (2, 4, 8)):
            if block_h * block_d > 32768:
                continue

            tile = moe_kernels.DecodeConfig(block_h=block_h, block_d=block_d, num_warps=warps)

            def gate_up(tile=tile):
                for wgu, _ in sets:
                    moe_kernels.launch_decode_gate_up(x, ids, probs, wgu, workspace, tile)

            us = time_ms(gate_up) * 1e3 / len(sets)
            rows.append(dict(kernel="moe_gate_up", top_k=k, block_h=block_h, block_d=block_d, num_warps=warps, us=us,
                             achieved_GBps=k * 2 * h * d * dtype.itemsize / us / 1e3,
                             default=(block_h, block_d, warps) == (default.block_h, default.block_d, default.num_warps)))
        for block_out, block_hk, warps in itertools.product((2, 4, 8, 16), (512, 1024), (2, 4, 8)):
            tile = moe_kernels.DecodeConfig(block_out=block_out, block_hk=block_hk, num_warps=warps)

            def down(tile=tile):
                for _, wd in sets:
                    moe_kernels.launch_decode_down(workspace, ids, wd, y, tile)

            us = time_ms(down) * 1e3 / len(sets)
            default_warps = default.down_warps or default.num_warps
            rows.append(dict(kernel="moe_down", top_k=k, block_out=block_out, block_hk=block_hk, num_warps=warps, us=us,
                             achieved_GBps=k * h * d * dtype.itemsize / us / 1e3,
                             default=(block_out, block_hk, warps) == (default.block_out, default.block_hk, default_warps)))
        for kernel in ("moe_gate_up", "moe_down"):
            mine = [r for r in rows if r["kernel"] == kernel and r["top_k"] == k]
            best, shipped = min(mine, key=lambda r: r["us"]), next(r for r in mine if r["default"])
            print(f"{kernel} top_k={k}: default {shipped['us']:.2f} us, best {best['us']:.2f} us", flush=True)
        # The shipped pair end to end (moe_decode_triton, default tiles) against the reference.
        out = moe_kernels.moe_decode_triton(x, ids, probs, *sets[0])
        ref = moe_kernels.moe_reference(x.float(), ids, probs, sets[0][0].float(), sets[0][1].float())
        rows.append(dict(kernel="moe_decode_triton", top_k=k, card=card,
                         max_rel_err_vs_reference=float((out.float() - ref).abs().max() / ref.abs().max())))
    return rows


def greedy_rows(args: Args, device, dtype, on_gpu: bool, time_ms, randn) -> list[dict]:
    logits = [randn(1, args.vocab) for _ in range(args.blocks)]
    counter, out = new_arrival_counter(device), torch.empty(1, 1, dtype=torch.long, device=device)
    rows = [dict(kernel="greedy", method="torch_argmax",
                 us=time_ms(lambda: [greedy_token_reference(x) for x in logits]) * 1e3 / len(logits))]
    for block_v in (512, 1024, 2048, 4096, 8192) if on_gpu else (GREEDY_BLOCK_V,):
        blocks = -(-args.vocab // block_v)
        workspace = torch.empty(2 * blocks, device=device)
        call = ((lambda x: greedy_token(x, counter, out=out, workspace=workspace, block_v=block_v)) if on_gpu
                else greedy_token_reference)
        agree = sum(torch.equal(call(x), greedy_token_reference(x)) for x in logits)
        us = time_ms(lambda: [call(x) for x in logits]) * 1e3 / len(logits)
        rows.append(dict(kernel="greedy", method="greedy_token", block_v=block_v, default=block_v == GREEDY_BLOCK_V,
                         us=us, equal_to_argmax=f"{agree}/{len(logits)}"))
    print("greedy: " + ", ".join(f"{r['method']}{'/' + str(r['block_v']) if 'block_v' in r else ''} {r['us']:.2f} us"
                                 for r in rows), flush=True)
    return rows


def main() -> None:
    args = tyro.cli(Args, description=__doc__.split("\n\n")[0])
    args.validate()
    if args.dry_run:
        args = dataclasses.replace(args, d_model=64, num_experts=8, hidden=32, vocab=300, top_k=(2,), blocks=2, replays=3)
    on_gpu = torch.cuda.is_available() and not args.dry_run
    if not on_gpu and not args.dry_run:
        raise SystemExit("no CUDA device: run on a GPU, or pass --dry-run to check the script on CPU")
    device, dtype = ("cuda", torch.bfloat16) if on_gpu else ("cpu", torch.float32)
    generator = torch.Generator(device=device).manual_seed(args.seed)

    def randn(*shape):
        return torch.randn(*shape, device=device, generator=generator).to(dtype)

    time_ms = (lambda step: median_ms_graph(step, args.replays)) if on_gpu else (lambda step: median_ms_host(step, args.replays))
    meta = dict(args=dataclasses.asdict(args), dtype=str(dtype), python=platform.python_version(),
                device=device_info(torch.device(device)), time=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                timing="CUDA-graph replay of `blocks` calls over `blocks` weight sets, median per call (us)")
    if on_gpu:
        import triton

        meta["triton"] = triton.__version__
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    rows = []
    sections = {"greedy": greedy_rows, "gemv": gemv_rows, "moe": moe_rows}
    for section in (sections[name] for name in args.sections):
        rows += section(args, device, dtype, on_gpu, time_ms, randn)
        # Written after each section: a run cut short keeps what it measured.
        meta["sections_done"] = meta.get("sections_done", []) + [section.__name__.removesuffix("_rows")]
        Path(args.out).write_text(json.dumps(dict(meta=meta, rows=rows), indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
